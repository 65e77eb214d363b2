"""--metrics-file: the values of Megatron's log lines as JSON lines, for scripts and plots.

Megatron's loop prints its training line from `training_log` (every iteration it gets
the iteration's reduced report: `lm loss`, `ce loss`, `sed reg`, ... as means over the
global batch) and its validation line from `evaluate_and_print_results`. The observer
wraps those two functions of `megatron.training.training` (the loop looks them up there
on every call) and, on the rank that prints (the last one), appends per --log-interval

    {"iteration", "consumed_samples", "lr", "grad_norm", "loss_scale", "lm_loss",
     "ce_loss", "sed_reg", "sed_mask_rate", "entropy", "target_prob", "topk_mass",
     "top1_acc", "sed_threshold", "iter_time_ms", "tokens_per_sec",
     "skipped_iterations", "nan_iterations"}

plus "mtp_1_loss", ... with --mtp-num-layers (Megatron's per-iteration MTP head losses,
which it adds to its line's accumulators in `MTPLossLoggingHelper.track_mtp_metrics`;
the observer wraps that too) (report keys with "_" for " "; means over the interval's
iterations, as Megatron's line, but without the line's quirk of not resetting its
accumulators after a job's first iteration, so the next line averages two iterations)
and per evaluation {"iteration", "valid_lm_loss", "valid_ce_loss", ...} ("test_..." for
the test set). Values are read once per interval (the same host sync as Megatron's
line). Lines are flushed as written, so a killed job keeps what it logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import megatron.training.training as loop
import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.training import get_args


def _key(report_key: str) -> str:
    return report_key.replace(" ", "_")


class MetricsFile:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _Interval:
    """Sums of the per-iteration report means since the last record."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.iterations = 0
        self.skipped = 0
        self.nan = 0
        self.start = time.perf_counter()

    def add(self, loss_dict: dict, skipped: int, extra: Optional[dict] = None) -> None:
        if skipped:
            self.skipped += 1
            values = [float(v.float().sum()) for v in loss_dict.values()]
            self.nan += int(any(not math.isfinite(v) for v in values))
            return
        self.iterations += 1
        for k, v in {**loss_dict, **(extra or {})}.items():
            v = v.detach().float().reshape(-1)[:1]
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()


def _capture_mtp_losses(into: dict) -> None:
    """Wrap Megatron's `MTPLossLoggingHelper.track_mtp_metrics` (called from training_log
    with the line's accumulators, after reducing the heads' losses over the data-parallel
    ranks) so that this iteration's {"mtp_1 loss": tensor, ...} land in `into`: the
    wrapped function gets an empty dict, from which the observer reads the per-iteration
    losses, then adds them to the line's accumulators as Megatron does. No collective of
    its own, so wrapping it on the last rank only is safe."""
    plain = MTPLossLoggingHelper.track_mtp_metrics

    def track_mtp_metrics(loss_scale, iteration, writer, wandb_writer=None, total_loss_dict=None):
        mine: dict = {}
        plain(loss_scale, iteration, writer, wandb_writer, mine)
        into.clear()
        into.update(mine)
        if total_loss_dict is not None:
            for name, loss in mine.items():
                total_loss_dict[name] = total_loss_dict.get(name, torch.zeros_like(loss)) + loss

    MTPLossLoggingHelper.track_mtp_metrics = staticmethod(track_mtp_metrics)


def install_metrics_observer(path: Optional[str]) -> None:
    """Wrap Megatron's training_log / evaluate_and_print_results (see the module doc). Call
    it on the last global rank only (the one that prints Megatron's lines)."""
    if not path:
        return

    if getattr(loop, "_megatron_sed_metrics", None) is not None:
        return
    out = MetricsFile(path)
    state = {"interval": _Interval(), "eval_iteration": None, "eval_prefix": ""}
    mtp_losses: dict = {}  # this iteration's, filled while Megatron's training_log runs
    _capture_mtp_losses(mtp_losses)
    plain_log, plain_eval_print, plain_evaluate = (
        loop.training_log,
        loop.evaluate_and_print_results,
        loop.evaluate,
    )

    def training_log(
        loss_dict,
        total_loss_dict,
        learning_rate,
        iteration,
        loss_scale,
        report_memory_flag,
        skipped_iter,
        grad_norm,
        *rest,
        **kw,
    ):
        mtp_losses.clear()
        result = plain_log(
            loss_dict,
            total_loss_dict,
            learning_rate,
            iteration,
            loss_scale,
            report_memory_flag,
            skipped_iter,
            grad_norm,
            *rest,
            **kw,
        )
        if out is not None:
            args = get_args()
            st = state["interval"]
            st.add(loss_dict, skipped_iter, mtp_losses)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                elapsed = time.perf_counter() - st.start
                n = max(1, st.iterations + st.skipped)
                record = {
                    "iteration": iteration,
                    "consumed_samples": args.consumed_train_samples,
                    "lr": learning_rate,
                    "grad_norm": grad_norm,
                    "loss_scale": float(loss_scale) if loss_scale is not None else None,
                }
                for k, v in st.sums.items():
                    record[_key(k)] = float(v) / max(1, st.iterations)
                record["iter_time_ms"] = 1000.0 * elapsed / n
                record["tokens_per_sec"] = n * args.global_batch_size * args.seq_length / max(elapsed, 1e-9)
                record["skipped_iterations"] = st.skipped
                record["nan_iterations"] = st.nan
                out.write(record)
                state["interval"] = _Interval()
        return result

    def evaluate(*a, **kw):
        result = plain_evaluate(*a, **kw)
        total = result[0] if result else None
        if out is not None and total:
            split = "test" if "test set" in state["eval_prefix"] else "valid"
            record = {"iteration": state["eval_iteration"]}
            record.update({f"{split}_{_key(k)}": float(v) for k, v in total.items()})
            out.write(record)
        return result

    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *a, **kw):
        state["eval_iteration"], state["eval_prefix"] = iteration, prefix
        return plain_eval_print(prefix, forward_step_func, data_iterator, model, iteration, *a, **kw)

    loop.training_log = training_log
    loop.evaluate = evaluate
    loop.evaluate_and_print_results = evaluate_and_print_results
    loop._megatron_sed_metrics = out
