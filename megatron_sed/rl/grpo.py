"""GRPO's two formulas, as verl computes them (verl.trainer.ppo.core_algos):

- advantages (compute_grpo_outcome_advantage): every response of a prompt gets
  A = (r - mean_group) / (std_group + eps), std the UNBIASED one (torch.std, n - 1 in the
  denominator); a group whose rewards are all equal gets A = 0 (no signal).
- policy loss (compute_policy_loss, "token-mean"): per response token
  l = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)), for A < 0 also
  capped at -A * c (dual clip), ratio = exp(logp - old_logp); the loss is the mean of l
  over ALL response tokens of the mini-batch (long responses weigh more, as in DAPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[groups, n] rewards -> [groups, n] advantages (group mean / unbiased std)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, n >= 2], got {tuple(rewards.shape)}")
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    return ((r - mean) / (std + eps)).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


@dataclass
class LossStats:
    clip_frac: float  # share of tokens whose ratio was clipped (the clamp was active)
    clip_low_frac: float  # ... at 1 - clip_low with A < 0
    clip_high_frac: float  # ... at 1 + clip_high with A > 0
    dual_clip_frac: float  # tokens held at -A * c (A < 0, ratio > c)
    approx_kl: float  # mean of old_logp - logp over the tokens (a drift gauge, not a loss)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: Optional[float] = 3.0,
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate, token-mean. logp/old_logp/mask: [b, t] (mask 1 at response
    tokens); advantages: [b] (one per response, broadcast over its tokens).
    `num_tokens`: the denominator, the response tokens of the whole mini-batch, when this
    call sees only one micro-batch of it (the micro-batch losses then sum to the mini-batch
    token mean); default: mask.sum()."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss1, loss2 = -adv * ratio, -adv * clipped
    per_token = torch.maximum(loss1, loss2)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if clip_ratio_c is not None:
        capped = torch.minimum(per_token, -adv * clip_ratio_c)
        dual = (adv < 0) & (capped < per_token)
        per_token = torch.where(adv < 0, capped, per_token)
    denom = float(mask.sum()) if num_tokens is None else float(num_tokens)
    loss = (per_token * mask).sum() / max(denom, 1.0)
    with torch.no_grad():
        n = max(float(mask.sum()), 1.0)
        active = loss2 > loss1  # the clamp decided the max: the gradient is cut there

        def frac(x):
            return float((x.to(mask.dtype) * mask).sum()) / n

        stats = LossStats(
            clip_frac=frac(active),
            clip_low_frac=frac(active & (adv < 0)),
            clip_high_frac=frac(active & (adv > 0)),
            dual_clip_frac=frac(dual),
            approx_kl=float(((old_logp - logp) * mask).sum()) / n,
        )
    return loss, stats
