"""Which tau a run uses, decided once, by this one function, for megatron-sed-train and the
Megatron-LM glue alike (both through megatron_sed.calibration.SEDRuntime):

1. `--loss-type ce`: none (the regulariser is off; statistics are still computed);
2. `--sed-threshold`: that tau;
3. a resumed run (`--load` of a checkpoint at iteration > 0, not `--finetune`): the tau it
   had when that checkpoint was saved (calibrated or EMA-tracked), read from the args
   Megatron saves with every checkpoint (`sed_threshold_state`), in --load at --ckpt-step;
4. `--sed-mask-ratio`: calibrated on held-out data with the initial model
   (megatron_sed.calibration.loop);
5. otherwise megatron_sed.flags.DEFAULT_SED_THRESHOLD.

The result is written back to `args.sed_threshold_state` so every checkpoint carries it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_sed.checkpointing.layout import read_checkpoint_args
from megatron_sed.flags import DEFAULT_SED_THRESHOLD
from megatron_sed.utils.log import print_rank_0


@dataclass
class ThresholdState:
    tau: float
    source: str  # "ce", "--sed-threshold", "calibrated", "ema", "default"
    calibration: Optional[dict] = None  # CalibrationResult.to_dict() of the run's start
    ema: Optional[dict] = None  # ThresholdEMA.state_dict() (--sed-threshold-update ema)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ThresholdState:
        return cls(
            tau=float(d["tau"]),
            source=str(d.get("source") or "checkpoint"),
            calibration=d.get("calibration"),
            ema=d.get("ema"),
        )


def is_resumed(args) -> bool:
    return (
        bool(getattr(args, "load", None))
        and getattr(args, "iteration", 0) > 0
        and not getattr(args, "finetune", False)
    )


def saved_threshold_state(args) -> Optional[dict]:
    """The `sed_threshold_state` in the args of the checkpoint a resumed run loads (None
    when the run is not resumed, or the checkpoint cannot be read or holds none)."""
    if not is_resumed(args):
        return None
    try:
        saved = read_checkpoint_args(args.load, getattr(args, "ckpt_step", None))
    except (FileNotFoundError, ValueError):
        return None
    return getattr(saved, "sed_threshold_state", None)


def resolve_threshold(args, calibrate: Callable) -> ThresholdState:
    """The run's tau (see the module doc); `calibrate()` -> CalibrationResult runs the
    calibration forwards (called only for rule 4)."""
    saved = saved_threshold_state(args) if args.loss_type == "sed" and args.sed_threshold is None else None
    if args.loss_type != "sed":
        state = ThresholdState(DEFAULT_SED_THRESHOLD, "ce")
    elif args.sed_threshold is not None:
        state = ThresholdState(float(args.sed_threshold), "--sed-threshold")
    elif is_resumed(args) and saved and saved.get("tau") is not None:
        state = ThresholdState.from_dict(saved)
        print_rank_0(
            f"> megatron-sed: resumed run continues with SED threshold "
            f"tau={state.tau:.6g} ({state.source}) from {args.load}"
        )
    elif is_resumed(args) and args.sed_mask_ratio is not None:
        raise ValueError(
            f"--sed-mask-ratio: resuming from {args.load} (iteration {args.iteration}), whose "
            "checkpoint holds no SED threshold; pass the tau the run started with as "
            "--sed-threshold (its log says 'calibrated SED threshold tau=...'), or use "
            "--finetune to calibrate on the loaded model"
        )
    elif args.sed_mask_ratio is not None:
        result = calibrate()
        print_rank_0(result.log_line())
        state = ThresholdState(result.tau, "calibrated", result.to_dict())
    else:
        state = ThresholdState(DEFAULT_SED_THRESHOLD, "default")
    args.sed_threshold_state = state.to_dict()
    return state
