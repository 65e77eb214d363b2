"""The trainer's command line: Megatron-LM's argument names for what it supports, plus
the SED flags (megatron_sed.arguments.add_sed_args) and the data flags
(megatron_sed.data.arguments.add_data_args). `validate_args` fails early with messages
that name the flags, and fills the derived fields Megatron users know
(data_parallel_size, num_microbatches, padded_vocab_size is set once the tokenizer is known).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megatron_sed.arguments import add_sed_args, validate_sed_args
from megatron_sed.data.arguments import add_data_args, validate_data_args


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flags."""


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="Default 4 x --hidden-size (with --swiglu: 8/3 x, rounded up to 64, as Megatron-LM).")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"),
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.1/3.2 RoPE frequency scaling (set by converted checkpoints).")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None)
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default=None,
                   help="Default: transformer_engine on GPUs where Transformer Engine imports, "
                   "local otherwise (Megatron-Core's local spec with torch SDPA attention).")
    g.add_argument("--use-cpu-initialization", action="store_true")


def _add_parallel_args(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="Default: nccl on GPUs, gloo on CPU.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (megatron-sed extension).")


def _add_training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Default: micro-batch-size x data-parallel size.")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                   default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="Normalise the loss by the supervised tokens of the whole global batch "
                   "(default, as Megatron: mean over micro-batches of per-micro-batch token means).")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default=None,
                   help="FP8 training through Transformer Engine (GPU only).")
    g.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"), default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"), default="max")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)


def _add_run_args(p):
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None, help="Default: no periodic evaluation.")
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="With --load: weights only, start at iteration 0 with a fresh optimizer.")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Exit (after saving when --save is set) once iteration %% N == 0.")
    g.add_argument("--metrics-file", type=str, default=None,
                   help="Write one JSON line per --log-interval (and per evaluation) to this file.")
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--synthetic-num-problems", type=int, default=400,
                   help="Without --data-path: problems of the built-in synthetic math SFT set.")
    g.add_argument("--synthetic-cache-dir", type=str, default=None,
                   help="Where the built-in synthetic set is preprocessed (default: a temp dir).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-sed-train",
        description="SFT with --loss-type ce|sed on Megatron-Core GPTModel (torchrun / srun).",
    )
    _add_model_args(p)
    _add_parallel_args(p)
    _add_training_args(p)
    _add_run_args(p)
    add_sed_args(p)
    add_data_args(p)
    return p


def _divisible(a, b, what):
    if b <= 0 or a % b:
        raise ArgumentError(what)


def validate_args(args: argparse.Namespace, world_size: int, cuda: Optional[bool] = None) -> argparse.Namespace:
    """Check flags against each other and the world size; fill derived fields."""
    import torch

    from megatron_sed.model.specs import default_transformer_impl, te_available

    if cuda is None:
        cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        raise ArgumentError("--device cuda but no GPU is visible")
    on_cpu = args.device == "cpu"
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--micro-batch-size", args.micro_batch_size), ("--num-layers", args.num_layers),
                    ("--hidden-size", args.hidden_size), ("--num-attention-heads", args.num_attention_heads),
                    ("--seq-length", args.seq_length), ("--train-iters", args.train_iters),
                    ("--log-interval", args.log_interval)):
        if v < 1:
            raise ArgumentError(f"{flag} must be >= 1, got {v}")
    _divisible(world_size, tp * pp,
               f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
               f"--pipeline-model-parallel-size ({pp})")
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)
    dp = args.data_parallel_size
    if pp > 1 and on_cpu:
        raise ArgumentError(
            f"--pipeline-model-parallel-size {pp} needs GPUs: Megatron-Core's pipeline schedules "
            "hard-code CUDA; on CPU use --pipeline-model-parallel-size 1 (TP and DP work)"
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.sequence_parallel and on_cpu:
        raise ArgumentError(
            "--sequence-parallel needs GPUs: Megatron-Core's sequence-parallel collectives "
            "allocate on CUDA; drop --sequence-parallel on CPU"
        )
    _divisible(args.num_attention_heads, tp,
               f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
               f"--tensor-model-parallel-size ({tp})")
    if args.kv_channels is None:
        _divisible(args.hidden_size, args.num_attention_heads,
                   f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
                   f"({args.num_attention_heads}) (or set --kv-channels)")
    if args.group_query_attention:
        q = args.num_query_groups
        if q < 1:
            raise ArgumentError(f"--num-query-groups must be >= 1, got {q}")
        _divisible(args.num_attention_heads, q,
                   f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
                   f"--num-query-groups ({q})")
        _divisible(q, tp, f"--num-query-groups ({q}) must be divisible by --tensor-model-parallel-size ({tp})")
    else:
        args.num_query_groups = args.num_attention_heads
    if args.ffn_hidden_size is None:
        if args.swiglu:  # Megatron-LM's default for SwiGLU
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64 or 64
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    _divisible(args.ffn_hidden_size, tp,
               f"--ffn-hidden-size ({args.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        raise ArgumentError(f"--max-position-embeddings ({args.max_position_embeddings}) must be >= "
                            f"--seq-length ({args.seq_length}) with learned_absolute positions")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _divisible(args.global_batch_size, args.micro_batch_size * dp,
               f"--global-batch-size ({args.global_batch_size}) must be divisible by --micro-batch-size "
               f"({args.micro_batch_size}) x data-parallel size ({dp} = world size {world_size} / "
               f"(TP {tp} x PP {pp}))")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
    if on_cpu and args.fp16:
        raise ArgumentError("--fp16 needs GPUs (loss scaling); use --bf16 or fp32 on CPU")
    if args.transformer_impl is None:
        args.transformer_impl = default_transformer_impl() if not on_cpu else "local"
    if args.transformer_impl == "transformer_engine" and (on_cpu or not te_available()):
        raise ArgumentError("--transformer-impl transformer_engine needs GPUs and Transformer Engine "
                            "(pip install 'megatron-sed[gpu]'); use --transformer-impl local")
    if args.fp8_format is not None:
        if on_cpu or not te_available():
            raise ArgumentError("--fp8-format needs Transformer Engine on GPUs (not importable here); "
                                "drop --fp8-format or install transformer-engine")
        if args.transformer_impl != "transformer_engine":
            raise ArgumentError("--fp8-format needs --transformer-impl transformer_engine")
        if not (args.bf16 or args.fp16):
            raise ArgumentError("--fp8-format needs --bf16 (or --fp16) as the higher-precision type")
    if (pp > 1 and args.pack and args.transformer_impl == "transformer_engine"
            and args.micro_batch_size > 1):
        # Packed samples go to TE as one THD row of micro-batch x seq-length tokens; the
        # pipeline's p2p buffers are sized [seq-length, micro-batch, hidden].
        raise ArgumentError("packed sequences with --pipeline-model-parallel-size > 1 need "
                            "--micro-batch-size 1 (or --no-pack)")
    if args.use_distributed_optimizer and on_cpu:
        raise ArgumentError("--use-distributed-optimizer needs GPUs (Megatron-Core's "
                            "DistributedOptimizer hard-codes CUDA); drop it on CPU")
    for flag, v in (("--hidden-dropout", args.hidden_dropout), ("--attention-dropout", args.attention_dropout)):
        if not 0.0 <= v < 1.0:
            raise ArgumentError(f"{flag} must lie in [0, 1), got {v}")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ArgumentError(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr}) and --lr > 0")
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.train_iters:
        raise ArgumentError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must lie in [0, --train-iters "
                            f"({args.train_iters})]")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be < --lr-decay-iters "
                            f"({args.lr_decay_iters}, default --train-iters)")
    if args.clip_grad < 0:
        raise ArgumentError(f"--clip-grad must be >= 0, got {args.clip_grad}")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.save_interval is not None and args.save_interval < 1:
        raise ArgumentError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.finetune and not args.load:
        raise ArgumentError("--finetune needs --load DIR")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise ArgumentError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.distributed_backend is None:
        args.distributed_backend = "gloo" if on_cpu else "nccl"
    try:
        validate_sed_args(args)
        validate_data_args(args)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    return args


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               cuda: Optional[bool] = None) -> argparse.Namespace:
    """Parse and validate (world size from $WORLD_SIZE unless given)."""
    import os

    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # --load of a converted HF model: model shape and tokenizer from its metadata.
    from megatron_sed.convert.metadata import apply_converted_checkpoint_args

    try:
        apply_converted_checkpoint_args(args, argv, parser)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return validate_args(args, world_size, cuda=cuda)
