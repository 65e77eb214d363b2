"""Trainer side of converted checkpoints: model shape and tokenizer from the metadata.

`apply_converted_checkpoint_args(args, argv, parser)` is called by the trainer right
after parsing, before validation. When `--load` is a converted checkpoint (it has
`megatron_sed_model.json`), every model-shape flag the user did not give is taken from
the checkpoint, every flag the user did give is checked against it (all mismatches are
named in one error), and unless a tokenizer was chosen, the source model's HF tokenizer
and chat template (`OUT/hf`) are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Set

from megatron_sed.convert.layout import HF_ASSETS, find_model_metadata

# megatron_args entries that are not trainer flags: the vocabulary comes from the
# tokenizer (and is padded to at least the checkpoint's rows), add_bias_linear is the
# inverse of --disable-bias-linear.
_NOT_FLAGS = {"vocab_size", "add_bias_linear"}


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """Destinations of the options that appear literally in argv."""
    tokens = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
    return {a.dest for a in parser._actions if any(o in tokens for o in a.option_strings)}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def apply_converted_checkpoint_args(args: argparse.Namespace, argv: Sequence[str],
                                    parser: argparse.ArgumentParser) -> Optional[dict]:
    """Fill / check model-shape flags and the tokenizer from a converted --load.
    Returns the metadata, or None when --load is not a converted checkpoint.
    Raises ValueError naming every flag that contradicts the checkpoint."""
    load = getattr(args, "load", None)
    if not load:
        return None
    meta = find_model_metadata(load)
    if meta is None:
        return None
    given = explicit_dests(parser, argv)
    mismatches = []
    for dest, value in meta["megatron_args"].items():
        if dest in _NOT_FLAGS:
            continue
        if dest in given:
            if not _same(getattr(args, dest, None), value):
                mismatches.append(f"{_flag(dest)} {getattr(args, dest, None)!r} "
                                  f"(checkpoint: {value!r})")
        else:
            setattr(args, dest, value)
    if mismatches:
        raise ValueError(
            f"--load {load} is a converted {meta['model'].get('model_type')} checkpoint whose "
            "shape differs from the flags (drop them to take the checkpoint's):\n  "
            + "\n  ".join(mismatches)
        )
    if not ({"tokenizer_type", "tokenizer_model"} & given):
        args.tokenizer_type = "hf"
        args.tokenizer_model = str(Path(meta["_root"]) / meta.get("tokenizer_dir", HF_ASSETS))
    # The trainer pads the tokenizer's vocabulary; it must keep at least the rows of the
    # source model (e.g. Qwen2.5: tokenizer 151665 entries, embedding 152064 rows).
    args.checkpoint_vocab_size = meta["megatron_args"]["vocab_size"]
    return meta
