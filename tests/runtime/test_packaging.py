"""The release checks can fail, and the set-up commands agree with the build.

CI builds the sdist and wheel and runs `.ci/check_dist.py` on them, and checks the floors
lock with `.ci/check_floors.py` (`.ci/run`); these tests show that the checks reject what
they must reject. The README's commands install uv at one
pinned version, which must be the one the build backend's range admits: `uv build` and
`uv sync` use the `uv_build` inside that uv.
"""

from __future__ import annotations

import importlib.util
import io
import re
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_dist = _load("check_dist")
check_floors = _load("check_floors")

METADATA = """\
Metadata-Version: 2.4
Name: wsroom
Version: 0.1.0.dev0
License-Expression: MIT
Requires-Dist: starlette>=0.49.1
Requires-Dist: anyio>=4.7
"""
GOOD_WHEEL = {
    "wsroom/__init__.py": "",
    "wsroom/py.typed": "",
    "wsroom/static/wsroom.js": "export {}",
    "wsroom-0.1.0.dev0.dist-info/METADATA": METADATA,
    "wsroom-0.1.0.dev0.dist-info/licenses/LICENSE": "MIT",
}
GOOD_SDIST = ["pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "src/wsroom/__init__.py",
              "src/wsroom/py.typed", "src/wsroom/static/wsroom.js"]


def _build(folder: Path, wheel: dict[str, str], sdist: list[str]) -> Path:
    with zipfile.ZipFile(folder / "wsroom-0.1.0.dev0-py3-none-any.whl", "w") as archive:
        for name, text in wheel.items():
            archive.writestr(name, text)
    with tarfile.open(folder / "wsroom-0.1.0.dev0.tar.gz", "w:gz") as archive:
        for name in sdist:
            info = tarfile.TarInfo(f"wsroom-0.1.0.dev0/{name}")
            archive.addfile(info, io.BytesIO(b""))
    return folder


def test_a_complete_wheel_and_sdist_pass(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert check_dist.main(str(_build(tmp_path, GOOD_WHEEL, GOOD_SDIST))) == 0
    assert capsys.readouterr().out.startswith("ok: ")


@pytest.mark.parametrize(("change", "problem"), [
    ({"wsroom/py.typed": None}, "wsroom/py.typed is missing"),
    ({"wsroom/static/wsroom.js": None}, "wsroom/static/wsroom.js is missing"),
    ({"wsroom-0.1.0.dev0.dist-info/licenses/LICENSE": None}, "LICENSE file is missing"),
    ({"tests/runtime/test_hub.py": ""}, "tests/runtime/test_hub.py is outside the package"),
    ({"benchmarks/run.py": ""}, "benchmarks/run.py is outside the package"),
    ({"wsroom/__pycache__/hub.cpython-311.pyc": ""}, "should not be shipped"),
    ({"wsroom-0.1.0.dev0.dist-info/METADATA": METADATA.replace("0.49.1", "0.40")},
     "no unconditional starlette>=0.49.1"),
    ({"wsroom-0.1.0.dev0.dist-info/METADATA": METADATA.replace(
        "Requires-Dist: starlette>=0.49.1\n", "")},
     "no unconditional starlette>=0.49.1"),
    ({"wsroom-0.1.0.dev0.dist-info/METADATA": METADATA.replace(
        "starlette>=0.49.1", "starlette>=0.49.1 ; extra == 'client'")},
     "no unconditional starlette>=0.49.1"),
    ({"wsroom-0.1.0.dev0.dist-info/METADATA": METADATA.replace("Name: wsroom", "Name: other")},
     "Name is 'other'"),
    ({"wsroom-0.1.0.dev0.dist-info/METADATA": METADATA.replace("MIT", "GPL-3.0")},
     "License-Expression is 'GPL-3.0'"),
])
def test_a_wheel_that_lacks_or_ships_too_much_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        change: dict[str, str | None], problem: str) -> None:
    wheel = {**GOOD_WHEEL, **change}
    wheel = {name: text for name, text in wheel.items() if text is not None}
    assert check_dist.main(str(_build(tmp_path, wheel, GOOD_SDIST))) == 1
    assert problem in capsys.readouterr().out


def test_a_higher_starlette_floor_passes(tmp_path: Path) -> None:
    metadata = METADATA.replace("starlette>=0.49.1", "starlette>=0.50,<2")
    wheel = {**GOOD_WHEEL, "wsroom-0.1.0.dev0.dist-info/METADATA": metadata}
    assert check_dist.main(str(_build(tmp_path, wheel, GOOD_SDIST))) == 0


def test_an_sdist_without_the_licence_fails(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sdist = [name for name in GOOD_SDIST if name != "LICENSE"]
    assert check_dist.main(str(_build(tmp_path, GOOD_WHEEL, sdist))) == 1
    assert "LICENSE is missing" in capsys.readouterr().out


PYPROJECT = {"project": {
    "name": "wsroom",
    "dependencies": ["starlette>=0.49.1", "anyio>=4.10"],
    "optional-dependencies": {
        "redis": ["redis>=5.0.1"],
        "test": ["wsroom[redis]", "pytest>=8.2"],
        "docs": ["mkdocs>=1.6"],
        "dev": ["wsroom[test]", "ruff>=0.6"],
    },
}}
FLOORS = """\
anyio==4.10.0 \\
    --hash=sha256:00
pytest==8.2.0 \\
    --hash=sha256:00
redis==5.0.1 \\
    --hash=sha256:00
ruff==0.6.0 \\
    --hash=sha256:00
starlette==0.49.1 \\
    --hash=sha256:00
exceptiongroup==1.3.2 ; python_full_version < '3.11' \\
    --hash=sha256:00
"""


def test_the_floors_lock_pins_every_direct_dependency_at_its_floor() -> None:
    names = {r.name for r in check_floors.direct_requirements(PYPROJECT)}
    assert names == {"starlette", "anyio", "redis", "pytest", "ruff"}  # not docs' mkdocs
    assert check_floors.problems(PYPROJECT, FLOORS) == []


@pytest.mark.parametrize(("floors", "problem"), [
    (FLOORS.replace("anyio==4.10.0", "anyio==4.16.0"),
     "anyio>=4.10: the floors lock pins 4.16.0: 4.10 does not install with the rest"),
    (FLOORS.replace("redis==5.0.1", "redis==5.0.0"),
     "redis>=5.0.1: the floors lock pins 5.0.0, not 5.0.1"),
    (FLOORS.replace("pytest==8.2.0", "pytest-timeout==2.4.0"),
     "pytest>=8.2: not in the floors lock"),
])
def test_a_floors_lock_off_the_floors_fails(floors: str, problem: str) -> None:
    assert [p for p in check_floors.problems(PYPROJECT, floors) if problem in p]


def test_a_dependency_without_a_floor_fails() -> None:
    pyproject = {"project": {**PYPROJECT["project"], "dependencies": ["starlette"]}}
    assert "starlette: no '>=' floor in pyproject.toml" in check_floors.problems(
        pyproject, FLOORS)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_every_set_up_command_pins_the_uv_whose_build_backend_builds_wsroom() -> None:
    """README's two commands, CONTRIBUTING's and the docs' name one uv release, inside the
    `uv_build` range of pyproject.toml (a uv outside it would build with another backend)."""
    texts = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
             *sorted((ROOT / "docs").rglob("*.md"))]
    installs = [m for path in texts
                for m in re.findall(r"pip install (uv\S*)", path.read_text())]
    assert len(installs) >= 4, installs  # README twice, CONTRIBUTING, benchmarks/README
    assert all(re.fullmatch(r"uv==[0-9.]+", spec) for spec in installs), installs
    pins = {spec.removeprefix("uv==") for spec in installs}
    assert len(pins) == 1, pins
    pinned = _version(pins.pop())
    backend = re.search(r'requires = \["uv_build>=([0-9.]+),<([0-9.]+)"\]',
                        (ROOT / "pyproject.toml").read_text())
    assert backend is not None
    assert _version(backend[1]) <= pinned < _version(backend[2])


def test_the_readme_gives_one_test_command_and_ci_runs_it() -> None:
    """`.ci/run` reads the test command from README.md (the line that starts with a venv and
    ends with pytest) and runs it last: there must be exactly one such line."""
    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"^python3 -m venv \.venv && .* && \.venv/bin/pytest$", readme, re.M)
    assert len(lines) == 1, lines
    assert "uv sync --locked" in lines[0]
    assert 'eval "$test_command"' in (ROOT / ".ci" / "run").read_text()
