"""The Redis at ``$WSROOM_REDIS_URL`` for the tests that need one: skipped without it,
except on CI (``CI=true``), where they fail."""

from __future__ import annotations

import os

import pytest

REDIS_URL = os.environ.get("WSROOM_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_or_skip(url: str = REDIS_URL) -> None:
    """Skip (fail on CI) unless redis-py is installed and `url` answers."""
    reason = None
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except ImportError:
        reason = "redis-py is not installed"
    except Exception as exc:
        reason = f"Redis at {url} is unreachable: {exc}"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: the Redis tests must run)")
        pytest.skip(reason)


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
