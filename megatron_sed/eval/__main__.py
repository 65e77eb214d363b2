"""python -m megatron_sed.eval (megatron-sed-eval): sample n completions per prompt from a
checkpoint and score accuracy (avg@n, pass@k) and diversity (Self-BLEU, distinct-n,
distinct correct solution paths, mean token entropy). Writes one JSON file; `plot`
compares several, `report` tabulates them. The work is megatron_sed.eval.run.

    python -m megatron_sed.eval --load CKPT --prompts test.jsonl --n 8 --output ce_s1.json
    python -m megatron_sed.eval plot ce_*.json sed_*.json --output results.png
    python -m megatron_sed.eval report ce_*.json sed_*.json --output table.md
"""

from __future__ import annotations

import argparse
import sys

from megatron_sed.checkpointing.layout import CheckpointError
from megatron_sed.eval.prompts import PromptsFileError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-sed-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="checkpoint: a --save dir, or release/ / iter_NNNNNNN/")
    p.add_argument("--iteration", type=int, default=None, help="iteration of a --save dir (default: latest)")
    p.add_argument(
        "--prompts",
        required=True,
        help="JSON lines: question|prompt|messages + answer (+ paths, system); e.g. "
        "`python -m megatron_sed.data.synthetic --split test` output",
    )
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to sample per completion (default: 128 (megatron_sed.eval.run), or fewer "
        "when the model's maximum sequence length leaves less room after the longest prompt)",
    )
    p.add_argument(
        "--pass-k",
        type=int,
        nargs="+",
        default=None,
        help="k values of pass@k, each <= --n (default: 1, 2, 4, ... up to --n)",
    )
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument(
        "--tokenizer-type",
        choices=("byte", "hf"),
        default=None,
        help="default: the one the checkpoint's run trained with",
    )
    p.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    p.add_argument("--chat-template", default=None, help="default: the checkpoint's")
    p.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt for rows without one ('math' preset or text); default: the "
        "checkpoint's --system-prompt, or 'math' when it trained on the built-in synthetic set",
    )
    p.add_argument("--label", default=None, help="run name in the JSON and plots (default: --output's stem)")
    p.add_argument("--output", required=True, help="metrics JSON to write (atomically)")
    p.add_argument("--samples-output", default=None, help="also write every sample as JSON lines")
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        from megatron_sed.eval.plot import main as plot_main  # noqa: PLC0415 (per subcommand: `report` needs neither torch nor Megatron)

        return plot_main(argv[1:])
    if argv and argv[0] == "report":
        from megatron_sed.eval.report import main as report_main  # noqa: PLC0415 (per subcommand: `report` needs neither torch nor Megatron)

        return report_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_sed.eval.run import evaluate  # noqa: PLC0415 (per subcommand: `report` needs neither torch nor Megatron)
    from megatron_sed.utils import fallbacks  # noqa: PLC0415 (after megatron-core's imports)

    fallbacks.report()
    try:
        result = evaluate(args)
    except (CheckpointError, PromptsFileError, ValueError) as err:
        print(f"megatron-sed-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    m = result["metrics"]
    print(
        " > " + " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in m.items()),
        flush=True,
    )
    print(f" > wrote {args.output}")


if __name__ == "__main__":
    main()
