"""forward_step and loss_func for Megatron's training loop (its schedule interface).

forward_step(data_iterator, model, runtime=...) (Megatron gets it with the run's
megatron_sed.calibration.SEDRuntime bound: megatron_sed.train.launch) reads this
data-parallel rank's micro-batch, runs the
GPTModel with SED on its [s, b, V/tp] logits (megatron_sed.model.sed_route: GPTModel's
`output_processor` hook where the installed megatron-core has it, so multi-token-
prediction heads keep Megatron's CE; the `compute_language_model_loss` override
otherwise) and returns the per-token loss with `partial(loss_func, loss_mask, sed=ctx,
runtime=runtime)`: the micro-batch's SEDLossContext carries its statistics to loss_func,
the runtime its tau (for the log line) and the EMA tracker.

loss_func returns Megatron's triple: the loss summed over supervised tokens, their
number, and a report of [sum, count] pairs that Megatron sums over micro-batches,
all-reduces over data x context parallelism and logs as sum / count: `lm loss` (the optimised
objective, CE + lambda * regulariser, as in Megatron) and the SED statistics
(`ce loss`, `sed reg`, `sed mask rate`, `entropy`, `target prob`, `topk mass`,
`top1 acc`; megatron_sed.ops.stats.sed_report). NaN/Inf losses are checked the way
Megatron-LM's pretrain_gpt.py checks them (its rerun state machine, under
--check-for-nan-in-loss-and-grad).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.training import get_args, get_timers

from megatron_sed.calibration import SEDRuntime
from megatron_sed.model.sed_route import SEDLossContext, attach_sed
from megatron_sed.ops.stats import sed_report
from megatron_sed.train.calibration import calibrate_in_trainer
from megatron_sed.train.data import model_inputs


def _uses_thd(args) -> bool:
    """Packed samples take the THD layout with Transformer Engine, and with context
    parallelism on the local spec too (its CP attention takes THD: the same per-sample
    split as on GPU); otherwise the local spec gets a block-causal mask."""
    return bool(args.pack) and (
        args.transformer_impl == "transformer_engine" or args.context_parallel_size > 1
    )


def _run_model(model, batch, ctx):

    # ctx None (--loss-type ce --no-sed-stats): GPTModel's own (Megatron's) CE
    kwargs = attach_sed(model, ctx) if ctx is not None else {}
    return model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        packed_seq_params=batch["packed_seq_params"],
        **kwargs,
    )


def forward_step(data_iterator, model, return_schedule_plan: bool = False, *, runtime: SEDRuntime):

    if return_schedule_plan:
        raise ValueError(
            "--overlap-moe-expert-parallel-comm schedule plans are not supported with --loss-type sed"
        )
    args = get_args()
    native_ce = args.loss_type == "ce" and not args.sed_stats
    cfg = None
    if not native_ce:
        # the first call restores or calibrates tau (through this forward_step, re-entered
        # with the same runtime: its forwards get the calibration config)
        this_step = partial(forward_step, runtime=runtime)
        runtime.resolve(lambda: calibrate_in_trainer(args, model, this_step))
        cfg = runtime.config
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = model_inputs(next(data_iterator), thd=_uses_thd(args), pack=args.pack)
    timers("batch-generator").stop()
    ctx = None if cfg is None else SEDLossContext(cfg)
    output = _run_model(model, batch, ctx)
    return output, partial(loss_func, batch["loss_mask"], model=model, sed=ctx, runtime=runtime)


def _check_finite(args, loss: torch.Tensor) -> None:

    if not args.check_for_nan_in_loss_and_grad:
        return
    machine = get_rerun_state_machine()
    machine.validate_result(
        result=loss,
        rejection_func=torch.isnan,
        tolerance=0.0,
        fatal=True,
        message="found NaN in local forward loss calculation",
    )
    machine.validate_result(
        result=loss,
        rejection_func=torch.isinf,
        tolerance=0.0,
        fatal=True,
        message="found Inf in local forward loss calculation",
    )


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    model=None,
    sed: Optional[SEDLossContext] = None,
    runtime: Optional[SEDRuntime] = None,
):

    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}
    stats = sed.take_stats() if sed is not None else None
    if stats is not None:
        report.update(sed_report(stats, loss_mask))
        if runtime is not None:
            # the tau this micro-batch ran with: report it before the iteration's last
            # micro-batch steps the EMA (else the log mixes in the next iteration's tau)
            report.update(runtime.report(loss_mask))
            if model is not None and model.training:
                runtime.observe(stats, loss_mask)
    _check_finite(args, loss)
    loss, num_tokens = _normalise_over_context_parallel(args, loss, num_tokens)
    return loss, num_tokens, {k: _floor_count(v) for k, v in report.items()}


def _normalise_over_context_parallel(args, loss: torch.Tensor, num_tokens: torch.Tensor):
    """Megatron divides each rank's loss by the token count loss_func returns and averages
    the gradients over DP x CP: with CP that is a mean of the CP ranks' own per-token
    means, not the micro-batch's per-token mean (the ranks hold different numbers of
    supervised tokens). Returning the CP group's token count, and the loss times the CP
    size, makes it exactly the single-rank mean (as Megatron-LM's pretrain_gpt.py did
    before its loss_func returned token counts). With --calculate-per-token-loss Megatron
    divides by the count summed over DP x CP itself: nothing to do. The logged [sum,
    count] reports are reduced over DP x CP by Megatron and stay per rank."""
    group = parallel_state.get_context_parallel_group(check_initialized=False)
    if args.calculate_per_token_loss or group is None or group.size() == 1:
        return loss, num_tokens
    total = num_tokens.clone()
    torch.distributed.all_reduce(total, group=group)
    return loss * group.size(), total


# Megatron logs each [sum, count] pair as sum / count over the global batch (and over the
# validation iterations): a batch without a supervised token would log 0 / 0 = NaN. A
# count of 0 is reported as 2^-100 instead: such a batch logs 0, a real NaN in the sum
# still shows, and any count >= 1 is unchanged (2^-100 vanishes in float32 next to 1).
_EMPTY_COUNT = 2.0**-100


def _floor_count(pair: torch.Tensor) -> torch.Tensor:
    if pair.numel() != 2:
        return pair
    total, count = pair.view(-1).unbind()
    return torch.stack([total, torch.where(count == 0, torch.full_like(count, _EMPTY_COUNT), count)])
