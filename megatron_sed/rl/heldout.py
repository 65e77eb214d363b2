"""Held-out evaluation during RL: n samples per held-out prompt at the rollout settings,
avg@n (accuracy) and pass@n, with its own fixed seed so every evaluation of a run draws
from the same random stream and differences come from the model."""

from __future__ import annotations

import torch

from megatron_sed.eval.metrics import avg_at_n, pass_at_k
from megatron_sed.eval.sampler import Sampler, SamplingParams
from megatron_sed.rl.rollout import sample_group


def evaluate_heldout(
    model, tokenizer, prompts, n: int, params: SamplingParams, seed: int, reward: str = "boxed"
) -> dict:
    sampler = Sampler(model, vocab_size=tokenizer.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    acc, passed, ntok = [], [], []
    for prompt in prompts:
        group = sample_group(sampler, tokenizer, prompt, n, params, gen, reward)
        correct = [r.reward > 0 for r in group]
        acc.append(avg_at_n(correct))
        passed.append(pass_at_k(n, sum(correct), n))
        ntok.extend(r.num_response_tokens for r in group)
    return {
        f"avg@{n}": sum(acc) / len(acc),
        f"pass@{n}": sum(passed) / len(passed),
        "response_length": sum(ntok) / len(ntok),
        "num_prompts": len(prompts),
    }
