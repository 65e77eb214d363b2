"""The SFT -> RL report: preconditions and the reading are computed from the files, and
say "within the seed spread" unless every seed of one arm beats every seed of the other."""

from __future__ import annotations

import json

import pytest

from megatron_sed.rl import report


def _write(tmp, name, avg, pas, first_entropy=0.3):
    """An eval JSON after SFT and a GRPO metrics file whose held-out curve is avg/pas."""
    sft = {"self_bleu": 90.0, "distinct_paths": 1.5, "distinct_correct_paths": 1.0}
    sft["first_token_entropy"] = first_entropy
    (tmp / "eval" / f"{name}.json").write_text(json.dumps({"metrics": sft}))
    lines = [json.dumps({"iteration": 1, "reward": 0.5, "mixed_groups": 0.25})]
    lines += [
        json.dumps({"iteration": it, "eval": {"avg@8": a, "pass@8": p}})
        for it, (a, p) in enumerate(zip(avg, pas))
    ]
    (tmp / "rl" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_preconditions_table_and_reading(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "rl").mkdir()
    for s, d in ((1, 0.0), (2, 0.02)):
        _write(tmp_path, f"initial_s{s}", [0.33 + d, 0.60 + d], [0.95, 0.97], first_entropy=1.05)
        _write(tmp_path, f"ce_s{s}", [0.50 + d, 0.55 + d], [0.80, 0.82])
        _write(tmp_path, f"sed_s{s}", [0.45 + d, 0.70 + d], [0.90, 0.93])
        _write(tmp_path, f"sed_nomask_s{s}", [0.44 + d, 0.69 + d], [0.90, 0.91])
    # one initial.json serves every initial_s<seed> RL run
    (tmp_path / "eval" / "initial.json").write_text((tmp_path / "eval" / "initial_s1.json").read_text())
    runs = report.load_runs(tmp_path / "eval", tmp_path / "rl", ["initial", "ce", "sed", "sed_nomask"])
    pre = {what: ok for what, ok, _ in report.preconditions(runs)}
    assert pre == {
        "the initial model explores": True,
        "CE-SFT lowers held-out pass@n": True,
        "RL from the initial model raises accuracy": True,
    }
    lines = report.reading(runs)
    assert lines[0].startswith("after RL (step 1), avg@8: sed 71.0 vs ce 56.0 (+15.0): above, beyond")
    assert "after SFT (RL step 0), avg@8: sed 46.0 vs ce 51.0 (-5.0): below, beyond" in lines[2]
    assert lines[3].endswith("within the seed spread")  # 70, 72 vs 69, 71: they overlap
    assert len(lines) == 4  # no num_prompts in these records: no noise line
    table = report.table(runs)
    assert table.count("\n") == 2 + 4 and "| sed | 2 | 46.0 [45.0, 47.0] |" in table
    dirs = ["--eval-dir", str(tmp_path / "eval"), "--rl-dir", str(tmp_path / "rl")]
    with pytest.raises(SystemExit):  # the preconditions need the initial model
        report.main([*dirs, "--methods", "ce"])
    assert report.main([*dirs, "--methods", "initial", "missing"]) == 2  # names what is missing


def test_a_change_within_the_evaluation_noise_does_not_count(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "rl").mkdir()
    _write(tmp_path, "initial_s1", [0.174, 0.182], [0.797, 0.72], first_entropy=1.5)
    (tmp_path / "eval" / "initial.json").write_text((tmp_path / "eval" / "initial_s1.json").read_text())
    path = tmp_path / "rl" / "initial_s1.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs:
        if "eval" in r:
            r["eval"]["num_prompts"] = 64  # 512 samples: standard error ~1.7 points
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    runs = report.load_runs(tmp_path / "eval", tmp_path / "rl", ["initial"])
    pre = {what: (ok, detail) for what, ok, detail in report.preconditions(runs)}
    ok, detail = pre["RL from the initial model raises accuracy"]
    assert not ok and "(+0.8; 2 x noise 4." in detail, detail
