"""The maps are true: every `megatron_sed.x.y[.z]` name and every repository path
(`megatron_sed/x/y.py`, `benchmarks/...`, `docs/...`) written in README.md, docs/*.md and
the package's docstrings exists, and the `name.py` files a package docstring lists are in
that package.

Resolved statically (ast), so nothing heavy is imported: a dotted name is a module (a
file or a package folder), optionally followed by a name that module defines at top level
(def, class, assignment) or re-exports from megatron_sed (an import from a third-party
package does not count: `megatron_sed.train.arguments.parse_args` would be Megatron's),
then attributes of a class defined there.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_sed"

DOTTED = re.compile(r"\bmegatron_sed(?:\.[A-Za-z_]\w*)+")
# a path in this repository: megatron_sed/train/step.py, benchmarks/gpu_check.py, docs/rl.md
REPO_PATH = re.compile(r"\b(?:megatron_sed|benchmarks|tests|scripts|examples|patches|docs)(?:/[\w.-]+)+/?")
BARE_FILE = re.compile(r"(?<![\w/.])(\w+)\.py\b")
# files of other projects a package docstring talks about
FOREIGN_FILES = {"pretrain_gpt.py"}


def _module_file(dotted: str) -> pathlib.Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


@functools.cache
def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _defined(body: list[ast.stmt], module: str) -> dict[str, ast.AST]:
    """Names a module (or class) body defines: node, or the dotted source of an import."""
    names: dict[str, ast.AST | str] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_sed"):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_sed") and alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. `try: import x except ImportError:`
            inner = list(node.body) + list(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                inner += handler.body
            names.update(_defined(inner, module))
    return names


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        path = _module_file(module)
        if path is None:
            continue
        return _attribute_exists(_tree(path).body, module, parts[i:])
    return False


def _attribute_exists(body: list[ast.stmt], module: str, rest: list[str]) -> bool:
    if not rest:
        return True
    found = _defined(body, module).get(rest[0])
    if found is None:
        # `megatron_sed.pkg.sub` when pkg/__init__.py does not import sub
        return _module_file(f"{module}.{rest[0]}") is not None and resolves(".".join([module, *rest]))
    if isinstance(found, str):  # re-exported from another megatron_sed module
        return resolves(".".join([found, *rest[1:]]))
    if isinstance(found, ast.ClassDef):
        return _attribute_exists(found.body, module, rest[1:])
    return len(rest) == 1


def _docstrings(path: pathlib.Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "name", "module docstring"), doc


def _texts():
    yield "README.md", (ROOT / "README.md").read_text()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        yield f"docs/{doc.name}", doc.read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        for where, doc in _docstrings(path):
            yield f"{path.relative_to(ROOT)} ({where})", doc


def test_resolver_tells_real_names_from_made_up_ones():
    """The checker itself: it must be able to fail."""
    assert resolves("megatron_sed.flags.add_sed_args")
    assert resolves("megatron_sed.model.build_gpt_model")  # re-exported by the package
    assert resolves("megatron_sed.data.synthetic")  # a module the package does not import
    assert resolves("megatron_sed.calibration.tracker.ThresholdEMA")
    assert not resolves("megatron_sed.data.arguments.add_data_args")
    assert not resolves("megatron_sed.train.loop_cpu")
    assert not resolves("megatron_sed.flags.add_sed_args.nope")
    # imported from Megatron into arguments.py: not a name of ours
    assert not resolves("megatron_sed.train.arguments.parse_args")


def test_every_dotted_name_and_path_exists():
    missing = []
    for where, text in _texts():
        for name in sorted(set(DOTTED.findall(text))):
            if not resolves(name):
                missing.append(f"{where}: {name}")
        for rel in sorted({p.rstrip(".") for p in REPO_PATH.findall(text)}):
            if not (ROOT / rel).exists():
                missing.append(f"{where}: {rel}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("init", sorted(PACKAGE.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_package_docstring_lists_its_own_files(init):
    doc = ast.get_docstring(_tree(init), clean=False) or ""
    missing = [
        f"{name}.py"
        for name in sorted(set(BARE_FILE.findall(doc)))
        if f"{name}.py" not in FOREIGN_FILES and not (init.parent / f"{name}.py").is_file()
    ]
    assert not missing, f"{init.relative_to(ROOT)} names files not in its package: {missing}"
