"""The SED threshold tau: quantile math (quantile.py), the calibration loop that runs
held-out samples through a Megatron forward_step (loop.py), the per-run decision of which
tau to use (resolve.py), the EMA tracker (tracker.py) with its fixed-size histogram
(histogram.py), and the run's state holding them (runtime.py: SEDRuntime). Shared by
megatron-sed-train and the Megatron-LM glue; which statistic and positions: recipes.py."""

from megatron_sed.calibration.loop import CalibrationResult, calibrate_with_forward_step, heldout_batches
from megatron_sed.calibration.quantile import (
    QUANTILE_SIDE,
    exact_quantile,
    fraction_below,
    gather_variable_length,
    quantile_level,
    threshold_from_masses,
)
from megatron_sed.calibration.recipes import CalibrationRecipe, recipe_from_args
from megatron_sed.calibration.resolve import (
    ThresholdState,
    is_resumed,
    resolve_threshold,
    saved_threshold_state,
)
from megatron_sed.calibration.runtime import SEDRuntime, calibration_config
from megatron_sed.calibration.tracker import ThresholdEMA

__all__ = [
    "QUANTILE_SIDE",
    "CalibrationRecipe",
    "CalibrationResult",
    "SEDRuntime",
    "ThresholdEMA",
    "ThresholdState",
    "calibrate_with_forward_step",
    "calibration_config",
    "exact_quantile",
    "fraction_below",
    "gather_variable_length",
    "heldout_batches",
    "is_resumed",
    "quantile_level",
    "recipe_from_args",
    "resolve_threshold",
    "saved_threshold_state",
    "threshold_from_masses",
]
