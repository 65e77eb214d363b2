"""The SFT -> RL experiment's report (examples/reproduce_toy.sh): its preconditions, one
table and one plot, from the evaluation JSONs written after SFT (megatron-sed-eval) and
the GRPO metrics files (held-out avg@n / pass@n over RL iterations).

    python -m megatron_sed.rl.report --eval-dir OUT/eval --rl-dir OUT/rl \\
        --methods initial ce sed sed_nomask --table docs/results_table.md --plot docs/results.png

Files: EVAL_DIR/initial.json and EVAL_DIR/{method}_s{seed}.json; RL_DIR/{method}_s{seed}.jsonl
(the initial model's RL runs are RL_DIR/initial_s{seed}.jsonl). Seeds are what is there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from megatron_sed.utils.files import atomic_path, atomic_write_text

ENTROPY_FLOOR = 0.8  # nats: the initial model must explore (issue: >= 0.8; ln 3 = 1.10)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def heldout_curve(path: Path) -> dict[int, dict]:
    """iteration -> the held-out eval record of one GRPO metrics file."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        if "eval" in rec:
            out[int(rec["iteration"])] = rec["eval"]
    if not out:
        raise ValueError(f"{path} has no held-out evaluation (was --eval-interval set?)")
    return out


def mixed_group_share(path: Path) -> float:
    vals = [json.loads(x)["mixed_groups"] for x in path.read_text().splitlines() if '"mixed_groups"' in x]
    return sum(vals) / len(vals) if vals else float("nan")


def load_runs(eval_dir: Path, rl_dir: Path, methods) -> dict[str, list[dict]]:
    """method -> one dict per seed: {"seed", "sft" (eval metrics after SFT), "curve", "mixed"}."""
    runs: dict[str, list[dict]] = {}
    for m in methods:
        per_seed = []
        for path in sorted(rl_dir.glob(f"{m}_s*.jsonl")):
            seed = int(re.fullmatch(rf"{re.escape(m)}_s(\d+)\.jsonl", path.name).group(1))
            sft_json = eval_dir / ("initial.json" if m == "initial" else f"{m}_s{seed}.json")
            per_seed.append(
                {
                    "seed": seed,
                    "sft": _read_json(sft_json)["metrics"],
                    "curve": heldout_curve(path),
                    "mixed": mixed_group_share(path),
                }
            )
        if not per_seed:
            raise ValueError(f"no GRPO metrics for {m!r} in {rl_dir} ({m}_s<seed>.jsonl)")
        runs[m] = per_seed
    return runs


def _stat(values):
    return sum(values) / len(values), min(values), max(values)


def _fmt(values, scale=100.0, digits=1):
    mean, lo, hi = _stat([scale * v for v in values])
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _at(run, it, key):
    return run["curve"][it][key]


def _key(runs, name):
    any_eval = next(iter(next(iter(runs.values()))[0]["curve"].values()))
    return next(k for k in any_eval if k.startswith(name + "@"))


def table(runs) -> str:
    avg, pas = _key(runs, "avg"), _key(runs, "pass")
    last = min(max(r["curve"]) for rs in runs.values() for r in rs)
    head = (
        f"| run | seeds | {avg} RL step 0 | {pas} step 0 | {avg} step {last} | {pas} step {last} "
        "| mixed groups (RL mean) | Self-BLEU ↓ after SFT | paths after SFT | correct paths | 1st-token entropy |"
    )
    lines = [head, "|---|---|" + "---|" * 9]
    for m, rs in runs.items():
        cells = [
            _fmt([_at(r, 0, avg) for r in rs]),
            _fmt([_at(r, 0, pas) for r in rs]),
            _fmt([_at(r, last, avg) for r in rs]),
            _fmt([_at(r, last, pas) for r in rs]),
            _fmt([r["mixed"] for r in rs]),
            _fmt([r["sft"]["self_bleu"] for r in rs], 1.0),
            _fmt([r["sft"]["distinct_paths"] for r in rs], 1.0, 2),
            _fmt([r["sft"]["distinct_correct_paths"] for r in rs], 1.0, 2),
            _fmt([r["sft"]["first_token_entropy"] for r in rs], 1.0, 2),
        ]
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _beyond_spread(a, b) -> str:
    """a vs b (lists over seeds): 'above' / 'below' when every seed of one lies above every
    seed of the other, else 'within the seed spread'."""
    if min(a) > max(b):
        return "above, beyond the seed spread"
    if max(a) < min(b):
        return "below, beyond the seed spread"
    return "within the seed spread"


def _noise(rec: dict, key: str) -> float:
    """A floor for one evaluation's own noise: the binomial standard error over its prompts
    x samples (samples of one prompt are correlated, so the true error is larger); 0 when
    the record does not say how many prompts it had."""
    k = int(rec.get("num_prompts", 0)) * int(key.split("@")[1])
    p = rec[key]
    return (p * (1 - p) / k) ** 0.5 if k else 0.0


def _rises(before: list[dict], after: list[dict], key: str) -> tuple[bool, str]:
    """Whether the mean of `key` rises by more than twice the evaluation noise of the
    difference (and every seed after beats every seed before)."""
    b, a = [r[key] for r in before], [r[key] for r in after]
    d = _stat(a)[0] - _stat(b)[0]
    se = (_noise(before[0], key) ** 2 + _noise(after[0], key) ** 2) ** 0.5
    ok = d > 2 * se and min(a) > max(b)
    return (
        ok,
        f"{100 * _stat(b)[0]:.1f} -> {100 * _stat(a)[0]:.1f} ({100 * d:+.1f}; 2 x noise {200 * se:.1f})",
    )


def preconditions(runs) -> list[tuple[str, bool, str]]:
    """The experiment can only speak to the claim if these hold; each change must exceed
    twice the evaluation noise (and the seed spread) to count."""
    avg, pas = _key(runs, "avg"), _key(runs, "pass")
    out = []
    init = runs["initial"]
    h0 = init[0]["sft"]["first_token_entropy"]
    out.append(
        (
            "the initial model explores",
            h0 >= ENTROPY_FLOOR,
            f"first-token entropy {h0:.3f} nats (>= {ENTROPY_FLOOR})",
        )
    )
    if "ce" in runs:
        # "lowers" = the initial model's pass@n rises above CE's by more than the noise
        ok, detail = _rises([r["curve"][0] for r in runs["ce"]], [r["curve"][0] for r in init], pas)
        out.append(
            ("CE-SFT lowers held-out pass@n", ok, f"{pas} ce {detail.replace(' -> ', ' vs initial ')}")
        )
    last = max(init[0]["curve"])
    ok, detail = _rises([r["curve"][0] for r in init], [r["curve"][last] for r in init], avg)
    out.append(("RL from the initial model raises accuracy", ok, f"{avg} {detail} after {last} iterations"))
    return out


def reading(runs) -> list[str]:
    """The answers the experiment exists for, computed (mean over seeds, min-max spread)."""
    avg, pas = _key(runs, "avg"), _key(runs, "pass")
    last = min(max(r["curve"]) for rs in runs.values() for r in rs)
    out = []

    def cmp(a, b, it, key):
        va, vb = [_at(r, it, key) for r in runs[a]], [_at(r, it, key) for r in runs[b]]
        d = 100 * (_stat(va)[0] - _stat(vb)[0])
        return f"{a} {100 * _stat(va)[0]:.1f} vs {b} {100 * _stat(vb)[0]:.1f} ({d:+.1f}): {_beyond_spread(va, vb)}"

    if "sed" in runs and "ce" in runs:
        out.append(f"after RL (step {last}), {avg}: " + cmp("sed", "ce", last, avg))
        out.append(f"after RL (step {last}), {pas}: " + cmp("sed", "ce", last, pas))
        out.append(f"after SFT (RL step 0), {avg}: " + cmp("sed", "ce", 0, avg))
    if "sed" in runs and "sed_nomask" in runs:
        out.append(f"the mask, after RL, {avg}: " + cmp("sed", "sed_nomask", last, avg))
    # A floor for one evaluation's own noise: the binomial standard error over its
    # prompts x samples (samples of one prompt are correlated, so the true error is larger).
    rec = runs["initial"][0]["curve"][last]
    p, k = rec[avg], int(rec.get("num_prompts", 0)) * int(avg.split("@")[1])
    if k:
        se = 100 * (p * (1 - p) / k) ** 0.5
        out.append(
            f"evaluation noise: one {avg} on {rec['num_prompts']} prompts has a standard error >= {se:.1f} points"
        )
    return out


def plot(runs, path: str) -> None:
    import matplotlib  # noqa: PLC0415 (optional heavy dependency, only for the plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys = [_key(runs, "avg"), _key(runs, "pass")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, keys):
        for m, rs in runs.items():
            its = sorted(set.intersection(*(set(r["curve"]) for r in rs)))
            vals = [[100 * _at(r, it, key) for r in rs] for it in its]
            ax.plot(its, [sum(v) / len(v) for v in vals], marker="o", label=f"{m} -> RL")
            ax.fill_between(its, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        ax.set_xlabel("GRPO iteration")
        ax.set_ylabel(f"held-out {key} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SFT then GRPO on pick3 (mean, min-max over seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_sed.rl.report", description=__doc__)
    p.add_argument("--eval-dir", required=True, type=Path)
    p.add_argument("--rl-dir", required=True, type=Path)
    p.add_argument("--methods", nargs="+", required=True, help="must include 'initial'")
    p.add_argument("--table", default=None, help="write the markdown table (and the reading) here")
    p.add_argument("--plot", default=None, help="write the plot (PNG) here")
    args = p.parse_args(argv)
    if "initial" not in args.methods:
        p.error("--methods must include 'initial' (the preconditions compare against it)")
    try:
        runs = load_runs(args.eval_dir, args.rl_dir, args.methods)
    except ValueError as err:
        print(f"megatron_sed.rl.report: error: {err}", file=sys.stderr)
        return 2
    pre = preconditions(runs)
    text = "Preconditions:\n" + "".join(
        f"- [{'x' if ok else ' '}] {what}: {detail}\n" for what, ok, detail in pre
    )
    text += "\n" + table(runs) + "\nReading (mean over seeds, [min, max]):\n"
    text += "".join(f"- {line}\n" for line in reading(runs))
    print(text)
    if args.table:
        atomic_write_text(args.table, text)
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
