"""Static check: nothing on the network path can unpickle or evaluate code.

Walks the AST of every module under protocol/, nodeagent/ and coordinator/ that exists when the
test runs, so new files are covered without editing this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("protocol", "nodeagent", "coordinator")
# Modules that deserialize arbitrary objects (pickle-based or bytecode).
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
BANNED_CALLS = {"eval", "exec"}


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_name(func: ast.expr) -> str:
    """Return a dotted name for a call target, such as "torch.load" or "eval"."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def find_violations(source: str, filename: str) -> list[str]:
    """Return one message per unsafe import or call in `source`."""
    tree = ast.parse(source, filename=filename)
    torch_load_aliases = {"torch.load"}
    violations: list[str] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    violations.append(f"{where}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in BANNED_MODULES:
                violations.append(f"{where}: imports from {module}")
            if module == "torch":
                for alias in node.names:
                    if alias.name == "load":
                        torch_load_aliases.add(alias.asname or "load")
        elif isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name in BANNED_CALLS or name in {f"builtins.{call}" for call in BANNED_CALLS}:
                violations.append(f"{where}: calls {name}()")
            if name in {"__import__", "importlib.import_module", "import_module"} and node.args:
                target = node.args[0]
                if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in BANNED_MODULES:
                    violations.append(f"{where}: imports {target.value} dynamically")
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if name in torch_load_aliases and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                violations.append(f"{where}: calls {name}() without weights_only=True")
            if name in {"np.load", "numpy.load"} and _is_true(keywords.get("allow_pickle", ast.Constant(None))):
                violations.append(f"{where}: calls {name}() with allow_pickle=True")
    return violations


def _checked_files() -> list[Path]:
    files: list[Path] = []
    for package in CHECKED_PACKAGES:
        directory = ROOT / package
        if directory.is_dir():
            files.extend(sorted(directory.rglob("*.py")))
    return files


def test_no_pickle_tree_is_clean() -> None:
    files = _checked_files()
    assert files, f"no Python files found under {CHECKED_PACKAGES} in {ROOT}"
    violations: list[str] = []
    for path in files:
        violations.extend(find_violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    assert violations == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import cPickle as p",
        "from dill import loads",
        "import marshal",
        "x = eval('1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
        "import torch\ntorch.load('f.pt')",
        "import torch\ntorch.load('f.pt', weights_only=False)",
        "from torch import load\nload('f.pt')",
        "__import__('pickle')",
        "import importlib\nimportlib.import_module('pickle')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    ],
)
def test_no_pickle_checker_flags_unsafe(source: str) -> None:
    assert len(find_violations(source, "sample.py")) == 1


def test_no_pickle_checker_allows_safe() -> None:
    source = "import torch\nimport msgpack\ntorch.load('f.pt', weights_only=True)\nmsgpack.unpackb(b'')\n"
    assert find_violations(source, "sample.py") == []
