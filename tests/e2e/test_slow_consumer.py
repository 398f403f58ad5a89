"""Isolation and bounded memory against a server in its own process: one client never
reads while the others receive 10,000 messages."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from support import Player, spawn
from wsroom import CloseCode

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

MAX_QUEUE = 1024 * 1024  # the default bound
CONTROL_ALLOWANCE = 64  # at most one control frame (a ping) beyond the bound


async def test_a_stalled_client_is_closed_3008_and_the_others_get_everything() -> None:
    count, size, readers = 10_000, 1000, 4
    config = {"ping_interval": 30, "pong_timeout": 10, "close_timeout": 60}
    async with spawn("flood_app:app", config,
                     send_buffer=65536) as server:
        url = server.url + "/ws"
        async with Player.connect(url, receive_buffer=4096) as stalled, \
                Player.connect(url) as trigger:
            stalled_session = stalled.welcome["session"]  # type: ignore[index]
            others = [trigger]
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(readers - 1):
                    others.append(await stack.enter_async_context(Player.connect(url)))
                async with anyio.create_task_group() as tg:
                    for player in others[1:]:
                        tg.start_soon(player.collect, count, 120)
                    reply = await trigger.request("flood", {"count": count, "size": size},
                                                  ref="flood")
                    await trigger.collect(count, 120)
                # Everyone who reads got all 10,000, in order, exactly once.
                for player in others:
                    assert [m["data"]["n"] for m in player.msgs] == list(range(count))
                    assert [m["offset"] for m in player.msgs] == list(range(1, count + 1))
            largest = reply["data"]["largest_queue"]
            assert largest[stalled_session] > MAX_QUEUE // 2, "it really did back up"
            assert max(largest.values()) <= MAX_QUEUE + CONTROL_ALLOWANCE
            # Now the stalled client reads: a gap-free prefix, then 3008.
            assert await stalled.until_closed(timeout=60) == CloseCode.SLOW_CONSUMER
            offsets = [m["offset"] for m in stalled.msgs]
            assert offsets == list(range(1, len(offsets) + 1))
            assert len(offsets) < count
            stats = (await trigger.request("stats", ref="s"))["data"]
            closes = stats["closes"]
            assert closes.pop("slow_consumer") == 1
            # The others left with a close frame; one may be noticed by a send to it (a
            # presence change) failing before its close frame is read.
            assert set(closes) <= {"client_closed", "send_failed"}
            assert sum(closes.values()) == readers - 1
