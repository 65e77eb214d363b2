import json

import pytest

from megatron_sed.data.synthetic import (
    NUM_PATHS,
    equations_valid,
    identify_path,
    make_synthetic_math,
    path_signature,
    problem_split,
    write_synthetic_jsonl,
)
from megatron_sed.data.tokenizer import build_tokenizer
from megatron_sed.eval.metrics import is_correct


def test_deterministic_and_seed_dependent():
    a = make_synthetic_math(50, seed=3)
    assert a == make_synthetic_math(50, seed=3)
    assert a != make_synthetic_math(50, seed=4)


def test_train_has_all_distinct_paths_per_problem():
    rows = make_synthetic_math(120, seed=0)
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    assert len(by_problem) == 120 and len(rows) == 120 * NUM_PATHS
    kinds = {r["kind"] for r in rows}
    assert kinds == {"sum", "sub", "buy"}
    for group in by_problem.values():
        assert sorted(r["path_id"] for r in group) == list(range(NUM_PATHS))
        assert len({r["response"] for r in group}) == NUM_PATHS
        assert len({path_signature(r["response"]) for r in group}) == NUM_PATHS
        for r in group:
            # Every path is arithmetically valid, ends in the right boxed answer, and is identified.
            assert equations_valid(r["response"])
            assert r["response"].endswith(f"\\boxed{{{r['answer']}}}")
            assert is_correct(r["response"], r["answer"])  # the grader eval and RL use
            assert identify_path(r, r["response"]) == r["path_id"]
            a, b, c = r["nums"]
            expected = {"sum": a + b + c, "sub": a - b - c, "buy": a * b + c}[r["kind"]]
            assert int(r["answer"]) == expected > 0


def test_test_split_is_disjoint_and_single_reference():
    train = make_synthetic_math(300, seed=1)
    test = make_synthetic_math(100, seed=1, split="test")
    assert len(test) == 100 and all(r["path_id"] == 0 for r in test)
    assert not {r["problem_id"] for r in train} & {r["problem_id"] for r in test}
    assert all(problem_split(r["kind"], tuple(r["nums"])) == "test" for r in test)
    # Different seeds still never leak test problems into train.
    other = make_synthetic_math(300, seed=99)
    assert not {r["problem_id"] for r in other} & {r["problem_id"] for r in test}


def test_sequences_fit_a_tiny_byte_model():
    tok = build_tokenizer("byte")
    for r in make_synthetic_math(200, seed=5):
        ids, _ = tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}]
        )
        assert len(ids) < 160


def test_path_helpers_on_generated_text():
    row = make_synthetic_math(1, seed=2)[0]
    noisy = "  " + row["paths"][2].replace("=", " = ") + " done"
    assert identify_path(row, noisy) == 2
    assert identify_path(row, "I think it is \\boxed{3}") is None
    assert identify_path(row["paths"], row["paths"][1]) == 1
    assert not equations_valid("2+2=5.")
    # A wrong answer on a known path is still the path, but not correct.
    wrong = row["paths"][0].replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 1}}}")
    assert identify_path(row, wrong) == 0 and not is_correct(wrong, row["answer"])


def test_write_jsonl(tmp_path):
    path = tmp_path / "sub" / "syn.jsonl"
    n = write_synthetic_jsonl(str(path), 10, seed=0, split="test")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(rows) == 10 and rows == make_synthetic_math(10, seed=0, split="test")
    assert [p.name for p in path.parent.iterdir()] == ["syn.jsonl"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_synthetic_math(5, split="dev")
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_math(5, kinds=("div",))
    with pytest.raises(ValueError, match="distinct"):
        make_synthetic_math(2000, split="test", max_value=6)


def test_write_synthetic_corpus_feeds_the_reader(tmp_path):
    from megatron_sed.data.reader import build_sft_datasets
    from megatron_sed.data.synthetic import write_synthetic_corpus

    prefix = str(tmp_path / "syn")
    meta = write_synthetic_corpus(prefix, 20, seed=0, system_prompt="math")
    assert meta["num_samples"] == 20 * NUM_PATHS and meta["tokenizer"]["type"] == "byte"
    train, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=256, seed=0)
    tok = build_tokenizer("byte")
    sample = train[0]
    sup = sample["labels"][sample["loss_mask"] == 1].tolist()
    text = tok.detokenize(sup)
    rows = make_synthetic_math(20, seed=0)
    assert any(r["response"] in text for r in rows) and "\\boxed{" in text and "How many" not in text
