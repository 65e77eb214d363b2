"""Accuracy and diversity metrics for sampled completions.

Everything here is pure Python (plus sacrebleu): the sampler produces texts, these
functions score them. Conventions:

- Diversity is measured *within* the n samples of one prompt (how different are the
  model's answers to the same question) and then averaged over prompts.
- Self-BLEU is on sacrebleu's 0-100 scale: lower = more diverse.
- distinct-n is unique n-grams / total n-grams over whitespace tokens: higher = more diverse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import sacrebleu

# ----------------------------------------------------------------------------- accuracy


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct
    (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as a running product so large n does not overflow:
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must lie in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must lie in [1, n={n}], got {k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def avg_at_n(correct: Sequence[bool]) -> float:
    """avg@n: the fraction of the n samples of one prompt that are correct."""
    if len(correct) == 0:
        raise ValueError("avg_at_n: no samples")
    return sum(bool(c) for c in correct) / len(correct)


_BOXED = "\\boxed"


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` in `text` (braces matched, so `\\boxed{\\frac{1}{2}}`
    gives `\\frac{1}{2}`), or None when there is none or it is unterminated."""
    start = text.rfind(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            return None  # unterminated: the model ran out of tokens
        start = text.rfind(_BOXED, 0, start)
    return None


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def normalize_answer(ans: str) -> str:
    """Canonical form for exact-match scoring: no spaces, no thousands commas, no
    surrounding `$`, numbers in canonical decimal form (`07`, `7.0` -> `7`)."""
    s = ans.strip().strip("$").replace(" ", "").replace(",", "")
    s = s.replace("\\!", "").replace("{,}", "")
    if _NUMBER.match(s):
        value = float(s)
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    return s


def is_correct(response: str, reference: str) -> bool:
    """Exact match of the response's last `\\boxed{}` answer with the reference answer
    (which may itself be given bare or boxed)."""
    pred = extract_boxed(response)
    if pred is None:
        return False
    ref = extract_boxed(reference)
    ref = reference if ref is None else ref
    return normalize_answer(pred) == normalize_answer(ref)


# ----------------------------------------------------------------------------- diversity


def self_bleu(texts: Sequence[str], tokenize: str = "13a") -> float:
    """Self-BLEU (Zhu et al. 2018): the mean over i of sentence BLEU of texts[i] against all
    the other texts as references, on sacrebleu's 0-100 scale. Lower = more diverse.
    Identical texts give 100."""

    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least 2 texts, got {len(texts)}")
    scores = []
    for i, hyp in enumerate(texts):
        refs = [t for j, t in enumerate(texts) if j != i]
        scores.append(sacrebleu.sentence_bleu(hyp, refs, tokenize=tokenize).score)
    return sum(scores) / len(scores)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """distinct-n (Li et al. 2016): number of unique n-grams / total number of n-grams over
    all texts (whitespace tokens). 1.0 = no n-gram repeats; 0.0 when there are no n-grams."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"distinct_n: n must be an int >= 1, got {n!r}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(text.split(), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def distinct_correct_paths(paths: Sequence[object], correct: Sequence[bool]) -> int:
    """Number of different solution paths among the correct samples of one prompt
    (a path is any hashable id; None = not recognised, not counted)."""
    if len(paths) != len(correct):
        raise ValueError(f"distinct_correct_paths: {len(paths)} paths vs {len(correct)} flags")
    return len({p for p, c in zip(paths, correct) if c and p is not None})


def mean_token_entropy(entropy_sums: Sequence[float], num_tokens: Sequence[int]) -> float:
    """Token-weighted mean entropy (nats) over all generated tokens, from per-sample sums."""
    if len(entropy_sums) != len(num_tokens):
        raise ValueError("mean_token_entropy: entropy_sums and num_tokens differ in length")
    total = sum(num_tokens)
    return sum(entropy_sums) / total if total else 0.0


# ----------------------------------------------------------------------------- aggregation


def summarize_groups(groups: Sequence[dict], ks: Sequence[int] = (1, 4, 8)) -> dict:
    """Aggregate per-prompt results into one metrics dict.

    Each group is {"samples": [{"text", "correct", "path", "num_tokens", "entropy_sum",
    "first_token_entropy"}]} holding the n samples of one prompt ("path" and the entropy
    fields may be absent).
    Accuracy (avg@n) and pass@k are means over prompts; diversity metrics are computed
    within each prompt's samples and then averaged over prompts.
    """
    if not groups:
        raise ValueError("summarize_groups: no prompts")
    ns = {len(g["samples"]) for g in groups}
    if len(ns) != 1 or 0 in ns:
        raise ValueError(f"summarize_groups: every prompt needs the same n >= 1 samples, got {ns}")
    n = ns.pop()
    ks = sorted({k for k in ks if 1 <= k <= n})
    acc, sbleu, d1, d2, paths, all_paths, first_ent, ent_sum, ntok = [], [], [], [], [], [], [], [], []
    pass_k = {k: [] for k in ks}
    for g in groups:
        samples = g["samples"]
        texts = [s["text"] for s in samples]
        correct = [bool(s["correct"]) for s in samples]
        acc.append(avg_at_n(correct))
        for k in ks:
            pass_k[k].append(pass_at_k(n, sum(correct), k))
        if n >= 2:
            sbleu.append(self_bleu(texts))
        d1.append(distinct_n(texts, 1))
        d2.append(distinct_n(texts, 2))
        paths.append(distinct_correct_paths([s.get("path") for s in samples], correct))
        # every recognised path, right or wrong: how many ways of starting a prompt's samples took
        all_paths.append(distinct_correct_paths([s.get("path") for s in samples], [True] * n))
        if "first_token_entropy" in samples[0]:
            first_ent.append(float(samples[0]["first_token_entropy"]))
        ent_sum.extend(float(s.get("entropy_sum", 0.0)) for s in samples)
        ntok.extend(int(s.get("num_tokens", 0)) for s in samples)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    out = {
        "num_prompts": len(groups),
        "samples_per_prompt": n,
        "accuracy": mean(acc),
        **{f"pass@{k}": mean(v) for k, v in pass_k.items()},
        "self_bleu": mean(sbleu),
        "distinct_1": mean(d1),
        "distinct_2": mean(d2),
        "distinct_correct_paths": mean(paths),
        "distinct_paths": mean(all_paths),
        "first_token_entropy": mean(first_ent),
        "mean_token_entropy": mean_token_entropy(ent_sum, ntok),
        "mean_response_tokens": sum(ntok) / (len(groups) * n),
    }
    return out
