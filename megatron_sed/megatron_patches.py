"""Every change megatron-sed makes to Megatron's own behaviour, outside the CPU backend.

Each patch is one function below saying what Megatron does, why the plugin changes it,
the version it was written against and when it can go. Only the hooking lives here; what
the hooks call stays in its own module (tau: megatron_sed.calibration.runtime; the metrics
file: megatron_sed.train.metrics; the log lines: megatron_sed.train.log_lines). The CPU
backend (megatron_sed.backend.cpu) is the other place that changes what Megatron sees:
torch.cuda on a machine without a GPU, installed and undone there.

    apply(args, runtime, ...)   megatron-sed-train's patches, before pretrain()
    check_after_parsing(...)    the Megatron-LM glue's one patch (its extra_args_provider)

`apply` is idempotent and undoable: every wrapper remembers the Megatron function it wraps;
`apply` first puts back whatever an earlier `apply` wrapped, then wraps Megatron's own
functions for this run's objects (never a stack of wrappers), and returns the function that
puts Megatron's functions back.

Written against megatron-core 0.19.2 (with the megatron.training it ships); the glue's
patch also against 0.16.1. megatron.training is imported inside `apply` only: the glue
runs on a megatron-core without it (0.16.1's wheel has none; Megatron-LM brings its own).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

import torch
from megatron.core.optimizer import distrib_optimizer
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

if TYPE_CHECKING:  # a leaf module: what the hooks call is handed to apply()
    from megatron_sed.calibration.runtime import SEDRuntime

# On each wrapper: the Megatron function it wraps (a re-apply wraps that one again).
_PLAIN_ATTR = "_megatron_sed_plain"


def _megatron_functions(training, arguments) -> list[tuple[object, str]]:
    """Every (owner, name) a patch of `apply` wraps."""
    loop = ("save_checkpoint", "training_log", "evaluate_and_print_results", "evaluate", "print_rank_last")
    return [
        (arguments, "parse_args"),
        (distrib_optimizer.DistributedOptimizer, "state_dict"),
        (distrib_optimizer.DistributedOptimizer, "load_state_dict"),
        (MTPLossLoggingHelper, "track_mtp_metrics"),
        *[(training, name) for name in (*loop, "report_memory")],
    ]


def _unwrap(owner, name: str) -> None:
    """Put Megatron's own function back where a wrapper of ours is."""
    raw = inspect.getattr_static(owner, name)
    static = isinstance(raw, staticmethod)
    plain = getattr(raw.__func__ if static else raw, _PLAIN_ATTR, None)
    if plain is not None:
        setattr(owner, name, staticmethod(plain) if static else plain)


def _wrap(owner, name: str, make: Callable[[Callable], Callable], undo: list) -> None:
    """owner.name = make(plain), `plain` being Megatron's own function (under any wrapper a
    previous apply left); a staticmethod stays one. Records how to put `plain` back."""
    raw = inspect.getattr_static(owner, name)
    static = isinstance(raw, staticmethod)
    current = raw.__func__ if static else raw
    plain = getattr(current, _PLAIN_ATTR, current)
    wrapper = functools.wraps(plain)(make(plain))
    setattr(wrapper, _PLAIN_ATTR, plain)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)
    undo.append(lambda: setattr(owner, name, staticmethod(plain) if static else plain))


def _arguments(plain: Callable) -> Callable[[tuple, dict], dict]:
    """Megatron's arguments by parameter name (bound by its signature, so a wrapper need
    not restate the parameter list)."""
    signature = inspect.signature(plain)
    return lambda a, kw: signature.bind(*a, **kw).arguments


# ----------------------------------------------------------------------- checkpoints


def _template_state_dict_for_torch_adam(undo: list) -> None:
    """DistributedOptimizer.state_dict() with torch's Adam (no apex, no Transformer Engine:
    every CPU run, GPU runs without either) asserts that all parameters share one Adam step
    count, which fails while the optimizer has no state yet, i.e. exactly when Megatron
    builds the template to *load* a distributed-optimizer checkpoint into. A fresh torch
    Adam's step is 0: the wrapper shows state_dict() one entry with step 0 for the duration
    of that call (the loaded value replaces it).

    megatron-core 0.19.2 (and 0.16.1): `assert len(steps) == 1` in the non-apex branch of
    DistributedOptimizer.state_dict. Drop it when that branch accepts an optimizer without
    state (test: tests/train/test_engine_checkpoint.py resumes with the distributed optimizer)."""
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return

    def make(plain):
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

        return state_dict

    _wrap(distrib_optimizer.DistributedOptimizer, "state_dict", make, undo)


def _load_state_dict_keeps_torch_adam_steps(undo: list) -> None:
    """DistributedOptimizer.load_state_dict() (a) copies the loaded values into parameters
    that require grad outside no_grad (autograd refuses the in-place copy), and (b) with
    torch's Adam gives every parameter's state the *same* 0-dim `step` tensor, which torch's
    Adam increments in place once per parameter: after a resume the bias correction used a
    step count N times too large and the run diverged from the uninterrupted one. The
    wrapper loads under no_grad and gives each state its own step tensor.

    megatron-core 0.19.2: `s["step"] = step` shared in the non-apex branch. Drop it when
    that branch clones the step per state (as its HybridDeviceOptimizer branch already does)
    and loads under no_grad (test: tests/train/test_engine_checkpoint.py, the resumed
    iterations equal the uninterrupted run's bit for bit)."""
    torch_adam = not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)

    def make(plain):
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

        return load_state_dict

    _wrap(distrib_optimizer.DistributedOptimizer, "load_state_dict", make, undo)


def _checkpoint_writer_ignores_exit_signal(args) -> None:
    """Megatron's async checkpoint writer reports through a multiprocessing Manager queue
    created on the first save; that manager is a child process which inherits the signal
    dispositions of the moment. With --exit-signal-handler the job's preemption signal
    (SIGTERM, --exit-signal) reaches the whole process group, so it killed the manager and
    the save meant to preserve the job failed. Creating the queue up front with those
    signals ignored makes the manager outlive them (the trainer's handlers are restored).

    megatron-core 0.19.2: filesystem_async.get_write_results_queue. Drop it when Megatron
    creates the manager with the exit signals blocked (test:
    tests/slurm/test_slurm_two_node_sed.py preempts a job mid-run and requeues it)."""
    if not getattr(args, "exit_signal_handler", False):
        return
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (  # noqa: PLC0415 (megatron-core >= 0.19)
        get_write_results_queue,
    )

    sigs = {signal.SIGTERM, signal.Signals(int(args.exit_signal))}
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        get_write_results_queue()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _save_checkpoint_syncs_tau(training, runtime: SEDRuntime, undo: list) -> None:
    """Megatron saves `args` with every checkpoint; with --sed-threshold-update ema the
    run's tau lives in a device tensor (no host sync per step). The wrapper of the
    save_checkpoint that Megatron's loop calls copies it into `args.sed_threshold_state`
    right before each save, so a resumed run continues with the tau it stopped at.

    megatron.training 0.19.2 (training.save_checkpoint, looked up in the loop's module on
    every save). Megatron has no hook for state saved with a checkpoint: no version drops it."""

    def make(plain):
        def save_checkpoint(*a, **kw):
            runtime.sync_to_args()
            return plain(*a, **kw)

        return save_checkpoint

    _wrap(training, "save_checkpoint", make, undo)


# ----------------------------------------------------------------------------- flags


def _reparse_with_plugin_flags(arguments, trainer_args: Callable, undo: list) -> None:
    """pretrain() re-parses the command line with Megatron's bare parser (fault
    tolerance's and in-process restart's set-up call `arguments.parse_args` without an
    extra_args_provider), which refuses the flags the plugin adds and the values it adds to
    Megatron's own (--cross-entropy-fusion-impl linear, the tokenizer aliases): the
    re-parse gets the plugin's flags too (`trainer_args`, megatron_sed.train.arguments').

    megatron.training 0.19.2 (ft_integration.py, inprocess_restart.py). Drop it when
    pretrain() passes its extra_args_provider to those re-parses."""

    def make(plain):
        def parse_args(extra_args_provider=None, ignore_unknown_args=False):
            return plain(extra_args_provider or trainer_args, ignore_unknown_args)

        return parse_args

    _wrap(arguments, "parse_args", make, undo)


def check_after_parsing(
    parser: argparse.ArgumentParser, validate: Callable[[argparse.Namespace], None]
) -> None:
    """Megatron-LM's parse_args validates its own flags long after parsing, and not the
    ones an extra_args_provider adds. The glue wraps `parse_known_args` on the parser
    instance Megatron-LM hands its extra_args_provider (parse_args() goes through it too),
    so `validate` (raising ValueError) runs right after parsing and a bad SED flag fails as
    an argparse error naming it, exit status 2. Idempotent per parser.

    Megatron-LM with megatron-core 0.16.1 and 0.19.x (megatron/training/arguments.py).
    Megatron has no hook for it: no version drops it."""
    if getattr(parser, "_megatron_sed_checked", False):
        return
    parse_known_args = parser.parse_known_args

    def checked_parse_known_args(*a, **kw):
        namespace, rest = parse_known_args(*a, **kw)
        try:
            validate(namespace)
        except ValueError as err:
            parser.error(str(err))
        return namespace, rest

    parser.parse_known_args = checked_parse_known_args
    parser._megatron_sed_checked = True


# ------------------------------------------------------------------------- log lines


def _metrics_file_observes_the_loop(training, metrics, undo: list) -> None:
    """--metrics-file: Megatron prints its training line from `training_log` (with the
    iteration's reduced report) and its validation line from `evaluate_and_print_results`
    (from `evaluate`'s result), and writes nowhere a script could read them. The wrappers
    hand `metrics` (megatron_sed.train.metrics.MetricsObserver) the values those lines
    show; Megatron's lines are unchanged.

    megatron.training 0.19.2; the loop looks these functions up in its module on every
    call. training_log's and evaluate_and_print_results' arguments are read by name from
    Megatron's signature. Megatron has no machine-readable log: no version drops it."""

    def make_training_log(plain):
        named = _arguments(plain)

        def training_log(*a, **kw):
            metrics.iteration_started()
            result = plain(*a, **kw)
            v = named(a, kw)
            metrics.iteration_logged(
                loss_dict=v["loss_dict"],
                learning_rate=v["learning_rate"],
                iteration=v["iteration"],
                loss_scale=v["loss_scale"],
                skipped_iter=v["skipped_iter"],
                grad_norm=v["grad_norm"],
            )
            return result

        return training_log

    def make_evaluate_and_print_results(plain):
        named = _arguments(plain)

        def evaluate_and_print_results(*a, **kw):
            v = named(a, kw)
            metrics.evaluation_started(v["prefix"], v["iteration"])
            return plain(*a, **kw)

        return evaluate_and_print_results

    _wrap(training, "training_log", make_training_log, undo)
    _wrap(training, "evaluate_and_print_results", make_evaluate_and_print_results, undo)


def _metrics_file_sees_mtp_losses(metrics, undo: list) -> None:
    """Megatron adds the multi-token-prediction heads' losses to its training line's
    accumulators in `MTPLossLoggingHelper.track_mtp_metrics` (called from training_log,
    after reducing them over the data-parallel ranks): the iteration's own values never
    reach training_log's caller. The wrapper gives Megatron's function an empty dict, hands
    the iteration's {"mtp_1 loss": tensor, ...} it fills to `metrics`, then adds them to
    the line's accumulators as Megatron does. No collective of its own, so installing it on
    the last rank only is safe.

    megatron-core 0.19.2 (and 0.16.1: same signature). Drop it when training_log's caller
    gets the iteration's MTP losses."""

    def make(plain):
        named = _arguments(plain)

        def track_mtp_metrics(*a, **kw):
            v = dict(named(a, kw))
            total = v.pop("total_loss_dict", None)
            mine: dict = {}
            plain(**v, total_loss_dict=mine)
            metrics.mtp_losses_logged(mine)
            if total is not None:
                for name, loss in mine.items():
                    total[name] = total.get(name, torch.zeros_like(loss)) + loss

        return track_mtp_metrics

    _wrap(MTPLossLoggingHelper, "track_mtp_metrics", make, undo)


def _evaluate_result_seen(training, observers: list, undo: list) -> None:
    """Megatron's `evaluate` returns the validation report its line then prints: the
    metrics file records it and the validation line's rewrite learns from it which keys
    get no "PPL" field (observers' `evaluated(result)`, in order).

    megatron.training 0.19.2 (looked up in the loop's module on every call)."""

    def make(plain):
        def evaluate(*a, **kw):
            result = plain(*a, **kw)
            for observer in observers:
                observer.evaluated(result)
            return result

        return evaluate

    _wrap(training, "evaluate", make, undo)


def _validation_line_rewritten(training, line, undo: list) -> None:
    """Megatron's validation line prints `KEY value: x | KEY PPL: exp(x)` for every report
    key; for `sed mask rate`, `top1 acc`, `sed threshold`, ... a "PPL" means nothing. Its
    `print_rank_last` goes through `line.rewrite` (megatron_sed.train.log_lines
    .ValidationLine), which cuts those fields.

    megatron.training 0.19.2 (evaluate_and_print_results). Drop it when Megatron prints
    PPL for losses only."""

    def make(plain):
        def print_rank_last(message):
            plain(line.rewrite(message))

        return print_rank_last

    _wrap(training, "print_rank_last", make, undo)


def _memory_line_on_cpu(training, report: Callable, undo: list) -> None:
    """Megatron's memory line reads torch.cuda's allocator statistics, zeros under the CPU
    backend: there `report` (megatron_sed.train.log_lines.report_resident_memory) prints the
    process's resident memory instead. Installed only while the CPU backend is active.

    megatron.training 0.19.2 (training.report_memory, looked up on every call)."""

    def make(plain):
        def report_memory(name, process_group=None, *a, **kw):
            report(name, process_group)

        return report_memory

    _wrap(training, "report_memory", make, undo)


# ----------------------------------------------------------------------------- apply


def apply(
    args,
    runtime: SEDRuntime,
    *,
    trainer_args: Callable,
    validation_line,
    metrics=None,
    memory_report: Optional[Callable] = None,
) -> Callable[[], None]:
    """Install megatron-sed-train's patches (see each function above) for the run of `args`
    with its `runtime`; `metrics`: the --metrics-file observer (the last rank only, else
    None); `memory_report`: the CPU backend's memory line (None on a GPU). Returns the
    function that puts Megatron's functions back."""
    from megatron.training import arguments, training  # noqa: PLC0415 (absent where only the glue runs)

    for owner, name in _megatron_functions(training, arguments):
        _unwrap(owner, name)  # an earlier apply's wrappers (bound to another run) go first
    undo: list = []
    _reparse_with_plugin_flags(arguments, trainer_args, undo)
    _checkpoint_writer_ignores_exit_signal(args)
    _template_state_dict_for_torch_adam(undo)
    _load_state_dict_keeps_torch_adam_steps(undo)
    _save_checkpoint_syncs_tau(training, runtime, undo)
    if metrics is not None:
        _metrics_file_observes_the_loop(training, metrics, undo)
        _metrics_file_sees_mtp_losses(metrics, undo)
    _evaluate_result_seen(training, [o for o in (metrics, validation_line) if o is not None], undo)
    _validation_line_rewritten(training, validation_line, undo)
    if memory_report is not None:
        _memory_line_on_cpu(training, memory_report, undo)

    def restore() -> None:
        while undo:
            undo.pop()()

    return restore
