"""The SED threshold tau during a run of megatron-sed-train.

Decided in the first forward_step (Megatron's loop has no hook between loading the
checkpoint and the first step) by megatron_sed.calibration.resolve_threshold, the rule the
Megatron-LM glue uses too: explicit --sed-threshold, the resumed checkpoint's tau,
calibration with --sed-mask-ratio (held-out samples run through this plugin's own
forward_step, one sample per sequence so that --sed-calibration-samples counts samples),
or the default.

With `--sed-threshold-update ema` tau then follows the --sed-mask-ratio quantile of each
global batch (megatron_sed.calibration.ThresholdEMA): the statistics of a training
iteration's micro-batches are added to a device histogram in loss_func and the update
(one all-reduce, no host sync) happens after the iteration's last micro-batch, so the
next iteration uses the new tau; the state is copied to `args.sed_threshold_state`
(saved with Megatron's args) right before each checkpoint save, so a checkpoint saved
after iteration N holds the tau iteration N + 1 starts with.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_sed.calibration import (
    ThresholdEMA,
    ThresholdState,
    calibrate_with_forward_step,
    resolve_threshold,
)
from megatron_sed.calibration.recipes import recipe_from_args
from megatron_sed.flags import sed_config_from_args
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.stats import SEDStats
from megatron_sed.train.checkpoint_args import loaded_checkpoint_args
from megatron_sed.train.data import build_datasets

_runtime: Optional[SEDThreshold] = None
_calibrating = False


class SEDThreshold:
    """The SEDConfig the model runs with, the EMA tracker, and `args.sed_threshold_state`
    (what the checkpoints carry).

    With the EMA the config's threshold is the tracker's 0-dim device tensor, updated in
    place after each iteration without a host sync; the host copy (`state`, and
    `args.sed_threshold_state`) is refreshed by `sync_to_args()`, which runs before
    every checkpoint save (megatron_sed.train.threshold.install_checkpoint_sync) so a
    checkpoint holds exactly the tau the next iteration starts with."""

    def __init__(self, args, state: ThresholdState):
        self.args = args
        self.state = state
        self.ema = None
        self._microbatches = 0
        self._dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        tau = state.tau
        if args.loss_type == "sed" and args.sed_threshold_update == "ema" and args.sed_threshold is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self.ema = ThresholdEMA(
                args.sed_mask_ratio, args.sed_threshold_ema, state.tau, args.sed_mask, device=device
            )
            if state.ema:
                self.ema.load_state_dict(state.ema)
            tau = self.ema.tau_tensor
        self.config = sed_config_from_args(args, threshold=tau)

    @property
    def has_threshold(self) -> bool:
        return self.args.loss_type == "sed" and self.args.sed_mask in ("topk_mass", "entropy")

    def observe(self, stats: SEDStats, loss_mask: torch.Tensor) -> None:
        """A training micro-batch's statistics (added to the tracker's histogram, weighted
        by the loss mask); after the iteration's last micro-batch the EMA takes one step
        (one all-reduce over the data-parallel group). No host syncs."""
        if self.ema is None:
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
        tensors: Megatron reads them back at its log interval)."""
        if not self.has_threshold:
            return {}
        n = loss_mask.sum().float().clamp(min=1.0)
        tau = (
            self.ema.tau_tensor.to(n.device, torch.float32) if self.ema is not None else float(self.state.tau)
        )
        return {"sed threshold": torch.stack([n * tau, n])}


def sync_threshold_to_args() -> None:
    """Refresh args.sed_threshold_state from the device (before a checkpoint is saved)."""
    if _runtime is not None:
        _runtime.sync_to_args()


def install_checkpoint_sync() -> None:
    """Wrap the save_checkpoint that Megatron's training loop calls so the EMA state is
    copied to args (which Megatron saves with the checkpoint) right before each save."""
    from megatron.training import training  # noqa: PLC0415 (after the CPU backend is installed)

    plain = training.save_checkpoint
    if getattr(plain, "_megatron_sed_sync", False):
        return

    @functools.wraps(plain)
    def save_checkpoint(*args, **kwargs):
        sync_threshold_to_args()
        return plain(*args, **kwargs)

    save_checkpoint._megatron_sed_sync = True
    training.save_checkpoint = save_checkpoint


class _CalibrationPlaceholder:
    """What forward_step / loss_func see while the calibration forwards run: a config
    that computes the statistics with the recipe's k, and nothing to track."""

    def __init__(self, args):
        k = recipe_from_args(args).top_k
        # the run's kernel options: calibration forwards take the fused output layer too
        kernel = sed_config_from_args(args).kernel
        self.config = SEDConfig(coef=0.0, top_k=k, threshold=1.0, mask="topk_mass", kernel=kernel)

    def observe(self, *a, **k):
        pass

    def report(self, *a, **k):
        return {}


class _EveryPosition(torch.utils.data.Dataset):
    """The authors' calibration positions: every position of each sample, prompt and
    template tokens and the position after its last token included (the loss mask marks
    them all; padding stays out)."""

    def __init__(self, dataset):
        self.dataset = dataset
        for part in getattr(dataset, "datasets", [dataset]):  # a blend's components
            part.final_position = True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = dict(self.dataset[idx])
        item["loss_mask"] = (item["segment_ids"] >= 0).to(item["loss_mask"].dtype)
        return item


def _calibrate(args, model, forward_step):
    global _calibrating
    every_position = recipe_from_args(args).all_positions

    def unpacked_heldout(num_rows):
        # One sample per row (so rows count samples), one pass: its length is the number
        # of held-out samples there are.
        valid = build_datasets(args, (1, None, 1), pack=False)[1]
        return _EveryPosition(valid) if every_position and valid is not None else valid

    _calibrating = True
    try:
        return calibrate_with_forward_step(args, model, forward_step, unpacked_heldout)
    finally:
        _calibrating = False


def sed_threshold(args, model=None, forward_step=None):
    """The run's SEDThreshold, resolved on first use (see the module doc); `forward_step`
    (the plugin's, calling us) runs the calibration forwards."""
    global _runtime
    if _calibrating:
        return _CalibrationPlaceholder(args)
    if _runtime is None:
        saved = getattr(loaded_checkpoint_args(), "sed_threshold_state", None)
        state = resolve_threshold(args, saved, lambda: _calibrate(args, model, forward_step))
        _runtime = SEDThreshold(args, state)
    return _runtime
