"""The layers hold (docs/architecture.md): the import contracts of pyproject.toml pass,
and no object reads or writes another module's private attributes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "wsroom"


def test_the_import_contracts_hold() -> None:
    """Layers, a sans-I/O core, backplanes and the client apart from the runtime, and no
    import cycle between the modules of a package (TYPE_CHECKING imports included)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"),
                             "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def private_accesses(path: Path) -> list[tuple[int, str, bool]]:
    """Every ``something._name`` in `path` where something is not ``self``, ``cls``,
    ``super()`` or an imported module: ``(line, name, defined_here)``, where
    `defined_here` says whether a class of the same module defines ``_name`` (a method,
    a slot, or an attribute it assigns)."""
    tree = ast.parse(path.read_text())
    defined: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defined.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            defined.add(node.attr)
        elif isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__slots__"
                for target in node.targets):
            defined |= {item.value for item in ast.walk(node.value)
                        if isinstance(item, ast.Constant) and isinstance(item.value, str)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.Import):
            modules |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name, owner = node.attr, node.value
        if not name.startswith("_") or name.startswith("__"):
            continue
        if isinstance(owner, ast.Name) and owner.id in ({"self", "cls"} | modules):
            continue
        if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"):
            continue
        found.append((node.lineno, name, name in defined))
    return found


def test_no_object_reaches_into_another_modules_private_attributes() -> None:
    across = [f"{path.relative_to(ROOT)}:{line}: ._{name.lstrip('_')}"
              for path in sorted(SRC.rglob("*.py"))
              for line, name, defined_here in private_accesses(path) if not defined_here]
    assert across == []


def test_the_scan_sees_an_access_across_modules(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("class A:\n    def __init__(self):\n        self._mine = 1\n\n"
                      "def f(a, b):\n    return a._mine + b._theirs\n")
    assert private_accesses(sample) == [(6, "_mine", True), (6, "_theirs", False)]


@pytest.mark.parametrize("limit", [500])
def test_no_class_is_over_the_size_limit(limit: int) -> None:
    sizes = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                sizes[f"{path.relative_to(SRC)}:{node.name}"] = (
                    node.end_lineno - node.lineno + 1)
    assert {name: size for name, size in sizes.items() if size > limit} == {}
