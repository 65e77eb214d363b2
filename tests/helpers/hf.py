"""Small Hugging Face artefacts built locally (no downloads) for the tests: a BPE tokenizer
with a chat template, a tiny Llama-3-style model (RoPE scaling on) briefly trained on the
synthetic math set so its loss is far from a random model's, its Megatron-Core
conversion, and SFT data preprocessed with its tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Llama-3.2's RoPE scaling (Megatron-Core hard-codes low/high/original = 1/4/8192).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama_config(vocab_size: int, tie_word_embeddings: bool, initializer_range: float):
    """A 2-layer GQA Llama config with Llama 3.x RoPE scaling, small enough for CPU tests."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=10000.0,
        initializer_range=initializer_range,
        rope_scaling=dict(LLAMA3_ROPE_SCALING),
    )


def build_local_hf_tokenizer(directory, with_template=True):
    """Train a tiny BPE with `tokenizers`, wrap it as a transformers fast tokenizer, save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_sed.data.synthetic import make_synthetic_math
    from megatron_sed.data.tokenizer import CHATML_TEMPLATE

    specials = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["response"] for r in make_synthetic_math(200, seed=0)]
    corpus += ["system user assistant Hello, how are you? Fine thanks. Reason step by step."]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if with_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(directory))
    return str(directory)


@dataclass
class TinyLlama:
    hf_dir: Path  # HF folder: config, safetensors, tokenizer
    converted: Path  # megatron-sed-convert hf-to-mcore output (a "release" save dir)
    data: str  # SFT data prefix tokenized with the model's tokenizer
    seq_length: int = 128


def _pretrain(model, tokenizer, steps: int, seed: int) -> None:
    """A few hundred Adam steps on synthetic math text: loss ~2 instead of ~6."""
    import torch

    from megatron_sed.data.synthetic import make_synthetic_math

    torch.manual_seed(seed)
    texts = [r["question"] + " " + r["response"] for r in make_synthetic_math(300, seed=seed + 7)]
    ids = [torch.tensor(tokenizer(t)["input_ids"][:64]) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [ids[(step * 8 + j) % len(ids)] for j in range(8)]
        n = min(len(b) for b in batch)
        x = torch.stack([b[:n] for b in batch])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_llama(root: Path, steps: int = 150, seed: int = 0) -> TinyLlama:
    """The tokenizer, a tiny Llama-3.2-shaped model (GQA, untied head, llama3 RoPE scaling)
    pretrained for `steps` steps, its conversion, and preprocessed SFT data."""
    import torch
    import transformers

    from megatron_sed.convert import convert_hf_to_mcore
    from megatron_sed.data.preprocess import preprocess_rows
    from megatron_sed.data.synthetic import make_synthetic_math

    root = Path(root)
    hf_dir = root / "llama"
    build_local_hf_tokenizer(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    cfg = tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=False, initializer_range=0.05)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    _pretrain(model, tok, steps, seed)
    model.save_pretrained(str(hf_dir))
    converted = root / "llama_mcore"
    convert_hf_to_mcore(hf_dir, converted, progress=False)
    rows = make_synthetic_math(150, seed=seed + 1, split="train")
    prefix = str(root / "sft")
    preprocess_rows(rows, prefix, tokenizer_type="hf", tokenizer_model=str(hf_dir))
    return TinyLlama(hf_dir=hf_dir, converted=converted, data=prefix)


def hf_reference_ce(hf_dir: Path, samples, dtype=None) -> float:
    """Mean CE over the supervised tokens of packed SFT samples (megatron_sed.data.reader
    items), computed by transformers: each packed document separately (block-diagonal
    attention, positions reset), which is what the trainer's packing means."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype or torch.float32
    ).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in samples:
            seg = s["segment_ids"]
            for k in seg.unique().tolist():
                if k < 0:
                    continue
                idx = (seg == k).nonzero().flatten()
                logits = (
                    model(s["tokens"][idx][None], position_ids=s["position_ids"][idx][None])
                    .logits[0]
                    .double()
                )
                ce = torch.nn.functional.cross_entropy(
                    logits, s["labels"][idx].clamp(min=0), reduction="none"
                )
                mask = s["loss_mask"][idx].double()
                total += float((ce * mask).sum())
                count += float(mask.sum())
    return total / count


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def tiny_qwen3_moe_config(vocab_size: int):
    """A 2-layer Qwen3-MoE config: QK-norm, head_dim 24 (not hidden / heads = 16), GQA,
    4 experts of which 2 per token with renormalised probabilities, untied head."""
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        initializer_range=0.1,
    )


def randomise_norms(model) -> None:
    """HF inits norms to 1 and biases to 0: randomise them too, so a dropped or misplaced
    norm (q_norm / k_norm included) changes the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))


@dataclass
class TinyQwen3Moe:
    hf_dir: Path  # HF folder: config, safetensors (per-expert tensors), tokenizer
    converted: Path  # megatron-sed-convert hf-to-mcore output
    data: str  # SFT data prefix tokenized with the model's tokenizer


def build_tiny_qwen3_moe(root: Path, seed: int = 0) -> TinyQwen3Moe:
    """The tokenizer, a random tiny Qwen3-MoE, its conversion and preprocessed SFT data."""
    import torch
    import transformers

    from megatron_sed.convert import convert_hf_to_mcore
    from megatron_sed.data.preprocess import preprocess_rows
    from megatron_sed.data.synthetic import make_synthetic_math

    root = Path(root)
    hf_dir = root / "qwen3_moe"
    build_local_hf_tokenizer(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(tiny_qwen3_moe_config(len(tok))).eval()
    randomise_norms(model)
    model.save_pretrained(str(hf_dir))
    converted = root / "qwen3_moe_mcore"
    convert_hf_to_mcore(hf_dir, converted, progress=False)
    rows = make_synthetic_math(80, seed=seed + 1, split="train")
    prefix = str(root / "sft")
    preprocess_rows(rows, prefix, tokenizer_type="hf", tokenizer_model=str(hf_dir))
    return TinyQwen3Moe(hf_dir=hf_dir, converted=converted, data=prefix)
