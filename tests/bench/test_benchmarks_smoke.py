"""Smoke test of the benchmark harness: ``python -m benchmarks.run --quick`` writes its
report and plots, with a row for every scenario and peer (no timing is checked).

The harness needs the ``bench`` extra (matplotlib, python-socketio, picows, psutil, redis,
and uvloop through uvicorn[standard]), which the ``dev`` extra leaves out: uvloop would change
the event loop of the servers the other tests spawn. So it runs with the interpreter named
by ``WSROOM_BENCH_PYTHON`` (a separate venv with ``.[bench]``), else this one, and is
skipped if that interpreter lacks the extra (a failure on CI, whose .ci/run installs it).
It takes under a minute.

The Redis rows (scenario ``redis_fanout``) need a Redis at ``$WSROOM_REDIS_URL`` (default
127.0.0.1:6379): without one they may be error rows, except on CI (CI=true), where Redis
must be there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_PYTHON = os.environ.get("WSROOM_BENCH_PYTHON", sys.executable)
NEEDS = ("matplotlib", "socketio", "picows", "psutil", "uvicorn", "websockets", "starlette",
         "redis")

pytestmark = pytest.mark.e2e


def _has_bench_extra() -> bool:
    probe = subprocess.run([BENCH_PYTHON, "-c", f"import {', '.join(NEEDS)}"],
                           capture_output=True, cwd=ROOT)
    return probe.returncode == 0


def _redis_answers() -> bool:
    url = os.environ.get("WSROOM_REDIS_URL", "redis://127.0.0.1:6379/0")
    probe = subprocess.run([BENCH_PYTHON, "-c", "import redis, sys; redis.Redis.from_url("
                            "sys.argv[1], socket_timeout=2, socket_connect_timeout=2).ping()",
                            url], capture_output=True, cwd=ROOT)
    return probe.returncode == 0


def test_quick_run_writes_report_and_plots(tmp_path: Path) -> None:
    if not _has_bench_extra():
        if os.environ.get("CI") == "true":  # .ci/run installs it: a failure there
            pytest.fail(f"{BENCH_PYTHON} lacks the bench extra ({', '.join(NEEDS)})")
        pytest.skip(f"{BENCH_PYTHON} lacks the bench extra ({', '.join(NEEDS)}); "
                    "set WSROOM_BENCH_PYTHON to a venv with .[bench]")
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([BENCH_PYTHON, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.run import REDIS_PEERS, params, scenarios
    finally:
        sys.path.remove(str(ROOT))
    # Without a Redis (not on CI), the Redis rows are error rows: they must still be there.
    needs_redis = {p.name for p in REDIS_PEERS}
    redis_optional = os.environ.get("CI") != "true" and not _redis_answers()
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for sc in scenarios(params(quick=True)):
        assert f"## {sc.title}\n" in report, sc.id
        section = report.split(f"## {sc.title}\n", 1)[1].split("\n## ", 1)[0]
        for name in sc.peers:
            label = sc.label(name)
            row = next((r for r in section.splitlines() if r.startswith(f"| {label} |")), None)
            assert row is not None, (sc.id, name)
            if not (redis_optional and name in needs_redis):
                assert "error" not in row, row
        assert rows
    for plot in ("fanout.png", "latency.png", "slow.png", "idle_memory.png"):
        png = tmp_path / "benchmarks" / plot
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert (tmp_path / "benchmarks" / "results.json").exists()
    assert "## Versions" in report
