from __future__ import annotations

import pytest
from hypothesis import settings

# No per-example deadline: a loaded CI machine must not turn slow examples into failures.
settings.register_profile("wsroom", deadline=None, print_blob=True)
settings.load_profile("wsroom")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio (AnyIO's own pytest plugin)."""
    return str(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-injection suite's table of measured bounds (tests/test_faults.py), if
    it recorded any rows."""
    from netns import REPORT

    REPORT.write(terminalreporter)
