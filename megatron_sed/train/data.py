"""Training data for the trainer: the data engineer's packed SFT reader
(megatron_sed.data.reader), or, without --data-path, the built-in synthetic math SFT set
preprocessed on the fly with the byte tokenizer. Batches follow Megatron's
pretraining sampler: iteration i, micro-batch m, data-parallel rank r reads global samples
consumed + (m * dp + r) * mbs + [0, mbs), so the stream is a pure function of the consumed
sample count (what a checkpoint stores)."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Dict, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _synthetic_prefix(args) -> str:
    """Preprocess the synthetic set once (rank 0), return its prefix (all ranks)."""
    from megatron_sed.data.preprocess import preprocess_rows
    from megatron_sed.data.synthetic import make_synthetic_math

    cache = args.synthetic_cache_dir
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "megatron-sed-synthetic")
    prefix = os.path.join(cache, f"synthetic_math_n{args.synthetic_num_problems}_s{args.seed}_byte_v1")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.exists(prefix + ".json"):
        os.makedirs(cache, exist_ok=True)
        rows = make_synthetic_math(args.synthetic_num_problems, seed=args.seed, split="train")
        logger.info("building the synthetic math SFT set: %d rows -> %s", len(rows), prefix)
        preprocess_rows(rows, prefix, tokenizer_type="byte")
    if dist.is_initialized():
        dist.barrier()
    return prefix


def build_datasets(args):
    """(train, valid) datasets and the tokenizer; sets args.vocab_size."""
    from megatron_sed.data.reader import build_sft_datasets
    from megatron_sed.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.chat_template)
    data_path = args.data_path
    if not (data_path or args.train_data_path):
        if args.tokenizer_type != "byte":
            raise ValueError("the built-in synthetic set uses the byte tokenizer: pass --data-path "
                             "for --tokenizer-type hf")
        data_path = [_synthetic_prefix(args)]
    train_samples = args.train_iters * args.global_batch_size
    valid_samples = None
    if args.eval_interval:
        evals = args.train_iters // args.eval_interval + 1
        valid_samples = evals * args.eval_iters * args.global_batch_size
    train, valid, _ = build_sft_datasets(
        data_path, split=args.split, seq_length=args.seq_length, seed=args.seed, pack=args.pack,
        valid_data_paths=args.valid_data_path, train_data_paths=args.train_data_path,
        test_data_paths=args.test_data_path, train_samples=train_samples, valid_samples=valid_samples,
    )
    if train is None:
        raise ValueError("the training split is empty: check --split / --train-data-path")
    args.vocab_size = tokenizer.vocab_size
    return train, valid, tokenizer


def collate(samples) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def batch_iterator(dataset, args, consumed_samples: int, dp_rank: int, dp_size: int) -> Iterator[Dict]:
    """Endless micro-batches for this DP rank starting at `consumed_samples` (global)."""
    mbs = args.micro_batch_size
    i = consumed_samples
    n = len(dataset)
    while True:
        for m in range(args.num_microbatches):
            start = i + (m * dp_size + dp_rank) * mbs
            yield collate([dataset[(start + j) % n] for j in range(mbs)])
        i += args.global_batch_size


def to_model_inputs(batch: Dict[str, torch.Tensor], device, transformer_impl: str,
                    pack: bool) -> Dict[str, object]:
    """tokens/position_ids/labels/loss_mask on `device` plus the attention description:
    a block-causal boolean mask (local spec) or THD PackedSeqParams (Transformer Engine)."""
    from megatron_sed.data.reader import build_block_causal_mask, packed_seq_params_from_segments

    out = {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    out["attention_mask"] = None
    out["packed_seq_params"] = None
    if transformer_impl == "transformer_engine":
        if pack:
            out["packed_seq_params"] = packed_seq_params_from_segments(batch["segment_ids"], device)
            for k in ("tokens", "labels", "loss_mask", "position_ids"):
                out[k] = out[k].reshape(1, -1)  # THD: one flattened row
    else:
        out["attention_mask"] = build_block_causal_mask(batch["segment_ids"].to(device))
    return out
