"""Deterministic offline synthetic math SFT set with several solution paths per problem.

Each problem is a short arithmetic word problem over three numbers. It has ``NUM_PATHS``
distinct, valid solution paths (different orders of summation / decomposition), each a
chain of equations ``x op y = z.`` ending in ``\\boxed{answer}``. The training split holds
every path of every problem (one row per path); the test split holds problems whose
numbers never occur in the training split (the split is decided by a hash of the problem's
kind and numbers, not by the seed), with the reference path and all valid paths attached.

Answers are graded by megatron_sed.eval.metrics (`is_correct`, the one grader the
evaluation and the RL reward use); :func:`identify_path` (or :func:`path_signature` for
paths outside the known set) counts distinct correct solution paths. Problem + response stay under ~160 bytes so a tiny byte-level model can
learn the set on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from typing import Optional

from megatron_sed.utils.files import atomic_write_text

NUM_PATHS = 3
KINDS = ("sum", "sub", "buy")  # the default mix
# Opt-in kinds (pass ``kinds=``). "add3": a + b + c with operands in [1, max_value], whose
# three paths start with a, b and c respectively, so the path is chosen by ONE token with
# three options (top-2 mass ~2/3 in a model that knows all paths: the kind of branching
# token SED's top-k mask selects). With max_value=9 a tiny model learns it on a CPU.
EXTRA_KINDS = ("add3", "pick3")
# "pick3" (an exploration task for RL, see docs/rl.md): numbers a, b, c (distinct, distinct
# first characters) and a target t; the response adds two of them and subtracts the third.
# Path k subtracts the k-th of the three choices and starts with a different number, so
# ONE first token decides it; exactly one choice reaches t and is the row's path 0 (the
# correct one), the other two box a wrong result. Train rows hold all three choices
# (the "initial-model data": first-token entropy ln 3 = 1.10 nats, 1/3 right);
# ``paths_per_problem=1`` keeps only the correct choice (the "one-path SFT data").

_NAMES = ("Ann", "Ben", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jo", "Kim", "Lu", "Max")
_ITEMS = ("apples", "pens", "coins", "books", "eggs", "cards", "shells", "stamps")

# Fraction of the (kind, numbers) space reserved for the held-out split.
_TEST_BUCKETS = 10  # 1 in 10 problem keys is a test problem.

_EQ_RE = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(-?\d+)")


def _key_hash(kind: str, nums: tuple[int, ...]) -> int:
    digest = hashlib.sha256(f"{kind}:{','.join(map(str, nums))}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def problem_split(kind: str, nums: tuple[int, ...]) -> str:
    """``"test"`` or ``"train"``: a fixed function of the problem, so splits never overlap."""
    return "test" if _key_hash(kind, nums) % _TEST_BUCKETS == 0 else "train"


def _pick3_choices(a: int, b: int, c: int) -> list[tuple[int, int, int]]:
    """The three (first, second, subtracted) choices in cyclic order: choice k subtracts
    the k-th number and starts with the next one, so the three choices start with three
    different numbers (b, c, a): the first response token tells which was taken."""
    return [(b, c, a), (c, a, b), (a, b, c)]


def _sample_pick3(rng: random.Random, max_value: int) -> tuple[int, int, int, int]:
    """(a, b, c, t): distinct numbers whose first characters differ (a one-token choice for
    a byte tokenizer) and the target of one uniformly drawn choice, t >= 1."""
    while True:
        a, b, c = (rng.randint(1, max_value) for _ in range(3))
        if len({str(a)[0], str(b)[0], str(c)[0]}) < 3:
            continue
        x, y, z = _pick3_choices(a, b, c)[rng.randrange(3)]
        if x + y - z >= 1:
            return a, b, c, x + y - z


def _sample_nums(kind: str, rng: random.Random, max_value: int) -> tuple[int, ...]:
    if kind == "pick3":
        return _sample_pick3(rng, max_value)
    if kind == "add3":  # a + b + c, small operands
        return tuple(rng.randint(1, max_value) for _ in range(3))  # type: ignore[return-value]
    if kind == "sum":  # a + b + c
        return tuple(rng.randint(2, max_value) for _ in range(3))  # type: ignore[return-value]
    if kind == "sub":  # a - b - c with a result >= 1
        b, c = rng.randint(1, max_value // 2), rng.randint(1, max_value // 2)
        a = rng.randint(b + c + 1, b + c + max_value)
        return a, b, c
    if kind == "buy":  # n boxes of k items plus m loose: n*k + m
        return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, max_value)
    raise ValueError(f"unknown problem kind {kind!r}; expected one of {KINDS + EXTRA_KINDS}")


def _question(kind: str, nums: Sequence[int], name: str, item: str) -> str:
    a, b, c = nums[:3]
    if kind == "pick3":
        return (
            f"{name} has {item} numbered {a}, {b} and {c}. Add two and take away the third to make {nums[3]}."
        )
    if kind in ("sum", "add3"):
        return f"{name} has {a} {item}, gets {b} more, then {c} more. How many {item} now?"
    if kind == "sub":
        return f"{name} has {a} {item}, gives away {b}, then {c} more. How many {item} are left?"
    return f"{name} buys {a} boxes of {b} {item} and {c} loose {item}. How many {item} in all?"


def _equations(kind: str, nums: Sequence[int]) -> list[list[tuple[int, str, int, int]]]:
    """The ``NUM_PATHS`` solution paths, each a list of equations ``(x, op, y, z)``."""
    if kind == "pick3":  # the correct choice first (path 0), then the others in cyclic order
        choices = _pick3_choices(*nums[:3])
        right = next(k for k, (x, y, z) in enumerate(choices) if x + y - z == nums[3])
        order = [right] + [k for k in range(3) if k != right]
        return [[(x, "+", y, x + y), (x + y, "-", z, x + y - z)] for x, y, z in (choices[k] for k in order)]
    a, b, c = nums
    if kind == "add3":  # each path starts with a different operand
        return [
            [(a, "+", b, a + b), (a + b, "+", c, a + b + c)],
            [(b, "+", c, b + c), (b + c, "+", a, a + b + c)],
            [(c, "+", a, a + c), (a + c, "+", b, a + b + c)],
        ]
    if kind == "sum":
        return [
            [(a, "+", b, a + b), (a + b, "+", c, a + b + c)],
            [(b, "+", c, b + c), (a, "+", b + c, a + b + c)],
            [(a, "+", c, a + c), (a + c, "+", b, a + b + c)],
        ]
    if kind == "sub":
        return [
            [(a, "-", b, a - b), (a - b, "-", c, a - b - c)],
            [(a, "-", c, a - c), (a - c, "-", b, a - b - c)],
            [(b, "+", c, b + c), (a, "-", b + c, a - b - c)],
        ]
    # buy: a boxes of b items plus c loose
    return [
        [(a, "*", b, a * b), (a * b, "+", c, a * b + c)],
        [(b, "*", a, a * b), (c, "+", a * b, a * b + c)],
        # decompose a = (a - 1) + 1: the last box is counted with the loose items
        [(b, "+", c, b + c), (a - 1, "*", b, (a - 1) * b), ((a - 1) * b, "+", b + c, a * b + c)],
    ]


def _answer(kind: str, nums: Sequence[int]) -> int:
    return _equations(kind, nums)[0][-1][-1]  # path 0 is correct for every kind (pick3 too)


def _render(equations: Sequence[tuple[int, str, int, int]]) -> str:
    body = " ".join(f"{x}{op}{y}={z}." for x, op, y, z in equations)
    return f"{body} \\boxed{{{equations[-1][-1]}}}"


def solution_paths(kind: str, nums: Sequence[int]) -> list[str]:
    """All valid solution texts of a problem, indexed by path id."""
    return [_render(eqs) for eqs in _equations(kind, tuple(nums))]


def make_synthetic_math(
    num_problems: int,
    seed: int = 1234,
    split: str = "train",
    max_value: int = 20,
    kinds: Sequence[str] = KINDS,
    paths_per_problem: Optional[int] = None,
) -> list[dict]:
    """Generate ``num_problems`` distinct problems of ``split`` deterministically from ``seed``.

    Rows: ``question``, ``response``, ``answer`` (str), ``path_id`` (int), ``problem_id``,
    ``kind``, ``nums``, ``num_paths``, ``paths`` (every valid response, by path id).
    pick3 rows also carry ``correct`` (whether the row's response reaches the answer;
    only path 0 does). ``split="train"``: one row per (problem, path) for the first ``paths_per_problem``
    paths (default: all ``NUM_PATHS``). ``split="test"``: one row per problem holding the
    reference path 0. Train and test problems never share (kind, numbers).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    for kind in kinds:
        if kind not in KINDS + EXTRA_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; expected some of {KINDS + EXTRA_KINDS}")
    if max_value < 4:
        raise ValueError(f"max_value must be >= 4, got {max_value}")
    n_paths = NUM_PATHS if paths_per_problem is None else paths_per_problem
    if not 1 <= n_paths <= NUM_PATHS:
        raise ValueError(f"paths_per_problem must be in [1, {NUM_PATHS}], got {paths_per_problem}")

    rng = random.Random(f"megatron-sed-synthetic:{seed}:{split}")
    seen = set()
    rows: list[dict] = []
    misses = 0  # consecutive draws that gave no new problem: the space is (nearly) exhausted
    while len(seen) < num_problems:
        misses += 1
        if misses > 20000:
            raise ValueError(
                f"cannot draw {num_problems} distinct {split} problems with max_value={max_value}; "
                "raise max_value or lower num_problems"
            )
        kind = kinds[rng.randrange(len(kinds))]
        nums = _sample_nums(kind, rng, max_value)
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if problem_split(kind, nums) != split or (kind, nums) in seen:
            continue
        paths = solution_paths(kind, nums)
        if len({path_signature(p) for p in paths}) != NUM_PATHS:
            continue  # e.g. b == c makes two summation orders identical: paths must be countable
        seen.add((kind, nums))
        misses = 0
        question = _question(kind, nums, name, item)
        problem_id = f"{kind}-{'-'.join(map(str, nums))}"
        path_ids = range(n_paths) if split == "train" else [0]
        for pid in path_ids:
            rows.append(
                {
                    "question": question,
                    "response": paths[pid],
                    "answer": str(_answer(kind, nums)),
                    "path_id": pid,
                    "problem_id": problem_id,
                    "kind": kind,
                    "nums": list(nums),
                    "num_paths": NUM_PATHS,
                    "paths": paths,
                    **({"correct": pid == 0} if kind == "pick3" else {}),
                }
            )
    return rows


def path_signature(response: str) -> tuple[tuple[int, str, int, int], ...]:
    """The ordered tuple of equations ``(x, op, y, z)`` written in a response.

    Two responses follow the same solution path iff their signatures are equal; this
    counts paths even outside the known set (used by the evaluation's distinct-paths metric).
    """
    return tuple((int(x), op, int(y), int(z)) for x, op, y, z in _EQ_RE.findall(response))


def equations_valid(response: str) -> bool:
    """True when the response has at least one equation and every equation is arithmetically true."""
    sig = path_signature(response)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    return bool(sig) and all(ops[op](x, y) == z for x, op, y, z in sig)


def identify_path(row_or_paths, response: str) -> Optional[int]:
    """Path id of ``response`` among the problem's known paths, or None.

    ``row_or_paths`` is a row from :func:`make_synthetic_math` (uses its ``paths``) or a
    list of path texts. Matching is on the equation sequence, so spacing does not matter.
    """
    paths = row_or_paths["paths"] if isinstance(row_or_paths, dict) else row_or_paths
    sig = path_signature(response)
    if not sig:
        return None
    for pid, text in enumerate(paths):
        if path_signature(text) == sig:
            return pid
    return None


def write_synthetic_jsonl(path: str, num_problems: int, seed: int = 1234, split: str = "train", **kw) -> int:
    """Write :func:`make_synthetic_math` rows to ``path`` as JSON lines (atomically); returns the row count."""
    rows = make_synthetic_math(num_problems, seed=seed, split=split, **kw)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def write_synthetic_corpus(
    output_prefix: str,
    num_problems: int,
    seed: int = 1234,
    split: str = "train",
    tokenizer_type: str = "byte",
    tokenizer_model: Optional[str] = None,
    system_prompt: Optional[str] = None,
    **kw,
) -> dict:
    """Generate the set and preprocess it into a loss-masked indexed corpus at ``output_prefix``.

    Returns the ``PREFIX.json`` metadata; ``build_sft_datasets([output_prefix], ...)`` reads it.
    """
    from megatron_sed.data.preprocess import preprocess_rows  # noqa: PLC0415 (preprocess imports this module)

    rows = make_synthetic_math(num_problems, seed=seed, split=split, **kw)
    keep = ("question", "response")  # only what the chat rendering needs
    return preprocess_rows(
        [{k: r[k] for k in keep} for r in rows],
        output_prefix,
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        system_prompt=system_prompt,
    )


def iter_questions(rows: Iterable[dict]) -> list[dict]:
    """One row per distinct problem (first occurrence), e.g. to build evaluation prompts."""
    seen, out = set(), []
    for row in rows:
        if row["problem_id"] not in seen:
            seen.add(row["problem_id"])
            out.append(row)
    return out


def main(argv=None) -> None:

    p = argparse.ArgumentParser(description="Write the synthetic multi-path math SFT set as JSON lines.")
    p.add_argument("--output", required=True)
    p.add_argument("--num-problems", type=int, default=2000)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-value", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"problem kinds, of {KINDS + EXTRA_KINDS}")
    p.add_argument(
        "--paths-per-problem",
        type=int,
        default=None,
        help="train split: the first N paths of each problem (pick3: 1 = only the correct one)",
    )
    args = p.parse_args(argv)
    n = write_synthetic_jsonl(
        args.output,
        args.num_problems,
        args.seed,
        args.split,
        max_value=args.max_value,
        kinds=tuple(args.kinds),
        paths_per_problem=args.paths_per_problem,
    )
    print(f"wrote {n} rows ({args.num_problems} {args.split} problems) to {args.output}")


if __name__ == "__main__":
    main()
