"""SFT data for Megatron's loop: the dataset provider, the tokenizer it implies, and the
micro-batch -> model inputs step.

The data is the project's packed SFT format (megatron_sed.data.reader: PREFIX.bin/.idx
plus the assistant-only loss mask, written by megatron-sed-preprocess). Without
--data-path the built-in synthetic math SFT set is preprocessed on the fly with the byte
tokenizer. Megatron's own data loader and sampler read the datasets (`dataloader_type`
single: the stream is a pure function of the consumed-sample count a checkpoint stores).
Every rank builds and reads its data-parallel rank's batches itself (the provider is
`is_distributed`), so tensor- and pipeline-parallel peers need no broadcast.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.training import get_args, get_tokenizer, print_rank_0

from megatron_sed.data.indexed import read_metadata
from megatron_sed.data.preprocess import preprocess_rows
from megatron_sed.data.reader import (
    build_block_causal_mask,
    build_sft_datasets,
    packed_lengths,
    packed_seq_params_from_lengths,
    parse_data_paths,
)
from megatron_sed.data.synthetic import make_synthetic_math
from megatron_sed.flags import ArgumentError
from megatron_sed.model.context_parallel import check_thd_partition, thd_partition_indices

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 262  # megatron_sed.data.tokenizer.ByteTokenizer: 256 bytes + 6 specials
DEFAULT_SPLIT = "98,2,0"


def _data_prefixes(args) -> list[str]:

    prefixes: list[str] = []
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        parsed = parse_data_paths(getattr(args, flag, None))
        if parsed is not None:
            prefixes.extend(parsed[0])
    return prefixes


def resolve_tokenizer_args(args) -> None:
    """Set Megatron's tokenizer flags and `args.sft_tokenizer_type` ("byte" | "hf": what
    megatron-sed's eval and export rebuild) from the data when --tokenizer-type is not
    given. Megatron's loop only needs the vocabulary size, so data tokenized by the byte
    tokenizer (or an HF tokenizer whose folder is not given) trains with Megatron's
    NullTokenizer of that size. A tokenizer that contradicts the data is an error."""

    prefixes = _data_prefixes(args)
    source = prefixes[0] if prefixes else "the built-in synthetic set"
    info = (
        read_metadata(prefixes[0])["tokenizer"]
        if prefixes
        else {"type": "byte", "vocab_size": BYTE_VOCAB_SIZE}
    )
    data_type, data_vocab = info.get("type", "byte"), int(info["vocab_size"])
    if args.tokenizer_type == "ByteTokenizer" or (args.tokenizer_type is None and data_type == "byte"):
        args.tokenizer_type, args.sft_tokenizer_type = "NullTokenizer", "byte"
        args.vocab_size = BYTE_VOCAB_SIZE
    elif args.tokenizer_type is None:  # HF data, tokenizer folder unknown: its size is enough
        args.tokenizer_type, args.sft_tokenizer_type = "NullTokenizer", "hf"
        args.vocab_size = data_vocab
    elif not getattr(args, "tokenizer_from_checkpoint", False):
        args.sft_tokenizer_type = "hf" if args.tokenizer_type == "HuggingFaceTokenizer" else None
    wanted = getattr(args, "sft_tokenizer_type", None)
    if wanted is not None and wanted != data_type:
        raise ValueError(
            f"the tokenizer is {wanted} ({args.tokenizer_type}"
            f"{' ' + args.tokenizer_model if args.tokenizer_model else ''}), but "
            f"{source} was tokenized with {data_type}: pass the tokenizer the data "
            "was preprocessed with (or preprocess the data with this one)"
        )


def check_tokenizer_matches_data(args) -> None:
    """After Megatron built its tokenizer: an HF tokenizer must be the one the data was
    tokenized with (same size); any tokenizer must cover the data's token ids."""

    prefixes = _data_prefixes(args)
    want = int(read_metadata(prefixes[0])["tokenizer"]["vocab_size"]) if prefixes else BYTE_VOCAB_SIZE
    have = int(get_tokenizer().vocab_size)
    if args.tokenizer_type == "HuggingFaceTokenizer" and want != have:
        raise ArgumentError(
            f"--tokenizer-model {args.tokenizer_model} has {have} tokens but "
            f"{prefixes[0] if prefixes else 'the data'} was tokenized with {want}: "
            "pass the tokenizer the data was preprocessed with"
        )
    if have < want:
        raise ArgumentError(
            f"the tokenizer ({args.tokenizer_type}) has {have} tokens, fewer than "
            f"the {want} the data was tokenized with (--vocab-size?)"
        )


def synthetic_prefix(args) -> str:
    """Preprocess the built-in synthetic set once (global rank 0; others wait), return its prefix."""

    cache = args.synthetic_cache_dir or os.path.join(tempfile.gettempdir(), "megatron-sed-synthetic")
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


def build_datasets(args, num_samples, pack: Optional[bool] = None):
    """(train, valid, test) SFT datasets of at least num_samples = (train, valid, test)
    samples each (None: one pass); a split without documents is None."""

    data_path = args.data_path
    if not (data_path or args.train_data_path or args.valid_data_path):
        data_path = [synthetic_prefix(args)]
    train_n, valid_n, test_n = num_samples
    return build_sft_datasets(
        data_path,
        split=args.split or DEFAULT_SPLIT,
        seq_length=args.seq_length,
        seed=args.seed,
        pack=args.pack if pack is None else pack,
        valid_data_paths=args.valid_data_path,
        train_data_paths=args.train_data_path,
        test_data_paths=args.test_data_path,
        train_samples=train_n,
        valid_samples=valid_n,
        test_samples=test_n,
        pad_multiple=sample_pad_multiple(args),
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's dataset provider (called with the sample counts it will draw). With the
    interleaved pipeline Megatron calls it once per model chunk (`vp_stage`): every chunk
    reads the same micro-batches, as in Megatron-LM's pretrain_gpt.py."""

    args = get_args()
    print_rank_0("> building SFT train, validation and test datasets ...")
    train, valid, test = build_datasets(args, train_val_test_num_samples)
    # A split Megatron draws no sample from (--eval-iters 0: validation off) is None, as
    # Megatron's own builders return it: its sampler refuses a dataset of length 0.
    train, valid, test = (
        None if n is not None and int(n) == 0 else ds
        for ds, n in zip((train, valid, test), train_val_test_num_samples)
    )
    if train is None and args.train_iters:
        raise ValueError("the training split is empty: check --split / --train-data-path")
    for ds in (train, valid, test):
        check_supervised(ds, args)
    return train, valid, test


def check_supervised(dataset, args) -> None:
    """Refuse a split (or a blend's component) that holds no supervised token within
    --seq-length: it would train and validate on nothing (a loss of 0/0) and exit 0.
    Raises ArgumentError (exit 2, no traceback); logs each split's count otherwise."""
    for part in getattr(dataset, "datasets", [dataset] if dataset is not None else []):
        n = part.supervised_tokens()
        print_rank_0(f" > {part.name} split of {part.data.prefix}: {n} supervised tokens per epoch")
        if n:
            continue
        prompts = part.prompt_lengths()
        said = (
            f"its prompts (the tokens before the first supervised one) are {prompts.min()} to "
            f"{prompts.max()} tokens long (median {int(np.median(prompts))}), so every response "
            f"starts past the cut: pass --seq-length (and --max-position-embeddings) larger "
            f"than {prompts.max()} plus room for the responses"
            if prompts.size
            else "its documents have no supervised token at all (check the loss mask: "
            "megatron-sed-preprocess supervises the assistant turns)"
        )
        raise ArgumentError(
            f"the {part.name} split of {part.data.prefix} holds no supervised token within "
            f"--seq-length {args.seq_length}: {said}"
        )


# Every rank reads its own DP rank's batches: no TP broadcast of the micro-batch.
train_valid_test_datasets_provider.is_distributed = True


SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def sample_pad_multiple(args) -> int:
    """Each SFT sample is padded to a multiple of this: --sft-pad-granularity, else
    2 x --context-parallel-size when CP > 1 (Megatron-LM's SFT dataset's rule: context
    parallelism cuts every packed sample into 2 x CP chunks), else 1."""
    given = getattr(args, "sft_pad_granularity", None)
    if given is not None:
        return given
    cp = getattr(args, "context_parallel_size", 1)
    return 2 * cp if cp > 1 else 1


def model_inputs(batch: dict[str, torch.Tensor], thd: bool, pack: bool = True) -> dict[str, object]:
    """tokens, position_ids, labels, loss_mask on the current device, plus the attention
    description: packed samples get THD PackedSeqParams (built from the host segment ids:
    no device sync) or a block-causal boolean mask (local spec without CP); padded single
    samples need only the causal mask. Labels are clamped to valid ids (the loss mask says
    which count), as Megatron's CE expects of the heads SED leaves to it.

    With context parallelism the tokens, labels, loss mask and positions are split as
    Megatron-LM's pretrain_gpt.py splits them (megatron.core.utils.get_batch_on_this_cp_rank):
    padded samples into 2 x CP chunks of the sequence, rank r keeping chunks r and 2CP-1-r;
    packed THD batches per sample (each padded to a multiple of 2 x CP by the reader),
    rank r keeping chunks r and 2CP-1-r of every sample, Transformer Engine's
    thd_get_partitioned_indices layout (megatron_sed.model.context_parallel computes it on
    the host, in torch, so the CPU backend runs the same split; Megatron's own per-document
    split calls TE's CUDA kernel)."""

    device = torch.device("cuda", torch.cuda.current_device())
    out = {k: batch[k].to(device, non_blocking=True) for k in SEQUENCE_KEYS}
    out["labels"] = out["labels"].clamp(min=0)
    out["attention_mask"] = None
    out["packed_seq_params"] = None
    cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
    cp = cp_group.size() if cp_group is not None else 1
    if thd:
        real, padded = packed_lengths(batch["segment_ids"])  # host ids: no device sync
        out["packed_seq_params"] = packed_seq_params_from_lengths(real, padded, device)
        for k in SEQUENCE_KEYS:
            out[k] = out[k].reshape(1, -1)  # THD: one flattened row
        if cp > 1:
            cu_padded = [0, *itertools.accumulate(padded)]
            check_thd_partition(cu_padded, batch["segment_ids"].numel(), cp)
            index = thd_partition_indices(torch.tensor(cu_padded), cu_padded[-1], cp, cp_group.rank())
            index = index.to(device, non_blocking=True)
            for k in SEQUENCE_KEYS:
                out[k] = out[k].index_select(1, index)
    elif pack:
        if cp > 1:
            raise ValueError("packed samples with context parallelism take the THD layout")
        out["attention_mask"] = build_block_causal_mask(batch["segment_ids"].to(device))
    elif cp > 1:
        split = get_batch_on_this_cp_rank(
            {k: out[k] for k in SEQUENCE_KEYS}, is_hybrid_cp=False, cp_group=cp_group
        )
        out.update({k: split[k] for k in SEQUENCE_KEYS})
    return out
