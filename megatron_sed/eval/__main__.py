"""python -m megatron_sed.eval: sample n completions per prompt from a checkpoint and score
accuracy (avg@n, pass@k) and diversity (Self-BLEU, distinct-n, distinct correct solution
paths, mean token entropy). Writes one JSON file; `plot` compares several.

    python -m megatron_sed.eval --load CKPT --prompts test.jsonl --n 8 --output ce_s1.json
    python -m megatron_sed.eval plot ce_*.json sed_*.json --output results.png
    python -m megatron_sed.eval report ce_*.json sed_*.json --output table.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sed-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint: a --save dir, or release/ / iter_NNNNNNN/")
    p.add_argument("--iteration", type=int, default=None, help="iteration of a --save dir (default: latest)")
    p.add_argument("--prompts", required=True,
                   help="JSON lines: question|prompt|messages + answer (+ paths, system); e.g. "
                   "`python -m megatron_sed.data.synthetic --split test` output")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--pass-k", type=int, nargs="+", default=[1, 2, 4, 8], help="k values of pass@k (<= n)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--tokenizer-type", choices=("byte", "hf"), default=None,
                   help="default: the checkpoint's")
    p.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    p.add_argument("--chat-template", default=None, help="default: the checkpoint's")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for rows without one ('math' preset or text); default: the "
                   "checkpoint's --system-prompt, or 'math' when it trained on the built-in synthetic set")
    p.add_argument("--label", default=None, help="run name in the JSON and plots (default: --output's stem)")
    p.add_argument("--output", required=True, help="metrics JSON to write (atomically)")
    p.add_argument("--samples-output", default=None, help="also write every sample as JSON lines")
    return p


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _system_prompt(args, ckpt_args):
    from megatron_sed.data.formats import resolve_system_prompt

    value = args.system_prompt
    if value is None:
        value = getattr(ckpt_args, "system_prompt", None)
        knows_data = hasattr(ckpt_args, "data_path") or hasattr(ckpt_args, "train_data_path")
        synthetic = knows_data and not (getattr(ckpt_args, "data_path", None)
                                        or getattr(ckpt_args, "train_data_path", None))
        if value is None and synthetic:
            value = "math"  # the trainer's built-in synthetic set is preprocessed with it
        if value is None:
            print(" > no system prompt (pass --system-prompt if the SFT data was preprocessed "
                  "with one, e.g. 'math')", flush=True)
    return resolve_system_prompt(value)


def _path_id(prompt, text: str, correct: bool):
    """Which solution path a response follows: its index among the known paths, else (for a
    correct response with arithmetically valid equations) its equation sequence."""
    from megatron_sed.data.synthetic import equations_valid, identify_path, path_signature

    if prompt.paths:
        pid = identify_path(prompt.paths, text)
        if pid is not None:
            return pid
    if correct and equations_valid(text):
        return "sig:" + repr(path_signature(text))
    return None


def evaluate(args) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.data.tokenizer import build_tokenizer
    from megatron_sed.eval.loading import load_model
    from megatron_sed.eval.metrics import is_correct, summarize_groups
    from megatron_sed.eval.prompts import load_prompts
    from megatron_sed.eval.sampler import Sampler, SamplingParams

    params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    bad_k = [k for k in args.pass_k if not 1 <= k <= args.n]
    if bad_k:
        raise ValueError(f"--pass-k {bad_k}: every k must lie in [1, --n={args.n}]")
    t0 = time.time()
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            model, ckpt_args, ckpt_dir, common = load_model(args.load, args.iteration)
            tok = build_tokenizer(args.tokenizer_type or getattr(ckpt_args, "tokenizer_type", "byte"),
                                  args.tokenizer_model or getattr(ckpt_args, "tokenizer_model", None),
                                  args.chat_template or getattr(ckpt_args, "chat_template", None))
            prompts = load_prompts(args.prompts, args.num_prompts, _system_prompt(args, ckpt_args))
            print(f" > loaded {ckpt_dir} (iteration {common.get('iteration', '?')}); "
                  f"{len(prompts)} prompts x {args.n} samples", flush=True)
            sampler = Sampler(model, vocab_size=tok.vocab_size, use_kv_cache=not args.no_kv_cache)
            gen = torch.Generator().manual_seed(args.seed)
            groups, records = [], []
            from tqdm import tqdm

            for i, pr in enumerate(tqdm(prompts, desc="sampling", unit="prompt", file=sys.stderr)):
                ids = tok.encode_prompt(pr.messages)
                samples = sampler.generate(ids, args.n, params, stop_ids=tok.stop_ids, generator=gen)
                group = []
                for s in samples:
                    text = tok.detokenize(s.ids)
                    ok = is_correct(text, pr.answer)
                    rec = {"text": text, "correct": ok, "path": _path_id(pr, text, ok),
                           "num_tokens": s.num_tokens, "entropy_sum": s.entropy_sum,
                           "stopped": s.stopped}
                    group.append(rec)
                    records.append({"prompt_index": i, "problem_id": pr.problem_id,
                                    "answer": pr.answer, **rec})
                groups.append({"samples": group})
        finally:
            ps.destroy_model_parallel()
    metrics = summarize_groups(groups, ks=args.pass_k)
    metrics["truncated_fraction"] = sum(not r["stopped"] for r in records) / len(records)
    label = args.label or os.path.splitext(os.path.basename(args.output))[0]
    result = {
        "label": label,
        "checkpoint": str(args.load),
        "iteration": common.get("iteration"),
        "sed_threshold": (common.get("sed") or {}).get("threshold", common.get("sed_threshold")),
        "prompts": os.path.basename(args.prompts),
        "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                     "max_new_tokens": args.max_new_tokens, "seed": args.seed},
        "metrics": metrics,
        "time_s": round(time.time() - t0, 2),
    }
    _atomic_write(args.output, json.dumps(result, indent=2, sort_keys=False) + "\n")
    if args.samples_output:
        _atomic_write(args.samples_output,
                      "".join(json.dumps(r, default=str) + "\n" for r in records))
    return result


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        from megatron_sed.eval.plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "report":
        from megatron_sed.eval.report import main as report_main

        return report_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_sed.eval.loading import CheckpointError
    from megatron_sed.eval.prompts import PromptsFileError

    try:
        result = evaluate(args)
    except (CheckpointError, PromptsFileError, ValueError) as err:
        print(f"megatron-sed-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    m = result["metrics"]
    print(" > " + " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                             for k, v in m.items()), flush=True)
    print(f" > wrote {args.output}")


if __name__ == "__main__":
    main()
