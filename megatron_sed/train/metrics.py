"""--metrics-file: the values of Megatron's log lines as JSON lines, for scripts and plots.

Megatron's loop prints its training line from `training_log` (every iteration it gets
the iteration's reduced report: `lm loss`, `ce loss`, `sed reg`, ... as means over the
global batch) and its validation line from `evaluate_and_print_results`.
megatron_sed.megatron_patches hands those functions' values to the MetricsObserver, which,
on the rank that prints (the last one), appends per --log-interval

    {"iteration", "consumed_samples", "lr", "grad_norm", "loss_scale", "lm_loss",
     "ce_loss", "sed_reg", "sed_mask_rate", "entropy", "target_prob", "topk_mass",
     "top1_acc", "sed_threshold", "iter_time_ms", "tokens_per_sec",
     "skipped_iterations", "nan_iterations"}

plus "mtp_1_loss", ... with --mtp-num-layers (Megatron's per-iteration MTP head losses,
which it adds to its line's accumulators in `MTPLossLoggingHelper.track_mtp_metrics`;
the patches hand the observer those too) (report keys with "_" for " "; means over the interval's
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

import torch
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


class MetricsObserver:
    """Writes the --metrics-file records from what Megatron's log lines show. Megatron's
    functions hand it their values through megatron_sed.megatron_patches (the last rank
    only: the one that prints the lines)."""

    def __init__(self, path: str):
        self.out = MetricsFile(path)
        self.interval = _Interval()
        self.eval_iteration = None
        self.eval_prefix = ""
        self.mtp_losses: dict = {}  # this iteration's, filled while Megatron's training_log runs

    def iteration_started(self) -> None:
        self.mtp_losses.clear()

    def mtp_losses_logged(self, losses: dict) -> None:
        """The iteration's {"mtp_1 loss": tensor, ...} (MTPLossLoggingHelper's)."""
        self.mtp_losses.clear()
        self.mtp_losses.update(losses)

    def iteration_logged(
        self, loss_dict, learning_rate, iteration, loss_scale, skipped_iter, grad_norm
    ) -> None:
        """After Megatron's training_log: add the iteration, write a record per --log-interval."""
        args = get_args()
        st = self.interval
        st.add(loss_dict, skipped_iter, self.mtp_losses)
        if iteration % args.log_interval != 0 and iteration != args.train_iters:
            return
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
        self.out.write(record)
        self.interval = _Interval()

    def evaluation_started(self, prefix: str, iteration: int) -> None:
        self.eval_iteration, self.eval_prefix = iteration, prefix

    def evaluated(self, result) -> None:
        """Megatron's `evaluate` result: the validation (or test) record."""
        total = result[0] if result else None
        if not total:
            return
        split = "test" if "test set" in self.eval_prefix else "valid"
        record = {"iteration": self.eval_iteration}
        record.update({f"{split}_{_key(k)}": float(v) for k, v in total.items()})
        self.out.write(record)

    def close(self) -> None:
        self.out.close()
