"""Check that ``.ci/floors.txt`` pins every direct dependency at its floor in pyproject.toml.

Usage: ``python .ci/check_floors.py [pyproject.toml] [.ci/floors.txt]`` (``.ci/lock`` runs
it); ``python .ci/check_floors.py pyproject.toml --names`` lists the direct dependencies.

The floors lock is resolved with ``--resolution lowest-direct`` for the ``dev`` extra, so
each direct dependency (the package's own, and those of ``dev`` and the extras it includes)
should sit exactly at the ``>=`` bound of its range. A pin above the bound means the bound
does not install with the rest (``.ci/lock`` resolves the direct dependencies afresh every
time): raise it in pyproject.toml to what does. A pin below it means the lock is stale
(``bash .ci/lock --floors``). Exits non-zero with one line per problem.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest's own dependency
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

EXTRA = "dev"


def direct_requirements(pyproject: dict[str, object], extra: str = EXTRA) -> list[Requirement]:
    """The package's dependencies and those of `extra`, following self-references such as
    ``wsroom[test,docs]`` to the extras they name."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = canonicalize_name(project["name"])
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    found = [Requirement(text) for text in project.get("dependencies", [])]
    todo, seen = [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in extras[current]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def pins(lock_text: str) -> dict[str, set[Version]]:
    """``name==version`` lines of a ``uv pip compile`` output (any marker), by name."""
    found: dict[str, set[Version]] = {}
    for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock_text, re.M):
        found.setdefault(canonicalize_name(match[1]), set()).add(Version(match[2]))
    return found


def problems(pyproject: dict[str, object], lock_text: str) -> list[str]:
    pinned = pins(lock_text)
    found = []
    for requirement in direct_requirements(pyproject):
        bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        if not bounds:
            found.append(f"{requirement}: no '>=' floor in pyproject.toml")
            continue
        floor = max(bounds)
        versions = pinned.get(canonicalize_name(requirement.name))
        if not versions:
            found.append(f"{requirement}: not in the floors lock (bash .ci/lock --floors)")
        elif any(version > floor for version in versions):
            found.append(f"{requirement}: the floors lock pins {_show(versions)}: {floor} "
                         "does not install with the rest; raise the floor to what does")
        elif any(version < floor for version in versions) or floor not in versions:
            found.append(f"{requirement}: the floors lock pins {_show(versions)}, not "
                         f"{floor} (bash .ci/lock --floors)")
    return found


def _show(versions: set[Version]) -> str:
    return ", ".join(str(v) for v in sorted(versions))


def main(pyproject_path: str = "pyproject.toml", lock_path: str = ".ci/floors.txt") -> int:
    pyproject = tomllib.loads(Path(pyproject_path).read_text())
    if lock_path == "--names":  # for .ci/lock: the direct dependencies, one per line
        print("\n".join(sorted({canonicalize_name(r.name)
                                for r in direct_requirements(pyproject)})))
        return 0
    found = problems(pyproject, Path(lock_path).read_text())
    for problem in found:
        print(problem)
    if not found:
        print(f"ok: {lock_path} pins every direct dependency at its floor")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
