"""The opt-in "add3" kind: three paths that branch on the first response token."""

from megatron_sed.data.synthetic import (
    NUM_PATHS,
    equations_valid,
    identify_path,
    make_synthetic_math,
    problem_split,
)


def test_add3_paths_branch_on_the_first_token_and_are_valid():
    rows = make_synthetic_math(200, seed=5, kinds=("add3",), max_value=9)
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    assert len(by_problem) == 200 and len(rows) == 200 * NUM_PATHS
    for group in by_problem.values():
        a, b, c = group[0]["nums"]
        assert group[0]["kind"] == "add3" and all(1 <= x <= 9 for x in (a, b, c))
        assert str(a + b + c) == group[0]["answer"]
        # Path i starts with operand i: the first token decides the path.
        assert [r["response"][0] for r in sorted(group, key=lambda r: r["path_id"])] == [
            str(a),
            str(b),
            str(c),
        ]
        for r in group:
            assert equations_valid(r["response"])
            assert r["response"].endswith(f"\\boxed{{{a + b + c}}}")
            assert identify_path(r, r["response"]) == r["path_id"]
            assert problem_split("add3", tuple(r["nums"])) == "train"
            assert "How many" in r["question"]


def test_add3_test_split_is_held_out_and_default_mix_unchanged():
    test = make_synthetic_math(50, seed=5, split="test", kinds=("add3",), max_value=9)
    train = make_synthetic_math(400, seed=6, kinds=("add3",), max_value=9)
    assert len(test) == 50 and {r["path_id"] for r in test} == {0}
    assert not {r["problem_id"] for r in test} & {r["problem_id"] for r in train}
    # Opt-in only: the default mix never draws it.
    assert "add3" not in {r["kind"] for r in make_synthetic_math(200, seed=0)}
