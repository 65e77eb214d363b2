"""The GRPO loop. One iteration:

1. take `prompts_per_step` prompts (a seeded permutation per epoch: stateless, so a resumed
   run draws exactly what the uninterrupted one would);
2. sample n rollouts per prompt at temperature 1 (KV-cache sampler, a generator seeded by
   (seed, iteration)), reward them, normalise rewards within each group;
3. compute the old log-probs once, with the policy that sampled;
4. for each epoch, for each mini-batch of `mini_batch_prompts` prompts (in order): one
   AdamW step on the clipped token-mean loss, accumulated over micro-batches of
   `micro_batch_size` sequences (each micro-batch divides by the mini-batch's token count,
   so the sum is the mini-batch token mean whatever the micro-batch size).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sed.eval.sampler import Sampler, SamplingParams
from megatron_sed.rl.config import GRPOConfig
from megatron_sed.rl.grpo import group_advantages, policy_loss
from megatron_sed.rl.heldout import evaluate_heldout
from megatron_sed.rl.logprobs import token_logprobs
from megatron_sed.rl.rollout import Rollout, pack, sample_group
from megatron_sed.utils.files import atomic_write_text
from megatron_sed.utils.log import print_rank_0


def make_optimizer(model, cfg: GRPOConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def step_prompt_indices(num_prompts: int, per_step: int, iteration: int, seed: int) -> list[int]:
    """Prompts of iteration `iteration` (0-based): consecutive slices of one seeded
    permutation of the prompt set per epoch."""
    out = []
    for pos in range(iteration * per_step, (iteration + 1) * per_step):
        epoch, i = divmod(pos, num_prompts)
        order = list(range(num_prompts))
        random.Random(f"megatron-sed-rl:{seed}:{epoch}").shuffle(order)
        out.append(order[i])
    return out


def _step_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


@torch.no_grad()
def _old_logprobs(model, batches, vocab_size) -> list[torch.Tensor]:
    model.eval()  # dropout off: the distribution the sampler drew from
    return [token_logprobs(model, b.tokens, vocab_size)[0] for b in batches]


def _micro_batches(rollouts: Sequence[Rollout], size: int, pad_id: int):
    return [pack(rollouts[i : i + size], pad_id) for i in range(0, len(rollouts), size)]


def _update(model, optimizer, cfg, micro, olds, advs, vocab_size) -> dict:
    """One optimizer step over a mini-batch given as micro-batches."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = sum(b.num_tokens for b in micro)
    sums = dict(loss=0.0, clip_frac=0.0, clip_low_frac=0.0, clip_high_frac=0.0, dual_clip_frac=0.0, kl=0.0)
    for b, old, adv in zip(micro, olds, advs):
        logp, ent = token_logprobs(model, b.tokens, vocab_size)
        loss, st = policy_loss(logp, old, adv, b.mask, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, total)
        if cfg.entropy_coeff:  # verl: loss -= coeff * token-mean entropy (0 for the authors)
            loss = loss - cfg.entropy_coeff * (ent * b.mask).sum() / max(total, 1)
        loss.backward()
        w = b.num_tokens / max(total, 1)  # token-weighted, like the loss
        sums["loss"] += float(loss.detach())
        sums["kl"] += st.approx_kl * w
        for k in ("clip_frac", "clip_low_frac", "clip_high_frac", "dual_clip_frac"):
            sums[k] += getattr(st, k) * w
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
    sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return sums


def _rollout_metrics(groups: Sequence[Sequence[Rollout]], rewards: torch.Tensor) -> dict:
    flat = [r for g in groups for r in g]
    ntok = sum(r.num_response_tokens for r in flat)
    return {
        "reward": float(rewards.mean()),
        # groups whose rewards are not all equal: the only ones with a nonzero advantage
        "mixed_groups": float((rewards.max(1).values != rewards.min(1).values).float().mean()),
        # untempered next-token entropy at the sampled positions, token mean
        "entropy": sum(r.entropy_sum for r in flat) / max(ntok, 1),
        "response_length": ntok / len(flat),
        "stopped": sum(r.stopped for r in flat) / len(flat),
    }


def grpo_iteration(model, optimizer, tokenizer, prompts, cfg: GRPOConfig, iteration: int) -> dict:
    """Run one GRPO iteration (0-based `iteration`); returns its metrics."""
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    sampler = Sampler(model, vocab_size=tokenizer.vocab_size)
    gen = _step_generator(cfg.seed, iteration)
    chosen = step_prompt_indices(len(prompts), cfg.prompts_per_step, iteration, cfg.seed)
    groups = [sample_group(sampler, tokenizer, prompts[i], cfg.n, params, gen, cfg.reward) for i in chosen]
    rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
    adv = group_advantages(rewards, cfg.adv_eps)
    # Mini-batches of whole groups, split into micro-batches of sequences; the old
    # log-probs of every one of them come from the sampling policy, before any update.
    mini = []
    for start in range(0, len(groups), cfg.mini_batch_prompts):
        flat = [r for g in groups[start : start + cfg.mini_batch_prompts] for r in g]
        flat_adv = adv[start : start + cfg.mini_batch_prompts].reshape(-1)
        micro = _micro_batches(flat, cfg.micro_batch_size, tokenizer.pad)
        advs = list(flat_adv.split(cfg.micro_batch_size))
        mini.append((micro, advs))
    olds = [_old_logprobs(model, micro, tokenizer.vocab_size) for micro, _ in mini]
    updates = []
    for _ in range(cfg.ppo_epochs):
        for (micro, advs), old in zip(mini, olds):
            updates.append(_update(model, optimizer, cfg, micro, old, advs, tokenizer.vocab_size))
    out = _rollout_metrics(groups, rewards)
    for key in updates[0]:
        out[key] = sum(u[key] for u in updates) / len(updates)
    out["updates"] = len(updates)
    return out


@dataclass
class LoopOptions:
    train_iters: int  # the iteration to stop at (Megatron's --train-iters: a total)
    start_iteration: int = 0
    log_interval: int = 1
    eval_prompts: Optional[list] = None
    eval_interval: int = 0  # 0: no held-out evaluation
    eval_n: Optional[int] = None  # default: cfg.n
    metrics_file: Optional[str] = None
    save_interval: int = 0  # 0: only at the end (when a save callback is given)
    save: Optional[Callable[[int], None]] = None  # called with the iteration just finished
    history: list = field(default_factory=list)  # earlier records of a resumed run


def _log_line(it: int, total: int, m: dict, elapsed: float) -> str:
    return (
        f" [rl] iteration {it:>6}/{total} | reward {m['reward']:.3f} | mixed groups {m['mixed_groups']:.2f}"
        f" | entropy {m['entropy']:.3f} | response length {m['response_length']:.1f}"
        f" | clip frac {m['clip_frac']:.3f} | loss {m['loss']:.4f} | grad norm {m['grad_norm']:.3f}"
        f" | elapsed time per iteration (ms): {1000 * elapsed:.1f}"
    )


def _heldout(model, tokenizer, cfg, opts) -> dict:
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    return evaluate_heldout(
        model, tokenizer, opts.eval_prompts, opts.eval_n or cfg.n, params, cfg.seed + 1, cfg.reward
    )


def _write_metrics(opts, records) -> None:
    if opts.metrics_file:  # the whole file each time, atomically: never a torn last line
        atomic_write_text(opts.metrics_file, "".join(json.dumps(r) + "\n" for r in records))


def train_grpo(model, tokenizer, prompts, cfg: GRPOConfig, opts: LoopOptions, optimizer=None) -> list[dict]:
    """Iterations opts.start_iteration + 1 .. opts.train_iters; returns the metric records
    (one per iteration, plus {"iteration", "eval"} records of held-out evaluations)."""
    if not prompts:
        raise ValueError("no training prompts")
    if opts.train_iters < opts.start_iteration:
        raise ValueError(f"--train-iters {opts.train_iters} < the loaded iteration {opts.start_iteration}")
    optimizer = optimizer or make_optimizer(model, cfg)
    records = list(opts.history)
    evaluating = opts.eval_prompts and opts.eval_interval > 0
    if evaluating and opts.start_iteration == 0:
        records.append({"iteration": 0, "eval": _heldout(model, tokenizer, cfg, opts)})
        print_rank_0(f" [rl] eval at iteration 0 | {_fmt_eval(records[-1]['eval'])}")
    for it in range(opts.start_iteration + 1, opts.train_iters + 1):
        t0 = time.time()
        m = grpo_iteration(model, optimizer, tokenizer, prompts, cfg, it - 1)
        m["elapsed_s"] = time.time() - t0
        records.append({"iteration": it, **m})
        if it % opts.log_interval == 0 or it == opts.train_iters:
            print_rank_0(_log_line(it, opts.train_iters, m, m["elapsed_s"]))
        if evaluating and (it % opts.eval_interval == 0 or it == opts.train_iters):
            records.append({"iteration": it, "eval": _heldout(model, tokenizer, cfg, opts)})
            print_rank_0(f" [rl] eval at iteration {it} | {_fmt_eval(records[-1]['eval'])}")
        _write_metrics(opts, records)
        if opts.save and ((opts.save_interval and it % opts.save_interval == 0) or it == opts.train_iters):
            opts.save(it)
    _write_metrics(opts, records)
    return records


def _fmt_eval(e: dict) -> str:
    return " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items())
