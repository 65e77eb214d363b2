"""Bar charts comparing evaluation runs (the JSON files `python -m megatron_sed.eval` writes).

Runs with the same `label` (e.g. one per seed) are grouped: the bar is their mean, the
error bar their min-max range, and every seed is drawn as a dot.

    python -m megatron_sed.eval plot a.json b.json ... --output docs/results.png
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

from megatron_sed.utils.files import atomic_path

# metric key -> (panel title, direction hint)
DEFAULT_METRICS = OrderedDict(
    [
        ("accuracy", "accuracy avg@n (higher better)"),
        ("pass@8", "pass@8 (higher better)"),
        ("self_bleu", "Self-BLEU (lower = more diverse)"),
        ("distinct_2", "distinct-2 (higher = more diverse)"),
        ("distinct_correct_paths", "distinct correct paths / prompt"),
        ("mean_token_entropy", "mean token entropy, nats"),
    ]
)


def load_runs(paths):
    runs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read evaluation result {p!r}: {err}") from None
        if "metrics" not in data:
            raise ValueError(f"{p!r} is not an evaluation result (no 'metrics')")
        data.setdefault("label", os.path.splitext(os.path.basename(p))[0])
        runs.append(data)
    return runs


def group_by_label(runs):
    groups = OrderedDict()
    for r in runs:
        groups.setdefault(r["label"], []).append(r["metrics"])
    return groups


def plot_runs(runs, output: str, metrics=None, title: str | None = None) -> str:
    import matplotlib  # noqa: PLC0415 (heavy; only for plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (heavy; only for plots)

    metrics = OrderedDict(DEFAULT_METRICS if metrics is None else metrics)
    groups = group_by_label(runs)
    metrics = OrderedDict(
        (k, v) for k, v in metrics.items() if any(k in m for ms in groups.values() for m in ms)
    )
    if not metrics:
        raise ValueError("none of the metrics to plot is present in the results")
    labels = list(groups)
    ncol = min(3, len(metrics))
    nrow = (len(metrics) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes.flat, metrics.items()):
        for i, lab in enumerate(labels):
            vals = [m[key] for m in groups[lab] if key in m]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            ax.bar(
                i,
                mean,
                color=colors[i % len(colors)],
                alpha=0.75,
                yerr=[[mean - min(vals)], [max(vals) - mean]] if len(vals) > 1 else None,
                capsize=4,
            )
            ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(output) as tmp:  # never a half-written PNG
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="megatron-sed-eval plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", help="evaluation JSON files")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        out = plot_runs(load_runs(args.results), args.output, title=args.title)
    except ValueError as err:
        p.error(str(err))
    print(f" > wrote {out}")
