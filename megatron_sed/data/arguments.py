"""Data and tokenizer flags of the trainer, with Megatron-LM's names where they exist.

``--seq-length`` belongs to the trainer and is not defined here.
"""

from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("data (megatron-sed SFT)")
    g.add_argument(
        "--data-path", nargs="*", default=None,
        help="Preprocessed SFT corpus prefix(es) (PREFIX.bin/.idx/_loss_mask/.json from "
        "megatron-sed-preprocess), optionally weighted: 'W1 PREFIX1 W2 PREFIX2'. Split by --split.",
    )
    g.add_argument("--train-data-path", nargs="*", default=None,
                   help="Training corpus prefix(es); replaces the train share of --split.")
    g.add_argument("--valid-data-path", nargs="*", default=None,
                   help="Validation corpus prefix(es); replaces the validation share of --split.")
    g.add_argument("--test-data-path", nargs="*", default=None,
                   help="Test corpus prefix(es); replaces the test share of --split.")
    g.add_argument("--split", type=str, default="98,2,0",
                   help="Train,valid,test shares of --data-path documents (contiguous ranges, as Megatron).")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="One sample per sequence, right-padded, instead of packing several samples per "
                   "sequence (packing resets positions and blocks attention across samples).")
    g.add_argument("--tokenizer-type", choices=("byte", "hf"), default="byte",
                   help="'byte': Megatron-Core byte-level tokenizer with turn tokens; "
                   "'hf': a local Hugging Face tokenizer folder (--tokenizer-model).")
    g.add_argument("--tokenizer-model", type=str, default=None,
                   help="Local tokenizer folder for --tokenizer-type hf.")
    g.add_argument("--chat-template", type=str, default=None,
                   help="Chat template override for --tokenizer-type hf: 'chatml', a file, or a Jinja string.")
    g.add_argument("--system-prompt", type=str, default=None,
                   help="System prompt for rows without one: text, or 'math' (reason step by step, "
                   "final answer in \\boxed{}).")
    return parser


def validate_data_args(args) -> None:
    """Clear errors for flag combinations that cannot work."""
    if args.tokenizer_type == "hf" and not args.tokenizer_model:
        raise ValueError("--tokenizer-type hf needs --tokenizer-model PATH")
    if args.tokenizer_type == "byte" and args.chat_template:
        raise ValueError("--chat-template applies to --tokenizer-type hf only")
    from megatron_sed.data.reader import parse_data_paths, parse_split

    parse_split(args.split)
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        parse_data_paths(getattr(args, flag, None))
