"""One evaluation run (megatron-sed-eval): load a checkpoint into one process, sample n
completions per prompt with the KV-cache sampler, score them, write the JSON."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_sed.checkpointing import single_process_group
from megatron_sed.data.formats import resolve_system_prompt
from megatron_sed.data.synthetic import equations_valid, identify_path, path_signature
from megatron_sed.data.tokenizer import sft_tokenizer_from_args
from megatron_sed.eval.loading import load_model
from megatron_sed.eval.metrics import is_correct, summarize_groups
from megatron_sed.eval.prompts import load_prompts
from megatron_sed.eval.sampler import Sampler, SamplingParams
from megatron_sed.utils.files import atomic_write_text


def eval_system_prompt(args, ckpt_args):
    """The system prompt to sample with: --system-prompt, else the one the checkpoint's
    SFT data was preprocessed with (megatron-sed-eval and the RL harness alike)."""
    value = args.system_prompt
    if value is None:
        value = getattr(ckpt_args, "system_prompt", None)
        knows_data = hasattr(ckpt_args, "data_path") or hasattr(ckpt_args, "train_data_path")
        synthetic = knows_data and not (
            getattr(ckpt_args, "data_path", None) or getattr(ckpt_args, "train_data_path", None)
        )
        if value is None and synthetic:
            value = "math"  # the trainer's built-in synthetic set is preprocessed with it
        if value is None:
            print(
                " > no system prompt (pass --system-prompt if the SFT data was preprocessed "
                "with one, e.g. 'math')",
                flush=True,
            )
    return resolve_system_prompt(value)


def _path_id(prompt, text: str, correct: bool):
    """Which solution path a response follows: its index among the known paths, else (for a
    correct response with arithmetically valid equations) its equation sequence."""
    if prompt.paths:
        pid = identify_path(prompt.paths, text)
        if pid is not None:
            return pid
    if correct and equations_valid(text):
        return "sig:" + repr(path_signature(text))
    return None


DEFAULT_MAX_NEW_TOKENS = 128


def default_pass_k(n: int) -> list[int]:
    """pass@k for k = 1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def fit_max_new_tokens(requested, prompt_lengths: list[int], max_positions) -> int:
    """--max-new-tokens: as given (the sampler refuses what does not fit), or the default
    capped by the room the model's positions leave after the longest prompt (said once)."""
    if requested is not None:
        return int(requested)
    if max_positions is None:
        return DEFAULT_MAX_NEW_TOKENS
    longest = max(prompt_lengths)
    room = int(max_positions) - longest
    if room < 1:
        raise ValueError(
            f"the longest prompt has {longest} tokens, the model's maximum sequence length is "
            f"{max_positions}: no room to sample (--num-prompts, or shorter prompts)"
        )
    if room < DEFAULT_MAX_NEW_TOKENS:
        print(
            f" > --max-new-tokens {room}: the model holds {max_positions} positions and the "
            f"longest prompt has {longest} tokens (pass --max-new-tokens to choose)",
            flush=True,
        )
    return min(DEFAULT_MAX_NEW_TOKENS, room)


def evaluate(args) -> dict:
    """Run the evaluation the parsed megatron-sed-eval flags describe; returns the JSON
    record it wrote to args.output."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.pass_k is None:
        args.pass_k = default_pass_k(args.n)
    bad_k = [k for k in args.pass_k if not 1 <= k <= args.n]
    if bad_k:
        raise ValueError(f"--pass-k {bad_k}: every k must lie in [1, --n={args.n}]")
    if args.max_new_tokens is not None:
        SamplingParams(args.temperature, args.top_p, args.max_new_tokens)  # checks the flags early
    t0 = time.time()
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            model, ckpt_args, ckpt_dir, common = load_model(args.load, args.iteration)
            tok = sft_tokenizer_from_args(
                ckpt_args, args.tokenizer_type, args.tokenizer_model, args.chat_template
            )
            prompts = load_prompts(args.prompts, args.num_prompts, eval_system_prompt(args, ckpt_args))
            print(
                f" > loaded {ckpt_dir} (iteration {common.get('iteration', '?')}); "
                f"{len(prompts)} prompts x {args.n} samples",
                flush=True,
            )
            prompt_ids = [tok.encode_prompt(pr.messages) for pr in prompts]
            max_positions = getattr(model, "max_sequence_length", None)
            args.max_new_tokens = fit_max_new_tokens(
                args.max_new_tokens, [len(ids) for ids in prompt_ids], max_positions
            )
            params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
            sampler = Sampler(model, vocab_size=tok.vocab_size, use_kv_cache=not args.no_kv_cache)
            gen = torch.Generator().manual_seed(args.seed)
            groups, records = [], []
            for i, pr in enumerate(tqdm(prompts, desc="sampling", unit="prompt", file=sys.stderr)):
                ids = prompt_ids[i]
                samples = sampler.generate(ids, args.n, params, stop_ids=tok.stop_ids, generator=gen)
                group = []
                for s in samples:
                    text = tok.detokenize(s.ids)
                    ok = is_correct(text, pr.answer)
                    rec = {
                        "text": text,
                        "correct": ok,
                        "path": _path_id(pr, text, ok),
                        "num_tokens": s.num_tokens,
                        "entropy_sum": s.entropy_sum,
                        "first_token_entropy": s.first_entropy,
                        "stopped": s.stopped,
                    }
                    group.append(rec)
                    records.append(
                        {"prompt_index": i, "problem_id": pr.problem_id, "answer": pr.answer, **rec}
                    )
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
        "sed_threshold": (getattr(ckpt_args, "sed_threshold_state", None) or {}).get("tau"),
        "prompts": os.path.basename(args.prompts),
        "sampling": {
            "n": args.n,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
        },
        "metrics": metrics,
        "time_s": round(time.time() - t0, 2),
    }
    atomic_write_text(args.output, json.dumps(result, indent=2, sort_keys=False) + "\n")
    if args.samples_output:
        atomic_write_text(args.samples_output, "".join(json.dumps(r, default=str) + "\n" for r in records))
    return result
