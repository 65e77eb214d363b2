"""SED-SFT trainer on Megatron-Core: `python -m megatron_sed.train` / `megatron-sed-train`.

Modules: arguments (Megatron-named flags, validation), data (reader/synthetic set, DP
batches), step (forward_step / loss_func shared by CPU and GPU), loop_cpu (gloo machinery),
loop_gpu (Megatron-Core DDP / optimizer / schedules), checkpoint (dist_checkpointing),
metrics (log lines, JSONL, TensorBoard), trainer (setup and loop).
"""
