"""Markdown table of evaluation results grouped by label: mean ± sample std over seeds,
and the min-max range.

    python -m megatron_sed.eval report runs/*.json [--output table.md]
"""

from __future__ import annotations

import argparse
import math
import sys

from megatron_sed.eval.plot import group_by_label, load_runs
from megatron_sed.utils.files import atomic_write_text

COLUMNS = [
    ("accuracy", "acc avg@n", 100.0),
    ("pass@1", "pass@1", 100.0),
    ("pass@4", "pass@4", 100.0),
    ("pass@8", "pass@8", 100.0),
    ("self_bleu", "Self-BLEU ↓", 1.0),
    ("distinct_1", "distinct-1", 1.0),
    ("distinct_2", "distinct-2", 1.0),
    ("distinct_correct_paths", "correct paths", 1.0),
    ("distinct_paths", "paths", 1.0),
    ("first_token_entropy", "1st-token entropy", 1.0),
    ("mean_token_entropy", "entropy (nats)", 1.0),
]


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def table(runs) -> str:
    groups = group_by_label(runs)
    cols = [c for c in COLUMNS if any(c[0] in m for ms in groups.values() for m in ms)]
    lines = ["| run | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, ms in groups.items():
        cells = []
        for key, _, scale in cols:
            vals = [m[key] * scale for m in ms if key in m and m[key] == m[key]]
            if not vals:
                cells.append("n/a")
                continue
            mean, std = mean_std(vals)
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(vals) > 1 else f"{mean:.2f}")
        lines.append(f"| {label} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="megatron-sed-eval report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+")
    p.add_argument("--output", default=None, help="write the table here (default: stdout)")
    args = p.parse_args(argv)
    try:
        text = table(load_runs(args.results))
    except ValueError as err:
        p.error(str(err))
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
