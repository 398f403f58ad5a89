"""The backplane conformance suite (`wsroom.testing`) on every backplane.

Redis: a unique key prefix per test (keys deleted after), asyncio only (redis-py).
Without a Redis on 127.0.0.1:6379 (or $WSROOM_REDIS_URL) the Redis tests are skipped,
except on CI (CI=true), where they fail.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from support.redis import REDIS_URL, delete_prefix, redis_or_skip
from wsroom import Backplane, MemoryBackplane
from wsroom.testing import BackplaneConformance


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
