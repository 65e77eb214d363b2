"""Glue between megatron-sed and Megatron-LM's `pretrain_gpt.py`.

The patches in patches/megatron-lm/ add three calls to `pretrain_gpt.py`:

1. `extra_args_provider(base)` where Megatron-LM parses its arguments: adds the
   `--loss-type` / `--sed-*` flags (the same `add_sed_args` our trainer uses) and
   checks them right after parsing, so a bad value fails like any Megatron flag.
2. `install_sed_loss(model, args, forward_step, datasets_provider)` in `forward_step`:
   with `--loss-type sed` it makes every Megatron-Core `GPTModel` in `model` compute SED
   on its vocab-parallel `[s, b, V/tp]` logits by the route megatron-sed-train uses
   (megatron_sed.model.sed_route: GPTModel's `output_processor` hook where megatron-core
   has it, so the multi-token-prediction heads keep Megatron's CE; the
   `compute_language_model_loss` override before). pretrain_gpt.py calls the model
   without extra arguments, so an instance override of the GPTModel's `forward` adds
   them, with a fresh per-forward context.
   Idempotent and cheap after the first call; logs once per model; a no-op for
   `--loss-type ce`. The first call gives the model the run's SEDRuntime
   (megatron_sed.calibration.runtime), which resolves tau: --sed-threshold, the resumed
   checkpoint's, or calibrated with `--sed-mask-ratio` on held-out data through
   pretrain_gpt's own `forward_step` and dataset provider
   (megatron_sed.megatron_lm.calibration).
3. `add_sed_report(report, loss_mask, model)` in `loss_func`: the SED statistics of
   the micro-batch the model just ran, as `[sum, count]` pairs over the loss-masked
   tokens. Megatron's training loop sums such pairs over micro-batches, all-reduces
   them over the data-parallel group and logs `sum / count` (console and TensorBoard),
   exactly as it does for `lm loss`.

Nothing here imports Megatron-LM (`megatron.training`): only Megatron-Core, so the
installer is testable on a bare GPTModel.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Optional

import torch

from megatron_sed import megatron_patches
from megatron_sed.calibration import SEDRuntime, calibration_config
from megatron_sed.flags import add_sed_args, linear_fusion_requested, validate_sed_args
from megatron_sed.megatron_lm.calibration import calibrate_in_pretrain_gpt
from megatron_sed.model.sed_route import (
    forward_config,
    language_modules,
    last_sed_context,
    set_forward_config,
)
from megatron_sed.ops.stats import STAT_FIELDS, sed_report
from megatron_sed.utils.log import print_rank_0

__all__ = [
    "REPORT_KEYS",
    "add_sed_args",
    "add_sed_report",
    "extra_args_provider",
    "install_sed_loss",
    "runtime_of",
    "validate_megatron_lm_sed_args",
]

# report key (what Megatron-LM prints and writes to TensorBoard) -> SED stat name.
# `lm loss` stays Megatron's own key for the optimised objective (ce + reg under SED).
REPORT_KEYS = {f.report_key: f.name for f in STAT_FIELDS}

# Set on each GPTModel SED is installed on: the run's SEDRuntime (prefixed so it never
# clashes with Megatron's attributes).
_RUNTIME_ATTR = "_megatron_sed_runtime"


# ----------------------------------------------------------------------------- flags


def validate_megatron_lm_sed_args(args: argparse.Namespace) -> None:
    """`validate_sed_args` (all the SED checks) plus what pretrain_gpt.py cannot do: the
    EMA-tracked tau (its updates need megatron-sed-train's loss function)."""
    validate_sed_args(args)
    if getattr(args, "sed_fused_chunk_tokens", None) is not None:
        raise ValueError(
            "--sed-fused-chunk-tokens sizes megatron-sed-train's fused output layer + loss; "
            "Megatron-LM's pretrain_gpt.py computes SED on materialised logits: drop it"
        )
    if getattr(args, "loss_type", "ce") != "sed":
        return
    if linear_fusion_requested(args):
        raise ValueError(
            "--cross-entropy-fusion-impl linear: with pretrain_gpt.py, SED replaces "
            "compute_language_model_loss, which receives materialised logits (a fused "
            "Megatron CE would bypass SED); use native there, or megatron-sed-train, whose "
            "linear fusion computes SED from the hidden states"
        )
    if getattr(args, "sed_threshold_update", "fixed") != "fixed":
        raise ValueError(
            "--sed-threshold-update ema is only available in megatron-sed's own trainer; "
            "Megatron-LM's pretrain_gpt.py uses a fixed tau (--sed-threshold, or calibrated "
            "once with --sed-mask-ratio)"
        )


def extra_args_provider(base: Optional[Callable] = None) -> Callable:
    """An `extra_args_provider` for Megatron-LM's `parse_args`: adds the SED flags, then
    whatever `base` adds (e.g. ModelOpt's), and makes the parser check the SED flags
    right after parsing (an argparse error naming the flag, exit status 2)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_sed_args(parser)
        if base is not None:
            parser = base(parser)
        # the SED flags checked right after parsing (the one patch the glue makes)
        megatron_patches.check_after_parsing(parser, validate_megatron_lm_sed_args)
        return parser

    return provider


# ------------------------------------------------------------------------- installer


def install_sed_loss(
    model,
    args: argparse.Namespace,
    forward_step: Optional[Callable] = None,
    datasets_provider: Optional[Callable] = None,
) -> int:
    """Make the GPTModels in `model` compute SED when `args.loss_type == "sed"`.

    Opt-in (nothing happens for `--loss-type ce` or without the flag), idempotent (a
    second call with the same model returns at once), logged once per model. Replaces
    Megatron's CE and its fused variants (--cross-entropy-loss-fusion) on those models only.
    The first call gives the model its megatron_sed.calibration.SEDRuntime, which resolves
    tau: with --sed-mask-ratio it calibrates with pretrain_gpt's `forward_step` and
    `datasets_provider` (megatron_sed.megatron_lm.calibration), or reuses the tau of the
    run it resumes. Returns the number of modules that compute SED (0 for ce)."""
    if getattr(args, "loss_type", "ce") != "sed":
        return 0
    targets = language_modules(model)
    if runtime_of(targets) is not None:  # installed, or its calibration forwards calling us
        return len(targets)
    validate_megatron_lm_sed_args(args)
    if not targets:
        raise TypeError(
            "install_sed_loss: found no Megatron-Core LanguageModule (GPTModel) in the "
            f"model ({type(model).__name__}); --loss-type sed needs a Megatron-Core GPTModel "
            "(not --use-legacy-models)"
        )
    runtime = SEDRuntime(args)
    for module in targets:
        object.__setattr__(module, _RUNTIME_ATTR, runtime)
    try:
        if getattr(args, "sed_mask_ratio", None) is not None:  # what calibration forwards compute
            set_forward_config(model, calibration_config(args))
        runtime.resolve(lambda: calibrate_in_pretrain_gpt(args, model, forward_step, datasets_provider))
    except BaseException:
        for module in targets:  # not installed: a later call starts again
            module.__dict__.pop(_RUNTIME_ATTR, None)
        raise
    cfg = runtime.config
    set_forward_config(model, cfg)
    fusion = getattr(getattr(targets[0], "config", None), "cross_entropy_loss_fusion", False)
    print_rank_0(
        f"> megatron-sed: --loss-type sed: GPTModel computes SED-SFT on its vocab-parallel "
        f"logits (coef={cfg.coef}, top_k={cfg.top_k}, threshold={cfg.threshold}, "
        f"mask={cfg.mask}, regularizer={cfg.regularizer}, impl={cfg.impl})"
        + ("; replaces --cross-entropy-loss-fusion" if fusion else "")
    )
    return len(targets)


def runtime_of(model) -> Optional[SEDRuntime]:
    """The SEDRuntime `install_sed_loss` gave the GPTModels in `model` (None before)."""
    for module in language_modules(model):
        runtime = module.__dict__.get(_RUNTIME_ATTR)
        if runtime is not None:
            return runtime
    return None


# ---------------------------------------------------------------------------- report


def _targets(model) -> Iterable[torch.nn.Module]:
    if model is None:
        return []
    return [m for m in language_modules(model) if forward_config(m) is not None]


def add_sed_report(report: dict, loss_mask: torch.Tensor, model) -> dict:
    """Add the SED stats of the micro-batch `model` just ran to Megatron's report dict
    (in place; also returned). A no-op when the model computes plain CE."""

    if not _targets(model):
        return report
    ctx = last_sed_context(model)  # Megatron calls loss_func right after each forward
    stats = ctx.take_stats() if ctx is not None else None
    if stats is not None:
        report.update(sed_report(stats, loss_mask))
    return report
