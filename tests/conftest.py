from __future__ import annotations

import secrets
from collections.abc import Iterator

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
    """The tables of measured bounds of the fault-injection suite (tests/faults/) and of
    the abuse suite (tests/abuse/), where they recorded rows."""
    from support.netns import ABUSE, REPORT

    REPORT.write(terminalreporter)
    ABUSE.write(terminalreporter)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own, its keys deleted afterwards (the test is
    skipped without Redis, and fails on CI)."""
    from support.redis import delete_prefix, redis_or_skip

    redis_or_skip()
    name = f"wsroom-test-{secrets.token_hex(6)}"
    yield name
    delete_prefix(name)
