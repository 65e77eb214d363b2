"""Work-arounds for megatron-core behaviour the plugin runs into, each narrowly scoped.

- DistributedOptimizer.state_dict() with torch's Adam (no apex, no Transformer Engine:
  every CPU run, and GPU runs without either) asserts that all parameters share one Adam
  step count, which fails while the optimizer has no state yet, i.e. exactly when Megatron
  builds the template to *load* a distributed-optimizer checkpoint into. A fresh torch
  Adam's step is 0; the shim shows the state_dict one entry with step 0 for the duration
  of that call (the loaded value replaces it).
- pretrain() re-parses the command line with Megatron's bare parser (fault tolerance's
  and in-process restart's setup), which refuses the values the plugin adds to Megatron's
  own flags (--cross-entropy-fusion-impl linear, the tokenizer aliases): the re-parse
  gets the plugin's flags too.
"""

from __future__ import annotations

import functools
import signal

import megatron.core.optimizer.distrib_optimizer as dopt
import torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue


def _fresh_torch_adam_state_dict() -> None:

    if getattr(dopt, "HAVE_APEX_OR_TE", True):
        return
    cls = dopt.DistributedOptimizer
    if getattr(cls.state_dict, "_megatron_sed_fix", False):
        return
    plain = cls.state_dict

    @functools.wraps(plain)
    def state_dict(self):
        inner = self.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if inner.state or not params:
            return plain(self)
        inner.state[params[0]] = {"step": torch.zeros((), dtype=torch.float32)}
        try:
            return plain(self)
        finally:
            inner.state.pop(params[0], None)

    state_dict._megatron_sed_fix = True
    cls.state_dict = state_dict


def _fix_distributed_optimizer_load() -> None:

    torch_adam = not getattr(dopt, "HAVE_APEX_OR_TE", True)
    cls = dopt.DistributedOptimizer
    if getattr(cls.load_state_dict, "_megatron_sed_fix", False):
        return
    plain = cls.load_state_dict

    @functools.wraps(plain)
    def load_state_dict(self, state_dict):
        with torch.no_grad():
            plain(self, state_dict)
        if not torch_adam:
            return
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            return
        step = float(steps.pop())
        for st in self.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)

    load_state_dict._megatron_sed_fix = True
    cls.load_state_dict = load_state_dict


def _signal_proof_checkpoint_writer(args) -> None:
    if not getattr(args, "exit_signal_handler", False):
        return
    sigs = {signal.SIGTERM, signal.Signals(int(args.exit_signal))}
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        get_write_results_queue()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _reparse_with_plugin_flags() -> None:

    from megatron.training import arguments  # noqa: PLC0415 (after the CPU backend is installed)

    from megatron_sed.train.arguments import add_trainer_args  # noqa: PLC0415 (imports this module's users)

    plain = arguments.parse_args
    if getattr(plain, "_megatron_sed_fix", False):
        return

    @functools.wraps(plain)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return plain(extra_args_provider or add_trainer_args, ignore_unknown_args)

    parse_args._megatron_sed_fix = True
    arguments.parse_args = parse_args


def apply(args) -> None:
    _reparse_with_plugin_flags()
    _signal_proof_checkpoint_writer(args)
    _fresh_torch_adam_state_dict()
    _fix_distributed_optimizer_load()
