"""The opt-in "pick3" kind (an exploration task for RL): three first choices, exactly one
of which reaches the target; the initial-model data shows all three, the one-path SFT data
only the correct one."""

import json
import math
from collections import Counter

from megatron_sed.data.synthetic import (
    NUM_PATHS,
    equations_valid,
    identify_path,
    main,
    make_synthetic_math,
    path_signature,
    problem_split,
    write_synthetic_corpus,
)
from megatron_sed.eval.metrics import is_correct

KW = dict(kinds=("pick3",), max_value=9)


def _by_problem(rows):
    out = {}
    for r in rows:
        out.setdefault(r["problem_id"], []).append(r)
    return out


def test_pick3_exactly_one_first_choice_is_right_and_rows_parse():
    rows = make_synthetic_math(150, seed=3, **KW)
    groups = _by_problem(rows)
    assert len(groups) == 150 and len(rows) == 150 * NUM_PATHS
    for group in groups.values():
        a, b, c, t = group[0]["nums"]
        assert len({a, b, c}) == 3 and t >= 1 and group[0]["answer"] == str(t)
        assert f"{a}, {b} and {c}" in group[0]["question"] and f"make {t}." in group[0]["question"]
        right = [r for r in group if is_correct(r["response"], r["answer"])]
        assert len(right) == 1 and right[0]["path_id"] == 0 and right[0]["correct"]
        assert [r["correct"] for r in group] == [r["path_id"] == 0 for r in group]
        # The first response token (a byte) decides the choice: three different ones.
        assert len({r["response"][0] for r in group}) == 3
        for r in group:
            assert equations_valid(r["response"]) and identify_path(r, r["response"]) == r["path_id"]
            (x, op1, y, s), (s2, op2, z, res) = path_signature(r["response"])
            assert (op1, op2, s2) == ("+", "-", s) and sorted((x, y, z)) == sorted((a, b, c))
            assert r["response"].endswith(f"\\boxed{{{res}}}")


def test_pick3_initial_data_has_entropy_over_first_choices_and_sft_data_has_none():
    rows = make_synthetic_math(300, seed=4, **KW)
    first = Counter()
    for group in _by_problem(rows).values():
        # The maximum-likelihood model of these rows puts 1/3 on each first choice.
        counts = Counter(r["response"][0] for r in group)
        first[len(counts)] += 1
        probs = [v / len(group) for v in counts.values()]
        assert -sum(p * math.log(p) for p in probs) >= 0.8  # ln 3 = 1.0986 nats
    assert first == {3: 300}
    assert sum(r["correct"] for r in rows) * 3 == len(rows)  # 1/3 of the first choices are right
    sft = make_synthetic_math(300, seed=4, paths_per_problem=1, **KW)
    assert len(sft) == 300 and all(r["correct"] and r["path_id"] == 0 for r in sft)
    assert [r["problem_id"] for r in sft] == list(_by_problem(rows))  # same problems, one path
    # The correct choice is not always the same position: no shortcut without the target.
    assert len({r["response"][0] == str(r["nums"][1]) for r in sft}) == 2


def test_pick3_deterministic_and_splits_disjoint(tmp_path):
    a = make_synthetic_math(80, seed=9, **KW)
    assert a == make_synthetic_math(80, seed=9, **KW)
    assert a != make_synthetic_math(80, seed=10, **KW)
    test = make_synthetic_math(40, seed=9, split="test", **KW)
    assert len(test) == 40 and {r["path_id"] for r in test} == {0} and all(r["correct"] for r in test)
    train_ids = {r["problem_id"] for r in make_synthetic_math(300, seed=11, **KW)}
    assert not {r["problem_id"] for r in test} & train_ids
    assert all(problem_split("pick3", tuple(r["nums"])) == "test" for r in test)
    assert "pick3" not in {r["kind"] for r in make_synthetic_math(200, seed=0)}  # opt-in only
    # The JSONL CLI and the preprocessing path take the kind.
    out = tmp_path / "p.jsonl"
    main(["--output", str(out), "--num-problems", "5", "--kinds", "pick3", "--max-value", "9"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15 and {r["kind"] for r in rows} == {"pick3"}
    main(
        ["--output", str(out), "--num-problems", "5", "--kinds", "pick3", "--max-value", "9"]
        + ["--paths-per-problem", "1"]
    )
    assert all(json.loads(line)["correct"] for line in out.read_text().splitlines())
    meta = write_synthetic_corpus(str(tmp_path / "corpus"), 6, seed=1, **KW)
    assert meta["num_samples"] == 18
