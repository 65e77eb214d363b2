"""SEDRuntime: the SED threshold state of one run, in one object.

It holds tau (decided once, by megatron_sed.calibration.resolve_threshold: --sed-threshold,
the resumed checkpoint's, calibrated with --sed-mask-ratio, or the default), the EMA
tracker of --sed-threshold-update ema, and the calibration guard (while the calibration
forwards run, the forward_step that started them re-enters and must compute the
statistics with the calibration config, and track nothing).

megatron-sed-train creates one in megatron_sed.train.launch and binds it into forward_step
(`partial(forward_step, runtime=runtime)`), which hands it to loss_func with the micro-batch;
Megatron's checkpoint save copies its EMA state into args first (megatron_sed.megatron_patches).
The Megatron-LM glue creates one in `install_sed_loss` and keeps it on the model it installs
SED on (pretrain_gpt.py gives its forward_step nothing else to carry it).

With the EMA, the config's threshold is the tracker's 0-dim device tensor, updated in place
after each iteration without a host sync (the statistics of a training iteration's
micro-batches go into a device histogram in loss_func; the update, one all-reduce, follows
the iteration's last micro-batch, so the next iteration uses the new tau); the host copy
(`state`, and `args.sed_threshold_state`, saved with Megatron's args) is refreshed by
`sync_to_args()` right before each checkpoint save, so a checkpoint saved after iteration
N holds the tau iteration N + 1 starts with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_sed.calibration.loop import CalibrationResult
from megatron_sed.calibration.recipes import recipe_from_args
from megatron_sed.calibration.resolve import ThresholdState, resolve_threshold
from megatron_sed.calibration.tracker import ThresholdEMA
from megatron_sed.flags import sed_config_from_args
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.stats import SEDStats


def calibration_config(args) -> SEDConfig:
    """What the calibration forwards compute with: the statistics at the recipe's top-k
    (--sed-calibration), the run's loss implementation and kernel options (the fused output layer
    included), no regulariser (their loss is not used)."""
    run = sed_config_from_args(args)
    k = recipe_from_args(args).top_k
    return SEDConfig(coef=0.0, top_k=k, threshold=1.0, mask="topk_mass", impl=run.impl, kernel=run.kernel)


class SEDRuntime:
    """tau, the EMA tracker and the calibration guard of one run (see the module doc)."""

    def __init__(self, args):
        self.args = args
        self.state: Optional[ThresholdState] = None  # None until resolved
        self.ema: Optional[ThresholdEMA] = None
        self.calibrating = False
        self._config: Optional[SEDConfig] = None
        self._microbatches = 0
        self._dp_group = None

    # -- tau -------------------------------------------------------------------------------

    def resolve(self, calibrate: Callable[[], CalibrationResult]) -> Optional[ThresholdState]:
        """Decide tau on the first call (`calibrate()` runs the calibration forwards when the
        rule calibrates); later calls, and calls made by those forwards, return at once."""
        if self.state is not None or self.calibrating:
            return self.state
        self.calibrating = True
        try:
            state = resolve_threshold(self.args, calibrate)
        finally:
            self.calibrating = False
        self._start(state)
        return state

    def _start(self, state: ThresholdState) -> None:
        args = self.args
        tau = state.tau
        if args.loss_type == "sed" and args.sed_threshold_update == "ema" and args.sed_threshold is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self.ema = ThresholdEMA(
                args.sed_mask_ratio, args.sed_threshold_ema, state.tau, args.sed_mask, device=device
            )
            if state.ema:
                self.ema.load_state_dict(state.ema)
            tau = self.ema.tau_tensor
            self._dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self._config = sed_config_from_args(args, threshold=tau)
        self.state = state

    @property
    def config(self) -> SEDConfig:
        """The SEDConfig a forward computes with: the calibration config while the
        calibration forwards run, the run's (with its tau) once resolved."""
        if self.calibrating:
            return calibration_config(self.args)
        if self._config is None:
            raise RuntimeError("SEDRuntime.config before resolve(): tau is not decided yet")
        return self._config

    # -- the EMA ---------------------------------------------------------------------------

    @property
    def _tracking(self) -> bool:
        return self.ema is not None and not self.calibrating

    def observe(self, stats: SEDStats, loss_mask: torch.Tensor) -> None:
        """A training micro-batch's statistics (added to the tracker's histogram, weighted
        by the loss mask); after the iteration's last micro-batch the EMA takes one step
        (one all-reduce over the data-parallel group). No host syncs."""
        if not self._tracking:
            return
        values = stats[self.args.sed_mask]  # [s, b]
        s, b = values.shape
        self.ema.observe(values, loss_mask.reshape(b, s).t())
        self._microbatches += 1
        if self._microbatches >= get_num_microbatches():
            self._microbatches = 0
            self.ema.step(self._dp_group)

    def sync_to_args(self) -> None:
        """Host copy of the EMA state into `state` and `args.sed_threshold_state` (reads
        the device tensors: call it when a checkpoint is saved, not per step)."""
        if self.ema is None or self.ema.num_updates == 0:
            return
        self.state.tau = self.ema.tau
        self.state.source, self.state.ema = "ema", self.ema.state_dict()
        self.args.sed_threshold_state = self.state.to_dict()

    def report(self, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`sed threshold` for Megatron's log line (as a [sum, count] pair of device
        tensors: Megatron reads them back at its log interval); nothing for masks without
        a threshold, or while calibrating."""
        args = self.args
        if self.state is None or self.calibrating:
            return {}
        if args.loss_type != "sed" or args.sed_mask not in ("topk_mass", "entropy"):
            return {}
        n = loss_mask.sum().float().clamp(min=1.0)
        tau = (
            self.ema.tau_tensor.to(n.device, torch.float32) if self.ema is not None else float(self.state.tau)
        )
        return {"sed threshold": torch.stack([n * tau, n])}
