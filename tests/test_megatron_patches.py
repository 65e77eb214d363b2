"""Megatron is patched from one module: megatron_sed.megatron_patches (plus the CPU backend).

A static scan of every megatron_sed module: no other one assigns to (or setattr's, or
deletes) an attribute of anything imported from `megatron` (a module, a class, or a name
bound from one). And `apply` wraps each Megatron function once however often it runs,
and puts Megatron's own functions back.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import megatron_sed

PACKAGE = Path(megatron_sed.__file__).parent
ALLOWED = {"megatron_patches.py", "backend/cpu.py"}


def _root(node) -> str | None:
    """`a` of `a.b.c` / `a.b[i]` (not of a call: `get_args().x` is an object Megatron
    returns, not Megatron's code)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def megatron_attribute_writes(source: str) -> list[str]:
    """`line: code` of each write to an attribute of a megatron-bound name in `source`
    (names imported from megatron, and names assigned from those, in any scope)."""
    tree = ast.parse(source)
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {
                (a.asname or a.name.split(".")[0]) for a in node.names if a.name.split(".")[0] == "megatron"
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            bound |= {a.asname or a.name for a in node.names}
    changed = True
    while changed:  # aliases: cls = dopt.DistributedOptimizer
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _root(node.value) in bound:
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id not in bound:
                        bound.add(t.id)
                        changed = True
    writes = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            targets = [t for t in targets if isinstance(t, ast.Attribute)]
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("setattr", "delattr", "__setattr__", "__delattr__"):
                targets = [node.args[0]]
        if any(_root(t) in bound for t in targets):
            writes.append(f"{node.lineno}: {ast.unparse(node).splitlines()[0]}")
    return writes


def test_only_the_patch_module_changes_megatron():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in ALLOWED:
            writes = megatron_attribute_writes(path.read_text())
            if writes:
                found[rel] = writes
    assert not found, f"Megatron patched outside megatron_sed/megatron_patches.py: {found}"
    # the scan sees the patterns the plugin used before (a module attribute, a class
    # attribute through an alias, a lazily imported module, setattr on a class)
    old = """
import megatron.training.training as loop
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
import megatron.core.optimizer.distrib_optimizer as dopt
def f():
    from megatron.training import training
    training.save_checkpoint = None
    cls = dopt.DistributedOptimizer
    cls.state_dict = None
    setattr(MTPLossLoggingHelper, "track_mtp_metrics", None)
loop.training_log = None
"""
    assert len(megatron_attribute_writes(old)) == 4


def test_apply_wraps_once_and_is_undone(tmp_path):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from megatron.training import arguments, training

    from megatron_sed import megatron_patches
    from megatron_sed.calibration import SEDRuntime
    from megatron_sed.train.log_lines import ValidationLine
    from megatron_sed.train.metrics import MetricsObserver

    targets = [
        (arguments, "parse_args"),
        (DistributedOptimizer, "load_state_dict"),
        (MTPLossLoggingHelper, "track_mtp_metrics"),
        *[
            (training, n)
            for n in ("save_checkpoint", "training_log", "evaluate", "evaluate_and_print_results")
            + ("print_rank_last", "report_memory")
        ],
    ]

    def plain(owner, name):
        raw = inspect.getattr_static(owner, name)
        return raw.__func__ if isinstance(raw, staticmethod) else raw

    megatron = {t: plain(*t) for t in targets}
    args = argparse.Namespace(exit_signal_handler=False)
    restore = None
    try:
        for path in ("a.jsonl", "b.jsonl"):  # a second run in the same process
            restore = megatron_patches.apply(
                args,
                SEDRuntime(args),
                trainer_args=lambda parser: parser,
                validation_line=ValidationLine(),
                metrics=MetricsObserver(str(tmp_path / path)),
                memory_report=print,
            )
            for (owner, name), fn in megatron.items():
                now = plain(owner, name)
                assert now is not fn and now._megatron_sed_plain is fn, name  # one layer
        assert isinstance(inspect.getattr_static(MTPLossLoggingHelper, "track_mtp_metrics"), staticmethod)
    finally:
        if restore is not None:
            restore()
    assert {t: plain(*t) for t in targets} == megatron
