"""The backplane conformance suite (`wsroom.testing`) on every backplane.

Redis: a unique key prefix per test (keys deleted after), asyncio only (redis-py).
Without a Redis on 127.0.0.1:6379 (or $WSROOM_REDIS_URL) the Redis tests are skipped,
except on CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from wsroom import Backplane, MemoryBackplane
from wsroom.testing import BackplaneConformance

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


class TestMemoryBackplane(BackplaneConformance):
    shared = False
    forgets_closed_streams = True

    @asynccontextmanager
    async def make_backplane(self) -> AsyncIterator[Backplane]:
        yield MemoryBackplane()


class TestRedisBackplane(BackplaneConformance):
    shared = True
    forgets_closed_streams = False  # other workers may still use it

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # redis-py is asyncio-only

    @pytest.fixture(autouse=True)
    def _prefix(self) -> Iterator[None]:
        redis_or_skip()
        self.prefix = f"wsroom-test-{secrets.token_hex(6)}"
        yield
        delete_prefix(self.prefix)

    @asynccontextmanager
    async def make_backplane(self) -> AsyncIterator[Backplane]:
        from wsroom.redis import RedisBackplane

        yield RedisBackplane(REDIS_URL, prefix=self.prefix)
