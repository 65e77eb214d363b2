"""The one route by which SED enters Megatron-Core's GPTModel, for megatron-sed-train and
for the Megatron-LM patch alike.

- megatron-core >= 0.18: GPTModel's `output_processor` hook
  (megatron_sed.model.loss_hook.sed_output_processor). Only the main head goes through
  it; the multi-token-prediction heads keep Megatron's own CE (their loss is Megatron's
  `process_mtp_loss`, which calls the model's untouched `compute_language_model_loss`).
- older megatron-core (no hook): an instance override of `compute_language_model_loss`
  on each GPTModel. Those versions compute the MTP heads' losses through the same
  method, so --mtp-num-layers with SED is refused there (megatron_sed.flags).

Each forward gets its own `SEDLossContext`: the SED config in, the per-token statistics
of the main head out. megatron-sed-train creates it in forward_step and hands it to
`loss_func` with the loss (`partial(loss_func, ..., sed=ctx)`); Megatron-LM's
pretrain_gpt.py, whose forward_step / loss_func the patch cannot give an extra
argument, reads the context of the model's latest forward (`last_sed_context`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.models.common.language_module.language_module import LanguageModule

from megatron_sed.model.loss_hook import (
    sed_language_model_loss,
    sed_output_processor,
    supports_output_processor,
)
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.stats import SEDStats

# Attribute names set on the models (prefixed so they never clash with Megatron's).
_MODULES_ATTR = "_megatron_sed_targets"  # the GPTModels inside an outer model / wrapper
_CONTEXT_ATTR = "_megatron_sed_context"  # the context of the latest forward
_PENDING_ATTR = "_megatron_sed_pending"  # override route: the context of the next loss
_FORWARD_CFG_ATTR = "_megatron_sed_cfg"  # Megatron-LM glue: the config each forward uses


@dataclass
class SEDLossContext:
    """One forward's SED: `config` in; `stats` (per-token [s, b] tensors of the main head,
    detached) out, set by the loss when the forward had labels."""

    config: SEDConfig
    stats: Optional[SEDStats] = None

    def record(self, stats: SEDStats) -> None:
        """Where every SED loss path leaves its statistics (one place)."""
        self.stats = stats.detach()

    def take_stats(self) -> Optional[SEDStats]:
        """The statistics, cleared (a context reports once)."""
        stats, self.stats = self.stats, None
        return stats


def language_modules(model) -> list[torch.nn.Module]:
    """Every Megatron-Core LanguageModule (GPTModel, ...) inside `model`: a module, a
    wrapper (DDP, Float16Module) or a list of virtual-pipeline chunks. Found once per
    outer module (cached on it)."""
    outer = model if not isinstance(model, (list, tuple)) else None
    if outer is not None and _MODULES_ATTR in outer.__dict__:
        return outer.__dict__[_MODULES_ATTR]
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = [m for chunk in chunks for m in chunk.modules() if isinstance(m, LanguageModule)]
    if outer is not None:
        object.__setattr__(outer, _MODULES_ATTR, found)
    return found


def _tp_group_of(module):
    group = getattr(module, "tp_group", None)  # Megatron-Core >= 0.17
    if group is None:
        pgs = getattr(module, "pg_collection", None)
        group = getattr(pgs, "tp", None) if pgs is not None else None
    return group  # None: the op falls back to parallel_state's TP group


def _override_loss(self, labels: torch.Tensor, logits: torch.Tensor):
    """compute_language_model_loss on megatron-core without output_processor: SED with
    the context attached to the running forward (consumed), Megatron's CE without one."""
    ctx = self.__dict__.pop(_PENDING_ATTR, None)
    if ctx is None:
        return type(self).compute_language_model_loss(self, labels, logits)
    return sed_language_model_loss(self, labels, logits, ctx, tp_group=_tp_group_of(self))


def attach_sed(model, ctx: SEDLossContext) -> dict:
    """Make the next forward of `model` compute SED with `ctx`; returns the keyword
    arguments that forward must be called with (empty on the override route)."""
    hook = supports_output_processor()
    for module in language_modules(model):
        object.__setattr__(module, _CONTEXT_ATTR, ctx)
        if not hook:
            object.__setattr__(module, _PENDING_ATTR, ctx)
            if "compute_language_model_loss" not in module.__dict__:
                object.__setattr__(
                    module, "compute_language_model_loss", types.MethodType(_override_loss, module)
                )
    if isinstance(model, torch.nn.Module):
        object.__setattr__(model, _CONTEXT_ATTR, ctx)
    if hook:
        return dict(output_processor=sed_output_processor, output_processor_context=ctx)
    return {}


def last_sed_context(model) -> Optional[SEDLossContext]:
    """The context of the latest SED forward of `model` (None if it never ran one)."""
    if model is None:
        return None
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        ctx = chunk.__dict__.get(_CONTEXT_ATTR)
        if ctx is not None:
            return ctx
    for module in language_modules(model):
        ctx = module.__dict__.get(_CONTEXT_ATTR)
        if ctx is not None:
            return ctx
    return None


def _forward_with_sed(self, *args, **kwargs):
    """GPTModel.forward with this module's SED config and a fresh context per call (the
    Megatron-LM glue, whose pretrain_gpt.py calls the model without our arguments)."""
    ctx = SEDLossContext(self.__dict__[_FORWARD_CFG_ATTR])
    extra = attach_sed(self, ctx)
    return type(self).forward(self, *args, **extra, **kwargs)


def set_forward_config(model, cfg: SEDConfig) -> list[torch.nn.Module]:
    """Make every forward of the GPTModels in `model` compute SED with `cfg` (an instance
    override of `forward` that attaches a new context per call); re-callable to change
    the config. Returns the modules."""
    modules = language_modules(model)
    for module in modules:
        object.__setattr__(module, _FORWARD_CFG_ATTR, cfg)
        if "forward" not in module.__dict__:
            object.__setattr__(module, "forward", types.MethodType(_forward_with_sed, module))
    return modules


def forward_config(module) -> Optional[SEDConfig]:
    """The config `set_forward_config` gave this module (None if none)."""
    return module.__dict__.get(_FORWARD_CFG_ATTR)
