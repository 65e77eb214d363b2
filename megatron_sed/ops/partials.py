"""Per-rank partial statistics of a vocab shard, and how ranks combine them exactly.

Each tensor-parallel rank holds the logits z[:, V_r] of its vocab slice. Per row it
produces `4 + k` numbers (the "partials", float32 or float64):

    col 0  m_r   local max logit
    col 1  s_r   sum_j exp(z_j - m_r)
    col 2  a_r   sum_j exp(z_j - m_r) * (z_j - m_r)          (for the entropy)
    col 3  z_y   the target logit if the target lies in this shard, else 0
    col 4: the k largest local logits, descending (-inf padded when V_r < k)

One all-gather of these `[tp, N, 4 + k]` numbers gives every rank what it needs for
cross-entropy, entropy, p_target, the top-k mass and the argmax test: one collective
where Megatron's cross-entropy issues three all-reduces. `combine_partials` is the one
place the combination is written; the torch and Triton implementations both use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_sed.ops.comm import all_gather_partials
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.stats import STAT_NAMES

COL_MAX, COL_SUMEXP, COL_SUMEXP_Z, COL_TARGET = 0, 1, 2, 3
NUM_FIXED_COLS = 4


class Combined(NamedTuple):
    """Per-row results, identical on every rank (all [N])."""

    loss: torch.Tensor  # ce + coef * M * R, 0 on ignored rows
    ce: torch.Tensor
    reg: torch.Tensor  # coef * M * R
    mask: torch.Tensor  # bool M
    target_prob: torch.Tensor
    entropy: torch.Tensor
    topk_mass: torch.Tensor
    correct: torch.Tensor  # bool: the target logit is the (global) maximum
    lse: torch.Tensor  # log-sum-exp over the full vocab
    # Backward: dL/dz_j = p_j * (alpha + beta * log p_j) - gamma * [j == y]
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor

    def outputs(self, shape) -> tuple:
        """(loss, *stats in stats.STAT_NAMES order) viewed as `shape`: what both autograd
        Functions return (the stats non-differentiable)."""
        return (self.loss.view(shape),) + tuple(getattr(self, n).view(shape) for n in STAT_NAMES)


def combine_partials(gathered: torch.Tensor, valid: torch.Tensor, cfg: SEDConfig, top_k: int) -> Combined:
    """Combine `gathered` [tp, N, 4 + k'] partials of all ranks into per-row results.

    valid: [N] bool, False where the target is ignore_index.
    top_k: the k of the top-k mass (cfg.top_k; k' >= min(k, V_r) local columns each).
    """
    m = gathered[:, :, COL_MAX]
    global_max = m.max(dim=0).values  # [N]
    rescale = torch.exp(m - global_max)  # [tp, N]
    sum_exp = (gathered[:, :, COL_SUMEXP] * rescale).sum(dim=0)
    # sum_j e^(z_j - M) (z_j - M) = sum_r e^(m_r - M) (a_r + (m_r - M) s_r)
    shift = m - global_max
    sum_exp_z = (rescale * (gathered[:, :, COL_SUMEXP_Z] + shift * gathered[:, :, COL_SUMEXP])).sum(dim=0)
    log_sum_exp = torch.log(sum_exp)
    lse = global_max + log_sum_exp
    entropy = log_sum_exp - sum_exp_z / sum_exp

    target_logit = gathered[:, :, COL_TARGET].sum(dim=0)
    log_p = target_logit - lse
    ce = -log_p
    target_prob = torch.exp(log_p)

    # The top-k of the union of the local top-k's is the global top-k.
    local_top = gathered[:, :, NUM_FIXED_COLS:]  # [tp, N, k']
    union = local_top.permute(1, 0, 2).reshape(local_top.shape[1], -1)
    top = union.topk(top_k, dim=-1).values if union.shape[-1] > top_k else union
    topk_mass = torch.exp(top - lse.unsqueeze(-1)).sum(dim=-1)

    zero = torch.zeros_like(ce)
    correct = (target_logit >= global_max) & valid

    if cfg.mask == "topk_mass":
        mask = topk_mass < cfg.threshold
    elif cfg.mask == "entropy":
        mask = entropy > cfg.threshold
    elif cfg.mask == "all":
        mask = torch.ones_like(valid)
    else:  # "none"
        mask = torch.zeros_like(valid)
    if cfg.coef == 0.0:
        mask = torch.zeros_like(valid)
    mask = mask & valid
    c = cfg.coef * mask.to(ce.dtype)  # the per-row weight of R

    if cfg.regularizer == "quadratic":
        reg_value = (target_prob - 0.5) ** 2
        # d(p_y - 1/2)^2 / dz_j = -2 (p_y - 1/2) p_y g_j with g_j = p_j - [j = y]:
        # the CE gradient times one scalar (docs/method.md).
        factor = 1.0 - c * target_prob * (2.0 * target_prob - 1.0)
        alpha, beta, gamma = factor, zero, factor
    else:  # R = -H; d(-H)/dz_j = p_j (log p_j + H)
        reg_value = -entropy
        alpha, beta, gamma = 1.0 + c * entropy, c, torch.ones_like(ce)

    ce = torch.where(valid, ce, zero)
    reg = torch.where(mask, c * reg_value, zero)
    loss = ce + reg
    return Combined(
        loss=loss,
        ce=ce,
        reg=reg,
        mask=mask,
        target_prob=torch.where(valid, target_prob, zero),
        entropy=torch.where(valid, entropy, zero),
        topk_mass=torch.where(valid, topk_mass, zero),
        correct=correct,
        lse=lse,
        # torch.where, not a multiply: an ignored row must give 0 even if its logits are inf.
        alpha=torch.where(valid, alpha, zero),
        beta=torch.where(valid, beta, zero),
        gamma=torch.where(valid, gamma, zero),
    )


def gather_and_combine(
    partials: torch.Tensor, target_1d: torch.Tensor, cfg: SEDConfig, group, world_size: int
) -> Combined:
    """The loss's one collective and the combination, shared by the torch and Triton
    Functions: all-gather this rank's [N, 4 + k] partials, combine every rank's."""
    gathered = all_gather_partials(partials, group, world_size)
    return combine_partials(gathered, target_1d != cfg.ignore_index, cfg, cfg.top_k)


def backward_needs_log(cfg: SEDConfig) -> bool:
    """Only the entropy regulariser's gradient has a p_j log p_j term (beta != 0)."""
    return cfg.regularizer == "entropy" and not cfg.is_plain_ce
