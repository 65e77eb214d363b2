"""forward_step / loss_func in Megatron's schedule interface, shared by the CPU and GPU
loops (only the loop machinery differs between them).

loss_func returns Megatron's 3-tuple (sum of per-token loss x loss mask, number of
loss-masked tokens, report); the schedule divides by the token count and the number of
micro-batches unless --calculate-per-token-loss. The report carries the SED stat sums
(additive across micro-batches and DP ranks, see megatron_sed.sed_stat_sums).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_sed.model.loss_hook import masked_token_loss, pop_sed_stats, sed_stat_sums_for_batch
from megatron_sed.train.data import to_model_inputs


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, mask_stat: str | None = None):
    """Megatron-style reduction of the per-token loss [b, s] with the loss mask.
    mask_stat ("topk_mass"/"entropy", for --sed-threshold-update ema): also report that
    statistic of every supervised token (1-D) so the threshold can track its quantile."""
    stats = pop_sed_stats()
    total, num_tokens = masked_token_loss(output_tensor, loss_mask)
    sums = sed_stat_sums_for_batch(stats, loss_mask)
    report = {"sed_sums": sums.detach() if sums is not None else None}
    if mask_stat is not None and stats is not None:
        report["mask_stat"] = stats[mask_stat][loss_mask.t().bool()].float()
    return total, num_tokens.to(torch.int), report


def make_forward_step(device, transformer_impl: str, pack: bool, mask_stat: str | None = None):
    """forward_step(data_iterator, model) -> (per-token loss, partial(loss_func, loss_mask))."""

    def forward_step(data_iterator, model):
        batch = to_model_inputs(next(data_iterator), device, transformer_impl, pack)
        output = model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"],
            labels=batch["labels"], packed_seq_params=batch["packed_seq_params"],
        )
        return output, partial(loss_func, batch["loss_mask"], mask_stat=mask_stat)

    return forward_step
