"""Check the built sdist and wheel in a folder (``uv build`` output) before anyone installs them.

Usage: ``python .ci/check_dist.py dist/``. Exits non-zero with one line per problem. What a
user of the wheel needs is in it (the package, ``py.typed`` for type checkers, the browser
client that ``wsroom.static_files()`` serves, the licence), and nothing else is (no tests,
benchmarks, examples or caches); the metadata names the dependency floors that CI tests.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

WHEEL_MUST_HAVE = ("wsroom/__init__.py", "wsroom/py.typed", "wsroom/static/wsroom.js")
WHEEL_FORBIDDEN = ("tests/", "benchmarks/", "examples/", "docs/", "__pycache__", ".pyc")
# Starlette before 0.49.1 has CVE-2025-62727 (Range headers in FileResponse/StaticFiles,
# which serve wsroom.static_files()).
STARLETTE_FLOOR = Version("0.49.1")
SDIST_MUST_HAVE = ("pyproject.toml", "README.md", "LICENSE", "PKG-INFO",
                   "src/wsroom/py.typed", "src/wsroom/static/wsroom.js")


def check_wheel(path: Path) -> list[str]:
    problems: list[str] = []
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if not n.endswith("/")]
        metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        metadata = (Parser().parsestr(wheel.read(metadata_name).decode())
                    if metadata_name else None)
    for must in WHEEL_MUST_HAVE:
        if must not in names:
            problems.append(f"{path.name}: {must} is missing")
    for name in names:
        top = name.split("/", 1)[0]
        if top != "wsroom" and not top.endswith(".dist-info"):
            problems.append(f"{path.name}: {name} is outside the package")
        if any(part in name for part in WHEEL_FORBIDDEN):
            problems.append(f"{path.name}: {name} should not be shipped")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append(f"{path.name}: the LICENSE file is missing")
    if metadata is None:
        problems.append(f"{path.name}: no METADATA")
    else:
        if metadata.get("Name") != "wsroom":
            problems.append(f"{path.name}: Name is {metadata.get('Name')!r}, not 'wsroom'")
        requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
        floors = [Version(s.version) for r in requires
                  if r.name == "starlette" and r.marker is None  # for everyone, no extra
                  for s in r.specifier if s.operator == ">="]
        if not floors or max(floors) < STARLETTE_FLOOR:
            problems.append(f"{path.name}: Requires-Dist has no unconditional "
                            f"starlette>={STARLETTE_FLOOR}: {[str(r) for r in requires]}")
        if metadata.get("License-Expression") != "MIT":
            problems.append(f"{path.name}: License-Expression is "
                            f"{metadata.get('License-Expression')!r}, not 'MIT'")
    return problems


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    missing = [must for must in SDIST_MUST_HAVE if must not in names]
    return [f"{path.name}: {must} is missing" for must in missing]


def main(folder: str) -> int:
    wheels = sorted(Path(folder).glob("wsroom-*.whl"))
    sdists = sorted(Path(folder).glob("wsroom-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {folder}, found {wheels + sdists}")
        return 1
    problems = check_wheel(wheels[0]) + check_sdist(sdists[0])
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {wheels[0].name}, {sdists[0].name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
