"""The SED threshold tau during a run of megatron-sed-train.

Resolved once, in the first forward_step (Megatron's loop has no hook between loading
the checkpoint and the first step), in this order:

1. `--loss-type ce`: no regulariser (mask "none"); the statistics are still logged.
2. `--sed-threshold`: that tau.
3. a resumed run (`--load` of a checkpoint at iteration > 0, not `--finetune`): the tau
   the run had when that checkpoint was saved (calibrated or EMA-tracked), read from the
   checkpoint's args (`sed_threshold_state`, saved by Megatron with every checkpoint).
4. `--sed-mask-ratio`: calibrated on held-out data with the initial model
   (megatron_sed.calibration.calibrate_with_forward_step, through this plugin's own
   forward_step, on unpacked samples so that --sed-calibration-samples counts samples).
5. otherwise the default tau (megatron_sed.arguments.DEFAULT_SED_THRESHOLD).

With `--sed-threshold-update ema` tau then follows the --sed-mask-ratio quantile of each
global batch (megatron_sed.calibration.ThresholdEMA): the statistics of a training
iteration's micro-batches are collected in loss_func and the update happens after the
iteration's last micro-batch, so the next iteration uses the new tau and a checkpoint
saved after iteration N holds the tau iteration N + 1 starts with.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_sed.arguments import DEFAULT_SED_THRESHOLD, sed_config_from_args
from megatron_sed.ops.config import SEDConfig
from megatron_sed.rank0 import print_rank_0

_runtime: Optional["SEDThreshold"] = None
_calibrating = False


class SEDThreshold:
    """Holds the SEDConfig the model runs with and keeps `args.sed_threshold_state` (what
    the checkpoints carry) current."""

    def __init__(self, args, tau: Optional[float], source: str, calibration: Optional[dict] = None):
        from megatron.core import parallel_state as ps

        self.args = args
        self.tau = tau
        self.source = source
        self.calibration = calibration
        self.ema = None
        self._pending: List[torch.Tensor] = []
        self._microbatches = 0
        if args.loss_type == "sed" and args.sed_threshold_update == "ema" and args.sed_threshold is None:
            from megatron_sed.calibration import ThresholdEMA

            self.ema = ThresholdEMA(args.sed_mask_ratio, args.sed_threshold_ema, tau, args.sed_mask)
            state = (getattr(args, "sed_threshold_state", None) or {}).get("ema")
            if state:
                self.ema.load_state_dict(state)
        self._dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self._sync_args()

    @property
    def config(self) -> SEDConfig:
        return sed_config_from_args(self.args, threshold=self.tau)

    @property
    def has_threshold(self) -> bool:
        return self.args.loss_type == "sed" and self.args.sed_mask in ("topk_mass", "entropy")

    def _sync_args(self) -> None:
        self.args.sed_threshold_state = {
            "tau": self.tau, "source": self.source, "calibration": self.calibration,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    # -- per micro-batch ---------------------------------------------------------------
    def observe(self, stats: Dict[str, torch.Tensor], loss_mask: torch.Tensor) -> None:
        """A training micro-batch's statistics; after the iteration's last micro-batch
        the EMA takes one step (a collective over the data-parallel group)."""
        if self.ema is None:
            return
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        values = stats[self.args.sed_mask]  # [s, b]
        s, b = values.shape
        keep = loss_mask.reshape(b, s).t().bool()
        self._pending.append(values[keep].float())
        self._microbatches += 1
        if self._microbatches >= get_num_microbatches():
            local = torch.cat(self._pending)
            self._pending, self._microbatches = [], 0
            self.tau = self.ema.update(local, self._dp_group)
            self._sync_args()

    def report(self, loss_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`sed threshold` for Megatron's log line (as a [sum, count] pair)."""
        if not self.has_threshold:
            return {}
        n = loss_mask.sum().float().clamp(min=1.0)
        return {"sed threshold": torch.stack([n * float(self.tau), n])}


def _resumed(args) -> bool:
    return bool(args.load) and getattr(args, "iteration", 0) > 0 and not args.finetune


def _resolve(args, model) -> SEDThreshold:
    from megatron_sed.train.checkpoint_args import loaded_checkpoint_args

    if args.loss_type != "sed":
        return SEDThreshold(args, DEFAULT_SED_THRESHOLD, "ce")
    if args.sed_threshold is not None:
        return SEDThreshold(args, args.sed_threshold, "--sed-threshold")
    if _resumed(args):
        saved = getattr(loaded_checkpoint_args(), "sed_threshold_state", None) or {}
        if saved.get("tau") is not None:
            args.sed_threshold_state = saved
            print_rank_0(f"> megatron-sed: resumed run continues with SED threshold "
                         f"tau={saved['tau']:.6g} ({saved.get('source')}) from {args.load}")
            return SEDThreshold(args, float(saved["tau"]), saved.get("source") or "checkpoint",
                                saved.get("calibration"))
        if args.sed_mask_ratio is not None:
            raise ValueError(
                f"--sed-mask-ratio: resuming from {args.load} (iteration {args.iteration}), whose "
                "checkpoint holds no SED threshold; pass the tau the run started with as "
                "--sed-threshold (its log says 'calibrated SED threshold tau=...'), or use "
                "--finetune to calibrate on the loaded model")
    if args.sed_mask_ratio is not None and args.sed_mask in ("topk_mass", "entropy"):
        result = _calibrate(args, model)
        return SEDThreshold(args, result.tau, "calibrated", result.to_dict())
    return SEDThreshold(args, DEFAULT_SED_THRESHOLD, "default")


def _calibrate(args, model):
    from megatron_sed.calibration import calibrate_with_forward_step
    from megatron_sed.train.data import build_datasets
    from megatron_sed.train.step import forward_step

    global _calibrating

    def unpacked_heldout(num_rows):
        # One sample per row (so rows count samples), one pass: its length is the number
        # of held-out samples there are.
        return build_datasets(args, (1, None, 1), pack=False)[1]

    _calibrating = True
    try:
        result = calibrate_with_forward_step(args, model, forward_step, unpacked_heldout)
    finally:
        _calibrating = False
    print_rank_0(result.log_line())
    return result


class _CalibrationPlaceholder:
    """What forward_step / loss_func see while the calibration forwards run: a config
    that computes the statistics and nothing to track."""

    def __init__(self, args):
        self.config = SEDConfig(coef=0.0, top_k=int(args.sed_top_k), threshold=1.0,
                                mask="topk_mass", impl=getattr(args, "sed_impl", "auto"))

    def observe(self, *a, **k):
        pass

    def report(self, *a, **k):
        return {}


def sed_threshold(args, model=None):
    """The run's SEDThreshold, resolved on first use (see the module doc)."""
    global _runtime
    if _calibrating:
        return _CalibrationPlaceholder(args)
    if _runtime is None:
        _runtime = _resolve(args, model)
    return _runtime


def reset() -> None:
    """Forget the resolved threshold (tests that run several trainings in one process)."""
    global _runtime
    _runtime = None
