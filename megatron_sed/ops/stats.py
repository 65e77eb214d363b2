"""Reduce the per-token SED statistics to the scalars a training log shows.

Sums are additive across micro-batches and data-parallel ranks, so a trainer adds
`sed_stat_sums(...)` vectors, all-reduces one small tensor and calls
`summarize_sed_stat_sums` once per log interval (one host sync, off the hot path).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

# Order of the entries of a sums vector; the number of loss-masked tokens follows.
STAT_NAMES = ("ce", "reg", "mask", "entropy", "target_prob", "topk_mass", "correct", "nonfinite")

# Log names of the means (the trainer's --metrics-file keys).
_LOG_NAMES = {
    "ce": "lm_loss",
    "reg": "sed_reg",
    "mask": "sed_mask_rate",
    "entropy": "entropy",
    "target_prob": "target_prob",
    "topk_mass": "topk_mass",
    "correct": "top1_acc",
}


def sed_stat_sums(stats: Dict[str, torch.Tensor], loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 vector: the loss-mask-weighted sum of each STAT_NAMES entry, then the
    number of counted tokens. `loss_mask` has the stats' shape (or is None: all tokens).
    Non-finite tokens (NaN/inf loss) are counted in 'nonfinite' and left out of the other
    sums, so one bad token shows up in the log instead of turning every mean into NaN."""
    ce = stats["ce"]
    weight = torch.ones_like(ce, dtype=torch.float64) if loss_mask is None else loss_mask.to(torch.float64)
    if weight.shape != ce.shape:
        raise ValueError(f"loss_mask shape {tuple(weight.shape)} != stats shape {tuple(ce.shape)}")
    finite = torch.isfinite(ce) & torch.isfinite(stats["reg"])
    kept = torch.where(finite, weight, torch.zeros_like(weight))
    sums = []
    for name in STAT_NAMES:
        if name == "nonfinite":
            sums.append(((~finite).to(torch.float64) * weight).sum())
            continue
        value = stats[name].to(torch.float64)
        sums.append(torch.where(finite, value, torch.zeros_like(value)).mul(kept).sum())
    sums.append(kept.sum())
    return torch.stack(sums)


# The SED statistics as Megatron's loss_func reports them: (stat name, report key). The
# report key is what Megatron's log line and TensorBoard show; --metrics-file uses it with
# "_" for " " (ce_loss, sed_reg, sed_mask_rate, ...). `lm loss` (the optimised objective)
# is reported by the loss function itself, as in Megatron.
REPORT_KEYS = (
    ("ce", "ce loss"),
    ("reg", "sed reg"),
    ("mask", "sed mask rate"),
    ("entropy", "entropy"),
    ("target_prob", "target prob"),
    ("topk_mass", "topk mass"),
    ("correct", "top1 acc"),
)


def sed_report(stats: Dict[str, torch.Tensor], loss_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{report key: tensor([sum over supervised tokens, number of them])} in float32, the
    [sum, count] pairs Megatron sums over micro-batches and data-parallel ranks and logs as
    sum / count. stats are [s, b] (the loss op's layout); loss_mask is [b, s] or its
    flattening (Megatron's batch layout). Tokens whose loss is not finite are left out of
    every statistic (the loss itself still carries them: Megatron's NaN check sees it)."""
    ce = stats["ce"]
    s, b = ce.shape
    mask = loss_mask.reshape(b, s).t().to(torch.float32)
    mask = mask * (torch.isfinite(ce) & torch.isfinite(stats["reg"])).to(torch.float32)
    values = torch.stack([stats[name].detach().to(torch.float32) for name, _ in REPORT_KEYS])
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    sums = (values * mask).flatten(1).sum(dim=1)
    count = mask.sum()
    return {key: torch.stack([sums[i], count]) for i, (_, key) in enumerate(REPORT_KEYS)}


def summarize_sed_stat_sums(sums: torch.Tensor) -> Dict[str, float]:
    """Means over the counted tokens (one host sync)."""
    values = sums.detach().double().cpu().tolist()
    count = values[-1]
    out = {}
    for name, total in zip(STAT_NAMES, values):
        if name == "nonfinite":
            out["nonfinite_tokens"] = total
        else:
            out[_LOG_NAMES[name]] = total / count if count > 0 else 0.0
    out["num_tokens"] = count
    return out


def reduce_sed_stats(
    stats: Dict[str, torch.Tensor], loss_mask: Optional[torch.Tensor] = None, group=None
) -> Dict[str, float]:
    """sed_stat_sums, all-reduced over `group` (e.g. data-parallel) when given, then means."""
    sums = sed_stat_sums(stats, loss_mask)
    if group is not None and dist.is_initialized() and dist.get_world_size(group=group) > 1:
        dist.all_reduce(sums, group=group)
    return summarize_sed_stat_sums(sums)
