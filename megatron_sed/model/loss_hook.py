"""The SED loss inside Megatron-Core's language-model loss path.

`GPTModel.forward(..., labels=...)` ends in `compute_language_model_loss(labels, logits)`
with logits [s, b, V/tp] (vocab-parallel) and labels [b, s], and returns the per-token
loss [b, s]; Megatron's `loss_func` then applies the loss mask. `sed_language_model_loss`
is a drop-in body for that method: it runs `vocab_parallel_sed_loss` directly on the
[s, b, V/tp] logits (only the small [b, s] labels/loss are transposed, as Megatron does),
and stashes the per-token statistics so the loss function can reduce them with the
loss mask. Megatron-LM glue reuses it by patching `compute_language_model_loss`.

Stats stash: Megatron's schedules call the loss function right after each micro-batch's
forward, so one slot is enough: the hook `stash_sed_stats(stats)`, the loss function
`pop_sed_stats()`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megatron_sed import vocab_parallel_sed_loss
from megatron_sed.model.fused_output import fused_output_loss
from megatron_sed.ops.stats import SEDStats

_STASH: dict[str, Optional[SEDStats]] = {"stats": None}


def stash_sed_stats(stats: SEDStats) -> None:
    """Keep the per-token stats ([s, b] tensors) of the latest forward."""
    _STASH["stats"] = stats


def pop_sed_stats() -> Optional[SEDStats]:
    """The stats of the latest forward with labels (None when there were none), cleared."""
    stats, _STASH["stats"] = _STASH["stats"], None
    return stats


def sed_language_model_loss(model, labels: Tensor, logits: Tensor, sed_config, tp_group=None) -> Tensor:
    """Per-token SED loss [b, s] (fp32; 0 at ignored labels) from vocab-parallel logits
    [s, b, V/tp] and labels [b, s]. Stats are stashed (see module doc).

    `model` supplies the TP group (`model.pg_collection.tp`) when `tp_group` is None."""

    if tp_group is None:
        pgc = getattr(model, "pg_collection", None)
        tp_group = getattr(pgc, "tp", None) if pgc is not None else None
    target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]; small
    loss, stats = vocab_parallel_sed_loss(logits, target, sed_config, tp_group=tp_group)
    stash_sed_stats(stats.detach())
    return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s], like Megatron


@functools.lru_cache(maxsize=1)
def supports_output_processor() -> bool:
    """Whether the installed megatron-core's GPTModel.forward takes an `output_processor`
    (>= 0.18): the hook that lets SED replace the main head's loss while multi-token-
    prediction heads keep Megatron's CE."""

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def sed_output_processor(
    *,
    hidden_states,
    output_layer,
    output_weight,
    labels,
    runtime_gather_output=None,
    context=None,
    scale_logits=None,
    config=None,
    **_,
):
    """GPTModel's `output_processor` for SED (context: the SEDConfig): the output layer's
    vocab-parallel [s, b, V/tp] logits, then the SED loss [b, s] when labels are given (the
    logits [b, s, V/tp] otherwise), exactly as GPTModel's own post-processing does for CE.
    With context.kernel.linear_fusion the two are fused (model/fused_output.py)."""
    if labels is not None and context is not None and context.kernel.linear_fusion:
        loss, stats = fused_output_loss(hidden_states, output_layer, output_weight, labels, context, config)
        stash_sed_stats(stats.detach())
        return loss
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    if scale_logits is not None:
        logits = scale_logits(logits)
    if labels is None:
        return logits.transpose(0, 1).contiguous()
    return sed_language_model_loss(
        output_layer, labels, logits, context, tp_group=getattr(output_layer, "tp_group", None)
    )


def masked_token_loss(per_token_loss: Tensor, loss_mask: Tensor):
    """Megatron's loss_func reduction: (sum of loss * mask, number of masked tokens),
    both fp32 scalars, so micro-batches and DP ranks can be summed before dividing."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    return total, mask.sum()
