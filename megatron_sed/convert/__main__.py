"""megatron-sed-convert: HF Llama / Qwen2 <-> Megatron-Core dist checkpoints.

python -m megatron_sed.convert hf-to-mcore --hf DIR --out DIR [--dtype bf16]
python -m megatron_sed.convert mcore-to-hf --load DIR --out DIR [--reference DIR]
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.checkpoint.api import CheckpointException

from megatron_sed.convert.hf_folder import CheckpointError
from megatron_sed.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_sed.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_sed.utils import fallbacks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-sed-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron-Core torch_dist checkpoint")
    a.add_argument(
        "--hf", required=True, help="local HF model folder (config.json + safetensors + tokenizer files)"
    )
    a.add_argument(
        "--out",
        required=True,
        help="output folder (created atomically); use it as megatron_sed.train --load OUT --finetune",
    )
    a.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="checkpoint dtype (auto: the HF weights' dtype)",
    )

    b = sub.add_parser("mcore-to-hf", help="Megatron-Core checkpoint -> HF folder")
    b.add_argument(
        "--load",
        required=True,
        help="checkpoint: a --save folder (with "
        "latest_checkpointed_iteration.txt), release/ or iter_NNNNNNN/",
    )
    b.add_argument("--out", required=True, help="output HF folder (created atomically)")
    b.add_argument(
        "--reference",
        default=None,
        help="where the HF config and tokenizer "
        "come from when --load has no converter metadata: the converted "
        "checkpoint the run started from, or the original HF folder",
    )
    b.add_argument(
        "--tokenizer",
        default=None,
        help="folder to copy tokenizer files from (overrides the one found via metadata / --reference)",
    )
    b.add_argument(
        "--model-type",
        default=None,
        choices=["llama", "qwen2", "qwen3", "qwen3_moe"],
        help="HF architecture for checkpoints without metadata (Megatron-LM's); "
        "default: qwen3_moe with experts, qwen3 with QK-norm, qwen2 with QKV biases, else llama",
    )
    b.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="true vocabulary size when the checkpoint's embedding is padded and there is no metadata",
    )
    b.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="exported dtype (auto: the checkpoint's)",
    )
    b.add_argument("--max-shard-size-gb", type=float, default=5.0)

    for s in (a, b):
        s.add_argument("--force", action="store_true", help="replace an existing --out")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _root_causes(e: CheckpointException):
    for failure in getattr(e, "failures", {}).values():
        # torch wraps each rank's failure as (exception, traceback frames)
        yield failure[0] if isinstance(failure, tuple) else failure


def main(argv=None) -> int:
    fallbacks.report()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            convert_hf_to_mcore(
                args.hf, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress
            )
        else:
            convert_mcore_to_hf(
                args.load,
                args.out,
                reference=args.reference,
                model_type=args.model_type,
                vocab_size=args.vocab_size,
                tokenizer=args.tokenizer,
                dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                force=args.force,
                progress=not args.no_progress,
            )
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"megatron-sed-convert: error: {e}", file=sys.stderr)
        return 2
    except CheckpointException as e:  # a BaseException: torch.distributed.checkpoint I/O
        causes = "; ".join(f"{type(c).__name__}: {c}" for c in _root_causes(e))
        print(
            f"megatron-sed-convert: error: checkpoint I/O failed ({causes}); nothing was written to --out",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
