"""GPTModel's output layer and the SED loss fused (--cross-entropy-loss-fusion
--cross-entropy-fusion-impl linear): the per-token loss straight from the final hidden
states and the output weight, never holding the [s, b, V/tp] logits.

The output processor (loss_hook.sed_output_processor) calls `fused_output_loss` in place
of `output_layer(...)` + the SED loss. What the output layer (Megatron's
ColumnParallelLinear) would do is taken from it: its TP group, whether it runs sequence-
parallel (the fused op then gathers the hidden states and reduce-scatters their gradient)
and whether it accumulates the weight gradient into `main_grad`
(gradient_accumulation_fusion). The weight is `output_weight` when given (tied to the
embedding) else the layer's own.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.fused_linear_sed import (
    default_chunk_tokens,
    fused_linear_sed_loss,
    grad_in_forward_fits,
)
from megatron_sed.ops.stats import SEDStats
from megatron_sed.utils.log import print_rank_last

_announced: set = set()


def unsupported_reason(output_layer, config) -> str | None:
    """Why the fused path cannot stand in for this output layer (None: it can)."""
    if getattr(output_layer, "bias", None) is not None:
        return "the output layer has a bias"
    if config is not None and getattr(config, "use_mup", False):
        return "muP scales the logits (use_mup)"
    if config is not None and getattr(config, "defer_embedding_wgrad_compute", False):
        return "--defer-embedding-wgrad-compute defers the output layer's weight gradient"
    return None


def fused_output_loss(
    hidden_states: Tensor,
    output_layer,
    output_weight,
    labels: Tensor,
    cfg: SEDConfig,
    config=None,
    loss_mask: Optional[Tensor] = None,
) -> tuple[Tensor, SEDStats]:
    """(per-token loss [b, s] float32, SEDStats of [s, b] tensors) of the output layer +
    SED loss on `hidden_states` [s, b, h] ([s/tp, b, h] under sequence parallelism) and
    `labels` [b, s]. Nothing is stashed: the caller handles the stats.

    `loss_mask` [b, s] (what Megatron hands the output processor, and what loss_func
    reduces the per-token loss with) lets the op compute the gradient during the forward
    (3 GEMMs instead of 4; exact, checked in the backward)."""
    reason = unsupported_reason(output_layer, config)
    if reason is not None:
        raise ValueError(
            f"--cross-entropy-fusion-impl linear cannot fuse this output layer: {reason}; "
            "use --cross-entropy-fusion-impl native"
        )
    weight = output_weight if output_weight is not None else output_layer.weight
    into_main_grad = bool(getattr(output_layer, "gradient_accumulation_fusion", False)) and (
        getattr(weight, "main_grad", None) is not None
    )
    sp = bool(getattr(output_layer, "sequence_parallel", False))
    _announce(hidden_states, weight, output_layer, sp, cfg, into_main_grad, loss_mask is not None)
    loss, stats = fused_linear_sed_loss(
        hidden_states,
        weight,
        labels.transpose(0, 1).contiguous(),  # [b, s] -> [s, b]; small
        cfg,
        tp_group=getattr(output_layer, "tp_group", None),
        sequence_parallel=sp,
        chunk_tokens=cfg.kernel.fused_chunk_tokens,
        accumulate_into_main_grad=into_main_grad,
        grad_hint=None if loss_mask is None else loss_mask.transpose(0, 1),
    )
    return loss.transpose(0, 1).contiguous(), stats  # [s, b] -> [b, s], like Megatron


def _announce(hidden_states, weight, output_layer, sp, cfg, into_main_grad, has_mask) -> None:
    """One line per shape, from the last rank (the one with the loss under PP): that the
    fused path runs, with which chunks, and where its gradient is computed."""
    tp_group = getattr(output_layer, "tp_group", None)
    tp = tp_group.size() if sp and tp_group is not None else 1
    tokens = hidden_states.shape[0] * tp * hidden_states.shape[1]
    chunk = cfg.kernel.fused_chunk_tokens or default_chunk_tokens(tokens, weight.shape[0])
    in_forward = has_mask and grad_in_forward_fits(tokens, weight, into_main_grad)
    key = (tokens, weight.shape[0], chunk, in_forward)
    if key in _announced:
        return
    _announced.add(key)
    print_rank_last(
        f"SED: output layer fused with the loss (--cross-entropy-fusion-impl linear): {tokens} "
        f"tokens x {weight.shape[0]} vocab rows per rank in chunks of {min(chunk, tokens)} tokens"
        f"{', sequence-parallel' if sp else ''}{', wgrad into main_grad' if into_main_grad else ''}, "
        + ("gradient computed in the forward" if in_forward else "logits recomputed in the backward")
    )
