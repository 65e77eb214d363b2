"""Preprocessing throughput and peak memory on a generated MiroMind-style jsonl.

    python benchmarks/preprocess_bench.py --rows 200000 --workers 1 2 --tokenizers byte hf

Generates question/response rows (reasoning text ending in ``\\boxed{}``), then runs
``python -m megatron_sed.data.preprocess`` in a fresh subprocess per configuration and
prints a markdown table: rows/s, tokens/s, and the peak RSS of the largest process (the
parent or one worker, from ``getrusage(RUSAGE_CHILDREN)``). Run it twice with different
``--rows`` to see that memory does not grow with the corpus. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

WORDS = ("so", "then", "we", "add", "the", "sum", "of", "and", "which", "gives", "check", "carry", "term")


def make_rows(path: str, n: int, mean_chars: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            parts, length = [], 0
            target = rng.randint(mean_chars // 2, mean_chars * 3 // 2)
            while length < target:
                a, b = rng.randint(1, 999), rng.randint(1, 999)
                w = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
                s = f"{w} {a}+{b}={a + b}."
                parts.append(s)
                length += len(s) + 1
            row = {
                "question": f"Problem {i}: what is the total of the numbers below? {rng.randint(1, 10**6)}",
                "response": "<think>" + " ".join(parts) + f"</think> \\boxed{{{rng.randint(1, 9999)}}}",
                "source": "bench",
            }
            line = json.dumps(row) + "\n"
            size += len(line)
            f.write(line)
    return size


def build_hf_tokenizer(directory: str, corpus: str) -> str:
    """A byte-level BPE (8k vocab) trained locally on the first rows, with a ChatML template."""
    from itertools import islice

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_sed.data.tokenizer import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["response"] for line in islice(f, 2000)]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=8000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def run_one(corpus: str, out_prefix: str, tokenizer: str, tok_dir: str, workers: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "megatron_sed.data.preprocess",
        "--input",
        corpus,
        "--output-prefix",
        out_prefix,
        "--tokenizer-type",
        tokenizer,
        "--workers",
        str(workers),
        "--system-prompt",
        "math",
        "--no-progress",
    ]
    if tokenizer == "hf":
        cmd += ["--tokenizer-model", tok_dir]
    # A fresh intermediary per run, so ru_maxrss (a running max over waited-for descendants,
    # workers included) covers this configuration only.
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"preprocess failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    with open(out_prefix + ".json") as f:
        meta = json.load(f)
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx", ".json"):
        os.unlink(out_prefix + suffix)
    # "seconds" in PREFIX.json is the conversion loop only (no interpreter / import start-up).
    loop = meta["seconds"]
    return dict(
        tokenizer=tokenizer,
        workers=workers,
        rows=meta["num_rows"],
        tokens=meta["num_tokens"],
        loop_s=loop,
        wall_s=wall,
        rows_per_s=meta["num_rows"] / loop,
        tokens_per_s=meta["num_tokens"] / loop,
        peak_mib=peak_kib / 1024,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--mean-chars", type=int, default=600, help="Mean response length in characters.")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", default=["byte", "hf"], choices=["byte", "hf"])
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one).")
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="sed_prep_bench_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "bench.jsonl")
    t = time.time()
    size = make_rows(corpus, args.rows, args.mean_chars)
    print(f"generated {args.rows} rows ({size / 2**20:.1f} MiB) in {time.time() - t:.1f}s", file=sys.stderr)
    tok_dir = build_hf_tokenizer(os.path.join(work, "tok"), corpus) if "hf" in args.tokenizers else None

    results = []
    for tokenizer in args.tokenizers:
        for w in args.workers:
            r = run_one(corpus, os.path.join(work, "out"), tokenizer, tok_dir, w)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)

    print(
        f"\n{args.rows} rows, {size / 2**20:.0f} MiB jsonl, mean response {args.mean_chars} chars; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n"
    )
    print("| tokenizer | workers | rows/s | tokens/s | loop s | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        peak = f"{r['peak_mib']:.0f}"
        print(
            f"| {r['tokenizer']} | {r['workers']} | {r['rows_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['loop_s']:.1f} | {r['wall_s']:.1f} | {peak} |"
        )
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
