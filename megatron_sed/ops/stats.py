"""The SED loss's per-token statistics: a typed result, one registry of their names, and
the one reduction every integration uses.

`SEDStats` is what `vocab_parallel_sed_loss` returns beside the loss (cf. Liger's
`CrossEntropyOutput`): one [s, b] tensor per statistic, identical on every TP rank, no
gradient. It is also a read-only mapping (`stats["ce"]`), so code can loop over it.

`STAT_FIELDS` is the single list of (attribute, report key): the report key is what
Megatron's log line, TensorBoard and the validation line show (`ce loss`, `sed reg`, ...),
and, with "_" for " ", the `--metrics-file` key (`ce_loss`, `sed_reg`, ...). `lm loss`,
the optimised objective, is Megatron's own key and is reported by the loss functions.

`sed_report` turns a micro-batch's statistics into Megatron's `[sum, count]` report pairs
(summed over micro-batches and data-parallel ranks by Megatron, logged as sum / count);
megatron-sed-train's loss_func and the Megatron-LM glue both call it, and
`reduce_sed_stats` is the same reduction for other loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StatField:
    name: str  # SEDStats attribute
    report_key: str  # Megatron's report key / log-line label
    meaning: str

    @property
    def metric_key(self) -> str:
        """The --metrics-file / reduce_sed_stats key."""
        return self.report_key.replace(" ", "_")


STAT_FIELDS = (
    StatField("ce", "ce loss", "cross-entropy -log p(target)"),
    StatField("reg", "sed reg", "the regulariser term lambda * M * R"),
    StatField("mask", "sed mask rate", "M: the token is regularised"),
    StatField("entropy", "entropy", "H(p) in nats"),
    StatField("target_prob", "target prob", "p(target)"),
    StatField("topk_mass", "topk mass", "P_topk, the mass of the k most likely tokens"),
    StatField("correct", "top1 acc", "the target is the most likely token"),
)


@dataclass(frozen=True, eq=False)
class SEDStats(Mapping):
    """Per-token statistics of one SED loss call ([s, b] like the target; 0 / False at
    ignored targets). `mask` and `correct` are bool, the rest float32 (float64 for
    float64 logits)."""

    ce: torch.Tensor
    reg: torch.Tensor
    mask: torch.Tensor
    target_prob: torch.Tensor
    entropy: torch.Tensor
    topk_mass: torch.Tensor
    correct: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in _NAMES:
            raise KeyError(f"{name!r} is not an SED statistic; they are {_NAMES}")
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)

    def detach(self) -> SEDStats:
        return SEDStats(**{n: getattr(self, n).detach() for n in _NAMES})


_NAMES = tuple(f.name for f in fields(SEDStats))
STAT_NAMES = _NAMES  # the order of the autograd Functions' outputs after the loss
assert set(_NAMES) == {f.name for f in STAT_FIELDS}


def _finite_weights(stats: Mapping, loss_mask: torch.Tensor) -> torch.Tensor:
    """float32 [s, b]: the loss mask ([b, s] or flattened, Megatron's layout) where the
    token's loss is finite, 0 elsewhere."""
    ce = stats["ce"]
    s, b = ce.shape
    mask = loss_mask.reshape(b, s).t().to(torch.float32)
    return mask * (torch.isfinite(ce) & torch.isfinite(stats["reg"])).to(torch.float32)


def sed_report(stats: Mapping, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{report key: tensor([sum over supervised tokens, their number])} in float32.
    Tokens whose loss is not finite are left out of every statistic (the loss itself still
    carries them: Megatron's NaN check sees it)."""
    weight = _finite_weights(stats, loss_mask)
    values = torch.stack([stats[f.name].detach().to(torch.float32) for f in STAT_FIELDS])
    values = torch.where(weight.bool(), values, torch.zeros_like(values))
    sums = (values * weight).flatten(1).sum(dim=1)
    count = weight.sum()
    return {f.report_key: torch.stack([sums[i], count]) for i, f in enumerate(STAT_FIELDS)}


def reduce_sed_stats(
    stats: Mapping, loss_mask: Optional[torch.Tensor] = None, group=None
) -> dict[str, float]:
    """Means of the statistics over the (loss-masked, finite) tokens, all-reduced over
    `group` (e.g. data-parallel) when given: {metric key: mean, "num_tokens": n,
    "nonfinite_tokens": m}. The same pairs as sed_report, so the numbers equal what
    megatron-sed-train logs."""
    ce = stats["ce"]
    if loss_mask is None:
        loss_mask = torch.ones(ce.shape[1], ce.shape[0], device=ce.device)
    pairs = sed_report(stats, loss_mask)
    total = loss_mask.to(torch.float32).sum()
    vec = torch.cat(
        [
            torch.stack([pairs[f.report_key][0] for f in STAT_FIELDS]),
            pairs[STAT_FIELDS[0].report_key][1:],
            total.view(1),
        ]
    ).double()
    if group is not None and dist.is_initialized() and dist.get_world_size(group=group) > 1:
        dist.all_reduce(vec, group=group)
    values = vec.cpu().tolist()  # one host sync
    count, total = values[-2], values[-1]
    out = {f.metric_key: (v / count if count > 0 else 0.0) for f, v in zip(STAT_FIELDS, values)}
    out["num_tokens"] = count
    out["nonfinite_tokens"] = total - count
    return out
