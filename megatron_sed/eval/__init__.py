"""Evaluation of SFT checkpoints: sampling, accuracy (avg@n, pass@k) and diversity metrics.

python -m megatron_sed.eval --load CKPT --prompts test.jsonl --output results.json
"""
