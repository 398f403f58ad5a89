"""The public API is what `wsroom.__all__` says, and the API reference documents exactly it."""

from __future__ import annotations

import re
from pathlib import Path

import wsroom

API_PAGE = Path(__file__).parents[2] / "docs" / "reference" / "api.md"


def test_every_export_exists() -> None:
    for name in wsroom.__all__:
        assert hasattr(wsroom, name), name


def test_the_api_reference_documents_exactly_the_exports() -> None:
    documented = re.findall(r"^::: wsroom\.(\w+)\s*$", API_PAGE.read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(wsroom.__all__)
    assert len(documented) == len(set(documented))


def test_the_public_submodules() -> None:
    import wsroom.client
    import wsroom.loadtest
    import wsroom.metrics
    import wsroom.redis
    import wsroom.runner
    import wsroom.testing

    public_modules = {name for name in dir(wsroom) if not name.startswith("_")
                      and type(getattr(wsroom, name)).__name__ == "module"}
    assert public_modules == {"client", "loadtest", "metrics", "redis", "runner", "testing"}
    assert set(wsroom.runner.__all__) == {"DEFAULT_USER_TIMEOUT", "listen_socket", "main",
                                          "ws_max_size_for"}
    assert set(wsroom.loadtest.__all__) == {"Histogram", "Options", "SetupError",
                                            "format_report", "main", "parse_args",
                                            "report", "run"}
    assert set(wsroom.metrics.__all__) == {"HubCollector", "metrics_app"}
    assert set(wsroom.client.__all__) == {"Client", "ClientClosed", "Message",
                                          "RequestError", "Snapshot", "backoff_delay"}
    assert set(wsroom.redis.__all__) == {"RedisBackplane"}
    assert set(wsroom.testing.__all__) == {"BackplaneConformance", "Recorder"}


def test_the_backplane_interfaces() -> None:
    """Streams (`Backplane`) and shared state (`SharedState`) are separate interfaces;
    a shared backplane implements both."""
    from wsroom.redis import RedisBackplane

    assert issubclass(RedisBackplane, wsroom.Backplane)
    assert issubclass(RedisBackplane, wsroom.SharedState)
    assert issubclass(wsroom.MemoryBackplane, wsroom.Backplane)
    assert not issubclass(wsroom.MemoryBackplane, wsroom.SharedState)
    assert not issubclass(wsroom.SharedState, wsroom.Backplane)
