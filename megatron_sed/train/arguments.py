"""The trainer's command line: Megatron-LM's parser, plus the SED and megatron-sed flags.

Megatron parses everything (`megatron.training.arguments.parse_args` with
`add_trainer_args` as the extra-args provider), so every Megatron-LM flag means what it
means there. Between Megatron's parsing and its validation this module

- fills the model shape (and tokenizer, padded vocabulary) from the checkpoint that will be
  loaded (`megatron_sed.train.checkpoint_args`), so `--load CONVERTED --finetune` needs no
  shape flags and a requeued job keeps Llama-3's RoPE scaling;
- picks the tokenizer from the SFT data when none is given (the data's PREFIX.json
  records it; the built-in synthetic set uses the byte tokenizer);
- on the CPU backend, defaults what a machine without a GPU needs (gloo, the local layer
  spec, no CUDA fusions, no data-loader workers) and refuses what it cannot do with a
  message naming the flag;

then runs Megatron's `validate_args` and `set_global_variables`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

import torch
from megatron.training.arguments import validate_args
from megatron.training.global_vars import set_global_variables

from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.flags import ArgumentError, add_sed_args, validate_sed_args
from megatron_sed.model.config import CPU_MODEL_SETTINGS, apply_fusions, parse_megatron_args
from megatron_sed.model.loss_hook import supports_output_processor
from megatron_sed.model.specs import te_available
from megatron_sed.model.support import check_model_flags
from megatron_sed.train.checkpoint_args import apply_checkpoint_args
from megatron_sed.train.data import resolve_tokenizer_args
from megatron_sed.train.load_check import check_load_dirs

PROG = "megatron-sed-train"

# Older megatron-sed names of --tokenizer-type values (still accepted).
TOKENIZER_ALIASES = {"hf": "HuggingFaceTokenizer", "byte": "ByteTokenizer"}

# What a CPU run needs instead of Megatron's GPU defaults (explicit flags still win): the
# model's CPU settings (megatron_sed.model.config, the builder's one copy of the CPU
# rules), the local layer spec, gloo, no data-loader workers.
CPU_DEFAULTS = dict(
    distributed_backend="gloo",
    transformer_impl="local",
    **CPU_MODEL_SETTINGS,
    num_workers=0,  # the packed reader is cheap; worker processes only cost cores here
)


_parser: Optional[argparse.ArgumentParser] = None  # Megatron's, as last handed to us


def add_trainer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's `extra_args_provider`: the SED flags and megatron-sed's own."""
    global _parser
    _parser = parser
    add_sed_args(parser)
    g = parser.add_argument_group(title="megatron-sed")
    g.add_argument(
        "--metrics-file",
        type=str,
        default=None,
        help="Append one JSON line per --log-interval (and per evaluation) with the "
        "logged values (lm_loss, sed_reg, sed_mask_rate, ..., grad_norm, lr).",
    )
    g.add_argument(
        "--no-sed-stats",
        dest="sed_stats",
        action="store_false",
        help="With --loss-type ce: Megatron's own cross-entropy and no SED statistics "
        "in the log (by default CE runs also go through the SED op, with the "
        "regulariser off, so their entropy / target prob / top-k mass are logged).",
    )
    g.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="One SFT sample per sequence, right-padded, instead of packing several "
        "per sequence (packing resets positions and blocks attention across samples).",
    )
    g.add_argument(
        "--sft-pad-granularity",
        type=int,
        default=None,
        help="Pad every SFT sample (loss mask 0) to a multiple of this many tokens. Default: "
        "2 x --context-parallel-size when it is > 1, as Megatron-LM's SFT dataset (context "
        "parallelism cuts each packed sample into 2 x CP chunks), else no padding. Give it "
        "at CP 1 to reproduce a CP run's packing.",
    )
    g.add_argument(
        "--synthetic-num-problems",
        type=int,
        default=400,
        help="Without --data-path: problems of the built-in synthetic math SFT set.",
    )
    g.add_argument(
        "--synthetic-kind",
        type=str,
        default=None,
        help="Without --data-path: which synthetic set (default: the standard mix; "
        "see megatron_sed.data.synthetic).",
    )
    g.add_argument(
        "--synthetic-cache-dir",
        type=str,
        default=None,
        help="Where the built-in synthetic set is preprocessed (default: a temp dir).",
    )
    for action in parser._actions:  # accept megatron-sed's older tokenizer names too
        if action.dest == "tokenizer_type" and action.choices is not None:
            action.choices = tuple(action.choices) + tuple(TOKENIZER_ALIASES)
        # the output layer fused with the loss (megatron_sed.ops.fused_linear_sed); a
        # megatron-core with its own 'linear' would bypass SED: the plugin's path runs
        if action.dest == "cross_entropy_fusion_impl" and action.choices is not None:
            if "linear" not in action.choices:
                action.choices = tuple(action.choices) + ("linear",)
            action.help = (action.help or "") + " linear: megatron-sed fuses the output layer with the loss."
    # megatron-core 0.19 has no --eval-interval default and then fails sizing the
    # validation set; Megatron-LM's long-standing default:
    parser.set_defaults(eval_interval=1000)
    if cpu_backend.is_active():
        parser.set_defaults(**CPU_DEFAULTS)
    escape_bare_percent(parser)
    return parser


def escape_bare_percent(parser: argparse.ArgumentParser) -> None:
    """argparse formats every help text with `help % params`; a literal '%' that is not
    '%%' (megatron-core 0.19.2's --moe-paged-stash-buffer-size-factor-cuda has one) makes
    --help fail. Escape the '%' of any help text that does not format."""
    for action in parser._actions:
        if not isinstance(action.help, str) or "%" not in action.help:
            continue
        params = dict(vars(action), prog=parser.prog)
        try:
            action.help % params
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Destinations of the options that appear literally in argv."""
    tokens = {t.split("=", 1)[0] for t in argv if t.startswith("--")}
    return {a.dest for a in parser._actions if tokens & set(a.option_strings)}


def _check_cpu_limits(args) -> None:
    """What the CPU backend cannot run, said before Megatron tries."""
    if args.transformer_impl == "transformer_engine":
        raise ArgumentError(
            "--transformer-impl transformer_engine needs a GPU with Transformer "
            "Engine; on CPU use --transformer-impl local (the default here)"
        )
    if args.fp8 is not None:
        raise ArgumentError(
            f"--fp8-format {args.fp8} needs Transformer Engine on a GPU; drop --fp8-format on CPU"
        )
    if args.distributed_backend != "gloo":
        raise ArgumentError(
            f"--distributed-backend {args.distributed_backend} needs GPUs; use gloo on CPU (the default here)"
        )
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        raise ArgumentError("--cuda-graph-impl needs a GPU")


def _check_fp8_hardware(args) -> None:
    """MXFP8 (block-scaled FP8) is a Blackwell (compute capability 10.x) format: on
    Hopper (9.x) Transformer Engine fails deep inside the first GEMM."""
    if args.fp8 is None or getattr(args, "fp8_recipe", None) != "mxfp8":
        return
    if not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        raise ArgumentError(
            f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x); this GPU is "
            f"{major}.{minor}: use --fp8-recipe delayed or tensorwise (Hopper's FP8 recipes)"
        )


def _check_gpu_stack(args) -> None:

    if args.transformer_impl == "transformer_engine" and not te_available():
        raise ArgumentError(
            "--transformer-impl transformer_engine (Megatron's default) needs "
            "Transformer Engine, which does not import here: install it "
            "(pip install 'megatron-sed[gpu]') or pass --transformer-impl local"
        )
    if args.fp8 is not None and args.transformer_impl != "transformer_engine":
        raise ArgumentError("--fp8-format needs --transformer-impl transformer_engine")
    _check_fp8_hardware(args)


def _check_schedule(args) -> None:
    """Megatron asserts these without a message; say which flags conflict."""
    iters = args.train_iters
    decay = args.lr_decay_iters if args.lr_decay_iters is not None else iters
    if iters is not None and decay is not None and args.lr_warmup_iters >= decay > 0:
        raise ArgumentError(
            f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than "
            f"--lr-decay-iters ({decay}; default --train-iters)"
        )


def _check_linear_fusion(args) -> None:
    """--cross-entropy-fusion-impl linear: the plugin's fused output layer + loss, reached
    through GPTModel's output_processor (megatron_sed.model.fused_output)."""
    impl = getattr(args, "cross_entropy_fusion_impl", None)
    if impl != "linear":
        return
    if not getattr(args, "cross_entropy_loss_fusion", False):
        raise ArgumentError(
            "--cross-entropy-fusion-impl linear only acts with --cross-entropy-loss-fusion: "
            "add it (or drop --cross-entropy-fusion-impl linear)"
        )
    if args.loss_type == "ce" and not getattr(args, "sed_stats", True):
        raise ArgumentError(
            "--no-sed-stats asks for Megatron's own cross-entropy, which --cross-entropy-"
            "fusion-impl linear replaces by megatron-sed's fused output layer + loss (its "
            "statistics come at no cost): drop --no-sed-stats"
        )
    if not supports_output_processor():
        raise ArgumentError(
            "--cross-entropy-fusion-impl linear needs GPTModel's output_processor "
            "(megatron-core >= 0.18); this megatron-core has none: use native"
        )
    for flag, dest in (
        ("--use-mup", "use_mup"),
        ("--defer-embedding-wgrad-compute", "defer_embedding_wgrad_compute"),
    ):
        if getattr(args, dest, False):
            raise ArgumentError(f"--cross-entropy-fusion-impl linear does not support {flag}: use native")


def _check_plugin_limits(args) -> None:
    _check_linear_fusion(args)
    if (
        args.pipeline_model_parallel_size > 1
        and args.pack
        and args.transformer_impl == "transformer_engine"
        and (args.micro_batch_size or 1) > 1
    ):
        # Packed samples go to TE as one THD row of micro-batch x seq-length tokens; the
        # pipeline's p2p buffers are sized [seq-length, micro-batch, hidden].
        raise ArgumentError(
            "packed sequences with --pipeline-model-parallel-size > 1 need "
            "--micro-batch-size 1 (or --no-pack)"
        )


def _check_context_parallel(args) -> None:
    """What megatron-sed's batch split (megatron_sed.train.data.model_inputs) and CP
    attention can run exactly; the rest is refused naming the flags."""
    cp = args.context_parallel_size
    if cp == 1:
        return
    if args.seq_length is not None and args.seq_length % (2 * cp):
        raise ArgumentError(
            f"--seq-length {args.seq_length} must be a multiple of 2 x --context-parallel-size "
            f"({2 * cp}): context parallelism splits each sequence into 2 x CP chunks"
        )
    if getattr(args, "hybrid_context_parallel", False):
        raise ArgumentError(
            "--hybrid-context-parallel is not supported by megatron-sed (its batches carry "
            "no per-sample CP sizes): use --context-parallel-size alone"
        )
    backend = getattr(getattr(args, "attention_backend", None), "name", None)
    if args.transformer_impl == "transformer_engine" and backend == "unfused":
        raise ArgumentError(
            "--attention-backend unfused has no context parallelism in Transformer Engine: "
            "use flash, fused or auto with --context-parallel-size > 1"
        )
    pad = getattr(args, "sft_pad_granularity", None)
    if pad is not None and pad % (2 * cp):
        raise ArgumentError(
            f"--sft-pad-granularity {pad} must be a multiple of 2 x --context-parallel-size "
            f"({2 * cp}): context parallelism cuts every packed sample into 2 x CP chunks"
        )


def _check_sample_padding(args) -> None:
    """--sft-pad-granularity: a positive divisor of --seq-length (a sample as long as the
    sequence must still fit once padded)."""
    pad = getattr(args, "sft_pad_granularity", None)
    if pad is None:
        return
    if pad < 1 or (args.seq_length is not None and args.seq_length % pad):
        raise ArgumentError(
            f"--sft-pad-granularity {pad} must be a positive divisor of --seq-length {args.seq_length}"
        )


def parse_and_validate(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Megatron's parse_args / validate_args / set_global_variables with the steps above.
    Raises ArgumentError (or Megatron's AssertionError/ValueError) naming what is wrong."""

    argv: list[str] = list(sys.argv[1:] if argv is None else argv)
    args = parse_megatron_args(argv, add_trainer_args, PROG)
    given = given_dests(_parser, argv)
    validate_sed_args(args)
    if args.tokenizer_type in TOKENIZER_ALIASES:
        args.tokenizer_type = TOKENIZER_ALIASES[args.tokenizer_type]
    check_load_dirs(args)
    apply_checkpoint_args(args, given)
    resolve_tokenizer_args(args)
    if cpu_backend.is_active():
        _check_cpu_limits(args)
    else:
        _check_gpu_stack(args)
    apply_fusions(args, given)
    _check_plugin_limits(args)
    _check_context_parallel(args)
    _check_sample_padding(args)
    check_model_flags(args)
    _check_schedule(args)
    validate_args(args, {})
    set_global_variables(args)
    return args
