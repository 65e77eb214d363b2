"""megatron_sed.eval.metrics against hand-computed values and known properties."""

import itertools
import math

import pytest

from megatron_sed.eval.metrics import (
    avg_at_n,
    distinct_correct_paths,
    distinct_n,
    extract_boxed,
    is_correct,
    mean_token_entropy,
    normalize_answer,
    pass_at_k,
    self_bleu,
    summarize_groups,
)


def _pass_at_k_bruteforce(n, c, k):
    """Probability that a uniformly drawn k-subset of n samples holds a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_combinatorics(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_bruteforce(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values_and_large_n():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # pass@1 is the plain accuracy; large n must not overflow
    assert pass_at_k(10000, 2500, 1) == pytest.approx(0.25)
    assert 0.0 < pass_at_k(10000, 3, 100) < 1.0


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_input(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def test_avg_at_n():
    assert avg_at_n([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        avg_at_n([])


def test_extract_boxed_and_scoring():
    assert extract_boxed(r"so 3+4=7. \boxed{7}") == "7"
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"no answer") is None
    assert extract_boxed(r"cut off \boxed{12") is None
    assert normalize_answer(" 1,024 ") == "1024" and normalize_answer("7.0") == "7"
    assert normalize_answer("$07$") == "7" and normalize_answer("0.5") == "0.5"
    assert is_correct(r"x \boxed{42}", "42") and is_correct(r"\boxed{42.0}", r"\boxed{42}")
    assert not is_correct(r"\boxed{41}", "42") and not is_correct("42", "42")


def test_self_bleu_properties():
    same = ["the cat sat on the mat today"] * 4
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue black", "x y z w"]
    assert self_bleu(disjoint) < 5.0
    mixed = [
        "the cat sat on the mat today",
        "the cat sat on the mat now",
        "a dog ran in the park",
        "the cat sat on a mat today",
    ]
    assert self_bleu(disjoint) < self_bleu(mixed) < self_bleu(same)
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_self_bleu_matches_sacrebleu_by_hand():
    import sacrebleu

    texts = ["a b c d e", "a b c x y", "q b c d e"]
    manual = (
        sum(
            sacrebleu.sentence_bleu(t, [u for j, u in enumerate(texts) if j != i]).score
            for i, t in enumerate(texts)
        )
        / 3
    )
    assert self_bleu(texts) == pytest.approx(manual)


def test_distinct_n_hand_values():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 7 total, {a,b,c} 3 unique
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5 total, {ab, ba, bc} 3 unique
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["a"], 2) == 0.0
    assert distinct_n(["p q r", "s t u"], 2) == 1.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_distinct_correct_paths_and_entropy():
    assert distinct_correct_paths([0, 1, 1, 2, None], [True, True, True, False, True]) == 2
    assert distinct_correct_paths([0, 0], [False, False]) == 0
    with pytest.raises(ValueError):
        distinct_correct_paths([0], [True, False])
    assert mean_token_entropy([2.0, 1.0], [3, 1]) == pytest.approx(0.75)
    assert mean_token_entropy([], []) == 0.0


def test_summarize_groups():
    def s(text, correct, path, ent=1.0, nt=2):
        return {"text": text, "correct": correct, "path": path, "entropy_sum": ent, "num_tokens": nt}

    groups = [
        {"samples": [s("a b", True, 0), s("a c", True, 1), s("d e", False, None), s("a b", True, 0)]},
        {
            "samples": [
                s("x y", False, None),
                s("x y", False, None),
                s("x y", True, 2),
                s("z", False, None, 0.0, 1),
            ]
        },
    ]
    out = summarize_groups(groups, ks=(1, 2, 4, 16))
    assert out["accuracy"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert out["pass@1"] == pytest.approx(out["accuracy"])
    assert out["pass@2"] == pytest.approx((pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2)) / 2)
    assert out["pass@4"] == 1.0 and "pass@16" not in out
    assert out["distinct_correct_paths"] == pytest.approx((2 + 1) / 2)
    assert out["distinct_paths"] == pytest.approx((2 + 1) / 2)  # None is not a path
    assert math.isnan(out["first_token_entropy"])  # no sample recorded it
    assert out["mean_token_entropy"] == pytest.approx(7.0 / 15)
    for g, h in zip(groups, (0.5, 1.5)):
        for x in g["samples"]:
            x["first_token_entropy"] = h
    groups[1]["samples"][0]["path"] = 1  # a wrong answer on a recognised path counts for paths
    out = summarize_groups(groups, ks=(1,))
    assert out["first_token_entropy"] == pytest.approx(1.0)
    assert out["distinct_paths"] == pytest.approx((2 + 2) / 2)
    assert out["distinct_1"] == pytest.approx((5 / 8 + 3 / 7) / 2)
    with pytest.raises(ValueError):
        summarize_groups([{"samples": [s("a", True, 0)]}, {"samples": [s("a", True, 0)] * 2}])
