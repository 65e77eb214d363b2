"""The SED loss inside Megatron-Core's language-model loss path.

`GPTModel.forward(..., labels=...)` ends in the main head's loss: GPTModel's
`output_processor` hook (megatron-core >= 0.18; `sed_output_processor`) or its
`compute_language_model_loss(labels, logits)` (older; `sed_language_model_loss` is a
drop-in body). Either way the vocab-parallel SED loss runs on the [s, b, V/tp] logits
(only the small [b, s] labels / loss are transposed, as Megatron does) and returns the
per-token loss [b, s]; Megatron's `loss_func` then applies the loss mask. The per-token
statistics go to the forward's context (megatron_sed.model.sed_route.SEDLossContext,
`context.record(stats)`), which the loss function reads. Which hook is used, and how the
context reaches the model, is decided in one place: megatron_sed.model.sed_route.
"""

from __future__ import annotations

import functools
import inspect

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megatron_sed import vocab_parallel_sed_loss
from megatron_sed.model.fused_output import fused_output_loss


def sed_language_model_loss(model, labels: Tensor, logits: Tensor, context, tp_group=None) -> Tensor:
    """Per-token SED loss [b, s] (fp32; 0 at ignored labels) from vocab-parallel logits
    [s, b, V/tp] and labels [b, s], with `context.config`; the statistics go to
    `context.record`.

    `model` supplies the TP group (`model.pg_collection.tp`) when `tp_group` is None."""

    if tp_group is None:
        pgc = getattr(model, "pg_collection", None)
        tp_group = getattr(pgc, "tp", None) if pgc is not None else None
    target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]; small
    loss, stats = vocab_parallel_sed_loss(logits, target, context.config, tp_group=tp_group)
    context.record(stats)
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
    loss_mask=None,
    runtime_gather_output=None,
    context=None,
    scale_logits=None,
    config=None,
    **_,
):
    """GPTModel's `output_processor` for SED (context: the forward's SEDLossContext): the output layer's
    vocab-parallel [s, b, V/tp] logits, then the SED loss [b, s] when labels are given (the
    logits [b, s, V/tp] otherwise), exactly as GPTModel's own post-processing does for CE.
    With context.config.kernel.linear_fusion the two are fused (model/fused_output.py)."""
    if labels is not None and context is not None and context.config.kernel.linear_fusion:
        loss, stats = fused_output_loss(
            hidden_states, output_layer, output_weight, labels, context.config, config, loss_mask=loss_mask
        )
        context.record(stats)
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
