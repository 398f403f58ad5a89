"""The example game (examples/fastapi_game) over WebSocket: every event, every validation
error, GM-only actions, whispers across a dropped connection and kicks; a real uvicorn
server, a real SQLite file per test, `wsroom.client.Client` and the raw protocol client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_game_api import Table, bearer, game_table
from test_game_api import anyio_backend as anyio_backend  # asyncio only: aiosqlite

from support import wait_for
from wsroom import CloseCode
from wsroom.client import Client, ClientClosed, Message, RequestError, Snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

INBOX = "@inbox"


async def seats(table: Table, *names: str) -> list[dict[str, Any]]:
    """A game whose GM is the first name; the others join it."""
    gm = await table.create(names[0])
    return [gm] + [await table.join(gm["code"], name) for name in names[1:]]


def room(seat: dict[str, Any]) -> str:
    return f"game:{seat['code']}"


async def next_message(client: Client, event: str, timeout: float = 10) -> Message:
    """The next message of `event` the client yields (skipping others and snapshots)."""
    with anyio.fail_after(timeout):
        async for item in client.messages():
            if isinstance(item, Message) and item.event == event:
                return item
    raise AssertionError(f"the client stopped before a {event!r} message")


async def snapshots(client: Client) -> dict[str, Any]:
    """The snapshots a new session starts with, by stream."""
    found: dict[str, Any] = {}
    with anyio.fail_after(10):
        async for item in client.messages():
            if isinstance(item, Snapshot):
                found[item.stream] = item.data
                if len(found) == 2:
                    return found
    raise AssertionError("the client stopped before its snapshots")


async def msg_where(player: Any, match: Callable[[dict[str, Any]], bool],
                    timeout: float = 10) -> dict[str, Any]:
    """The first ``msg`` frame `player` has seen (or sees next) that `match`es."""
    with anyio.fail_after(timeout):
        while True:
            for frame in player.msgs:
                if match(frame):
                    return dict(frame)
            await player.frame()


def event_is(event: str, stream: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["event"] == event and (stream is None or f["stream"] == stream)


async def error_of(player: Any, event: str, data: Any) -> tuple[str, str]:
    """Send a request that must fail; return the error frame's code and detail."""
    answer = await player.request(event, data)
    assert answer["type"] == "error", answer
    return answer["code"], answer["detail"]


# ------------------------------------------------------------------ connecting


@pytest.mark.parametrize("auth", [
    None,
    "a-credential",
    {},
    {"credential": "not-a-credential"},
    {"credential": 5},
    {"credential": "x" * 500},
])
async def test_a_hello_without_a_valid_credential_is_refused(tmp_path: Path, auth: Any) -> None:
    async with game_table(tmp_path) as table:
        await table.create()
        async with table.player(None, hello=False) as anon:
            hello: dict[str, Any] = {"type": "hello", "v": 1}
            if auth is not None:
                hello["auth"] = auth
            await anon.ws.send(json.dumps(hello))
            assert await anon.until_closed() == CloseCode.INVALID_TOKEN


async def test_a_player_joins_the_game_room_and_starts_from_snapshots(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.client(gm) as gina, table.player(ann) as player:
            await gina.wait_connected()
            welcome = player.welcome
            assert welcome is not None
            assert set(welcome["streams"]) == {INBOX, room(gm)}
            got = {}
            for _ in range(2):
                frame = await player.expect("snapshot")
                got[frame["stream"]] = frame["data"]
            history = await table.http.get(f"/api/games/{gm['code']}/history",
                                           headers=bearer(ann))
            assert got == {INBOX: {"whispers": []}, room(gm): history.json()}
            # The roster: presence shows names and roles, and each connection's role.
            await wait_for(lambda: len(table.hub.presence(room(gm))) == 2)
            roster = {e.member: e for e in table.hub.presence(room(gm))}
            assert roster[str(ann["player_id"])].info == {"name": "Ann", "role": "player"}
            assert roster[str(gm["player_id"])].info == {"name": "Gina", "role": "gm"}
            await wait_for(lambda: str(ann["player_id"]) in gina.presence.get(room(gm), {}))
            entry = gina.presence[room(gm)][str(ann["player_id"])]
            assert entry["status"] == "online"
            assert entry["connections"] == [{"role": "player"}]


# ------------------------------------------------------------------ chat


async def test_chat_is_published_stored_and_shown_to_later_players(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        async with table.client(gm) as gina, table.player(ann) as player:
            said = await player.request("chat", {"text": "  hello table  "})
            assert said["type"] == "reply"
            event = said["data"]
            assert set(event) == {"id", "player_id", "name", "text", "at"}
            assert (event["player_id"], event["name"], event["text"]) == (
                ann["player_id"], "Ann", "hello table")
            assert (await next_message(gina, "chat")).data == event
            seen = await msg_where(player, event_is("chat"))
            assert (seen["stream"], seen["data"]) == (room(gm), event)
            longest = await player.request("chat", {"text": "x" * 500}, ref="r2")
            assert longest["type"] == "reply"

        # A player who connects later (or reloads: a new session) gets the history.
        async with table.client(bob) as later:
            table_state = (await snapshots(later))[room(gm)]
            assert table_state["chat"] == [event, longest["data"]]


@pytest.mark.parametrize("data", [
    {"text": ""}, {"text": "   "}, {"text": "x" * 501}, {}, {"text": 5}, {"text": None},
    "hello", None, [],
])
async def test_invalid_chat_is_an_error_frame_and_nothing_is_stored(tmp_path: Path,
                                                                     data: Any) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.player(ann) as player:
            code, detail = await error_of(player, "chat", data)
            assert code == "invalid_data"
            assert detail
            ok = await player.request("chat", {"text": "still here"}, ref="r2")
            assert ok["type"] == "reply"  # the connection is still open
        history = await table.http.get(f"/api/games/{gm['code']}/history", headers=bearer(gm))
        assert [c["text"] for c in history.json()["chat"]] == ["still here"]


async def test_snapshots_hold_the_last_100_chat_lines_and_50_rolls(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        from db import ChatMessage, Player, Roll  # the example's models, as the app uses them

        async with table.app.state.db.session() as session:
            row = await session.get(Player, ann["player_id"])
            assert row is not None
            session.add_all(ChatMessage(game_id=row.game_id, player_id=row.id, text=f"m{i}")
                            for i in range(120))
            session.add_all(Roll(game_id=row.game_id, player_id=row.id, expr="1d6",
                                 rolls=[i % 6 + 1], modifier=0, total=i % 6 + 1)
                            for i in range(70))
            await session.commit()
        async with table.client(ann) as client:
            state = (await snapshots(client))[room(gm)]
        assert [c["text"] for c in state["chat"]] == [f"m{i}" for i in range(20, 120)]
        assert len(state["rolls"]) == 50
        assert [r["id"] for r in state["rolls"]] == sorted(r["id"] for r in state["rolls"])
        assert state["rolls"][-1]["id"] == 70


# ------------------------------------------------------------------ dice


async def test_rolls_are_rolled_on_the_server_published_and_stored(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.client(gm) as gina, table.client(ann) as client:
            results = []
            for expr, canonical, count, sides, modifier in [
                ("2d6+3", "2d6+3", 2, 6, 3),
                (" D20 ", "1d20", 1, 20, 0),
                ("4d6 - 1", "4d6-1", 4, 6, -1),
                ("100d1000+1000", "100d1000+1000", 100, 1000, 1000),
            ]:
                result = await client.request("roll", {"expr": expr})
                assert set(result) == {"id", "player_id", "name", "expr", "rolls", "modifier",
                                       "total", "at"}
                assert (result["player_id"], result["name"]) == (ann["player_id"], "Ann")
                assert result["expr"] == canonical
                assert len(result["rolls"]) == count
                assert all(1 <= r <= sides for r in result["rolls"])
                assert result["modifier"] == modifier
                assert result["total"] == sum(result["rolls"]) + modifier
                assert (await next_message(gina, "roll")).data == result
                results.append(result)
        history = await table.http.get(f"/api/games/{gm['code']}/history", headers=bearer(gm))
        assert history.json()["rolls"] == results


async def test_invalid_dice_are_refused_with_bad_dice(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.player(ann) as player:
            for expr, detail in [
                ("", "expected dice notation"),
                ("d", "expected dice notation"),
                ("2d", "expected dice notation"),
                ("2d6+", "expected dice notation"),
                ("2x6", "expected dice notation"),
                ("2d6*2", "expected dice notation"),
                ("1d6+1+1", "expected dice notation"),
                ("-2d6", "expected dice notation"),
                ("2.5d6", "expected dice notation"),
                ("1 0d6", "expected dice notation"),
                ("0d6", "number of dice"),
                ("101d6", "number of dice"),
                ("d1", "sides"),
                ("2d1001", "sides"),
                ("2d6+1001", "modifier"),
                ("2d6-1001", "modifier"),
                ("1d6" + " " * 40, "characters"),
            ]:
                code, text = await error_of(player, "roll", {"expr": expr})
                assert code == "bad_dice", expr
                assert detail in text, (expr, text)
            assert await error_of(player, "roll", {"expr": 20}) == (
                "invalid_data", "expr: Input should be a valid string")
            assert not [m for m in player.msgs if m["event"] == "roll"]
        history = await table.http.get(f"/api/games/{gm['code']}/history", headers=bearer(gm))
        assert history.json()["rolls"] == []


# ------------------------------------------------------------------ GM only


async def test_a_player_cannot_send_gm_actions(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        async with table.player(ann) as player:
            for event, data in [
                ("scene", {"text": "mine now"}),
                ("initiative", {"order": [ann["player_id"]], "current": 0}),
                ("whisper", {"to": bob["player_id"], "text": "psst"}),
                ("kick", {"player_id": bob["player_id"]}),
                ("kick", {"player_id": gm["player_id"]}),
            ]:
                assert await error_of(player, event, data) == (
                    "forbidden", "only the GM can do that"), event
        history = (await table.http.get(f"/api/games/{gm['code']}/history",
                                        headers=bearer(gm))).json()
        assert history["game"] == {"code": gm["code"], "scene": "",
                                   "initiative": {"order": [], "current": 0}}
        assert not any(p["kicked"] for p in history["players"])
        assert (await table.me(bob)).status_code == 200


async def test_the_gm_sets_the_scene(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        async with table.player(gm) as gina, table.client(ann) as client:
            await client.wait_connected()
            answer = await gina.request("scene", {"text": "  A dark cave.\nWater drips.  "})
            assert answer["data"] == {"text": "A dark cave.\nWater drips."}
            assert (await next_message(client, "scene")).data == answer["data"]
            for ref, data in enumerate([{"text": "x" * 2001}, {"text": 3}, {}], start=10):
                assert (await gina.request("scene", data, ref=str(ref)))["code"] == \
                    "invalid_data"
            async with table.client(bob) as later:
                assert (await snapshots(later))[room(gm)]["game"]["scene"] == \
                    "A dark cave.\nWater drips."
            cleared = await gina.request("scene", {"text": ""}, ref="r3")
            assert cleared["data"] == {"text": ""}
            assert (await next_message(client, "scene")).data == {"text": ""}


async def test_the_gm_sets_the_initiative_order(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        stranger = await table.create("Sam")
        ids = [ann["player_id"], bob["player_id"], gm["player_id"]]
        async with table.player(gm) as gina, table.client(ann) as client:
            await client.wait_connected()
            answer = await gina.request("initiative", {"order": ids, "current": 1})
            expected = {"order": [{"player_id": ids[0], "name": "Ann"},
                                  {"player_id": ids[1], "name": "Bob"},
                                  {"player_id": ids[2], "name": "Gina"}],
                        "current": 1}
            assert answer["data"] == expected
            assert (await next_message(client, "initiative")).data == expected

            invalid = [
                {"order": ids, "current": 3},                      # out of range
                {"order": ids, "current": -1},
                {"order": [], "current": 1},
                {"order": [ids[0], ids[0]], "current": 0},         # twice
                {"order": list(range(1000, 1101)), "current": 0},  # over 100
                {"order": "Ann", "current": 0},
                {"order": ids},
            ]
            for number, data in enumerate(invalid):
                answer = await gina.request("initiative", data, ref=f"i{number}")
                assert answer["code"] == "invalid_data", data
            for data in [{"order": [ids[0], 9999], "current": 0},
                         {"order": [stranger["player_id"]], "current": 0}]:
                code, detail = await error_of(gina, "initiative", data)
                assert code == "not_found"
                assert "at this table" in detail

            history = await table.http.get(f"/api/games/{gm['code']}/history",
                                           headers=bearer(gm))
            assert history.json()["game"]["initiative"] == expected  # unchanged
            empty = await gina.request("initiative", {"order": [], "current": 0}, ref="e")
            assert empty["data"] == {"order": [], "current": 0}


# ------------------------------------------------------------------ whispers


async def test_a_whisper_reaches_only_its_player_on_its_inbox(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        stranger = await table.create("Sam")
        async with table.player(gm) as gina, table.client(ann) as client, \
                table.player(bob) as bobs:
            await client.wait_connected()
            answer = await gina.request("whisper", {"to": ann["player_id"], "text": " psst "})
            whisper = answer["data"]
            assert set(whisper) == {"id", "from", "text", "at"}
            assert (whisper["from"], whisper["text"]) == ("Gina", "psst")
            got = await next_message(client, "whisper")
            assert (got.stream, got.data) == (INBOX, whisper)

            for data, code in [
                ({"to": 9999, "text": "psst"}, "not_found"),
                ({"to": stranger["player_id"], "text": "psst"}, "not_found"),
                ({"to": ann["player_id"], "text": ""}, "invalid_data"),
                ({"to": ann["player_id"], "text": "x" * 501}, "invalid_data"),
                ({"text": "psst"}, "invalid_data"),
            ]:
                assert (await error_of(gina, "whisper", data))[0] == code, data

            # Bob sees the table's messages, never Ann's whisper.
            await gina.request("chat", {"text": "after the whisper"}, ref="c")
            await msg_where(bobs, event_is("chat"))
            assert [m["event"] for m in bobs.msgs] == ["chat"]

        # A new session of Ann (a reload) finds the whisper in its inbox's snapshot.
        async with table.client(ann) as reloaded:
            assert (await snapshots(reloaded))[INBOX] == {"whispers": [whisper]}


async def test_a_whisper_to_a_player_who_never_connected_waits_in_its_inbox(
        tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.player(gm) as gina:
            whisper = (await gina.request("whisper", {"to": ann["player_id"],
                                                      "text": "when you arrive"}))["data"]
        async with table.client(ann) as client:
            assert (await snapshots(client))[INBOX] == {"whispers": [whisper]}


async def test_a_whisper_to_a_dropped_player_is_delivered_when_it_resumes(
        tmp_path: Path) -> None:
    """The raw protocol, step by step: Ann's socket dies (no close frame), the server
    keeps her session (the GM's roster says *away*), the GM whispers, and Ann resumes
    with her token: same session, her inbox recovered, the whisper delivered once; the
    roster said away then online, never gone."""
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        member = str(ann["player_id"])
        async with table.player(gm) as gina, gina.reading():
            async with table.player(ann) as first:
                welcome = first.welcome
                assert welcome is not None
                positions = {name: {"epoch": s["epoch"], "offset": s["offset"]}
                             for name, s in welcome["streams"].items()}
                await first.ws.abort()  # RST: no close frame
            await wait_for(lambda: table.hub.stats().detached_sessions == 1)
            await wait_for(lambda: any(
                j["id"] == member and j["status"] == "away"
                for f in gina.presence for j in f.get("joins", ())))

            await gina.send("whisper", {"to": ann["player_id"], "text": "while you were out"},
                            ref="w")
            await wait_for(lambda: any(f.get("ref") == "w" for f in gina.seen))
            whisper = next(f for f in gina.seen if f.get("ref") == "w")["data"]

            async with table.player(None, hello=False) as again:
                await again.ws.send(json.dumps({
                    "type": "hello", "v": 1, "auth": {"credential": ann["credential"]},
                    "resume": welcome["resume"], "streams": positions}))
                resumed = await again.expect("welcome")
                assert resumed["session"] == welcome["session"]
                assert resumed["streams"][INBOX]["recovered"] is True
                assert resumed["streams"][room(gm)]["recovered"] is True
                got = await again.expect("msg")
                assert (got["stream"], got["event"], got["data"]) == (INBOX, "whisper", whisper)
                await wait_for(lambda: any(
                    j["id"] == member and j["status"] == "online"
                    for f in gina.presence[-1:] for j in f.get("joins", ())))
            assert not any(member in f.get("leaves", ()) for f in gina.presence)


async def test_the_python_client_keeps_its_session_and_gets_the_whisper(
        tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann = await seats(table, "Gina", "Ann")
        async with table.client(gm) as gina, table.client(ann) as client:
            await client.wait_connected()
            session = client.session
            ws = client._ws
            assert ws is not None
            await ws.abort()  # the socket dies; the client reconnects and resumes by itself
            whisper = await gina.request("whisper", {"to": ann["player_id"], "text": "back?"})
            got = await next_message(client, "whisper")
            assert (got.stream, got.data) == (INBOX, whisper)
            assert client.session == session
            assert client.connects == 2
            assert client.recovered(INBOX) is True


# ------------------------------------------------------------------ kicks


async def test_a_kicked_player_is_closed_with_4501_and_stays_out(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm, ann, bob = await seats(table, "Gina", "Ann", "Bob")
        async with table.client(gm) as gina, table.client(ann) as client, \
                table.player(ann) as second_tab, table.player(bob) as bobs:
            await client.wait_connected()
            kicked = await gina.request("kick", {"player_id": ann["player_id"]})
            assert kicked == {"player_id": ann["player_id"], "name": "Ann"}

            # Every connection of Ann sees the kick, then is closed with 4501, terminal.
            assert (await next_message(client, "kicked")).data == kicked
            with anyio.fail_after(10):
                with pytest.raises(ClientClosed) as closed:
                    await client.wait_connected()
            assert (closed.value.code, closed.value.reason) == (4501, "kicked")
            assert client.attempts == 1  # it did not try to come back
            assert [item async for item in client.messages()] == []  # the stream ended
            assert await second_tab.until_closed() == 4501
            assert [m["event"] for m in second_tab.msgs].count("kicked") == 1

            # The table sees it: an event, and Ann leaves the roster at once.
            assert (await msg_where(bobs, event_is("kicked")))["data"] == kicked
            await wait_for(lambda: str(ann["player_id"]) not in
                           {e.member for e in table.hub.presence(room(gm))})

            # Her credential no longer works.
            assert (await table.me(ann)).status_code == 403
            assert (await table.me(ann)).json()["detail"] == "you were removed from this game"
            async with table.player(None, hello=False) as retry:
                await retry.ws.send(json.dumps({"type": "hello", "v": 1,
                                                "auth": {"credential": ann["credential"]}}))
                assert await retry.until_closed() == CloseCode.INVALID_TOKEN

            # The GM can no longer address her, and cannot kick itself or strangers.
            for event, data in [
                ("whisper", {"to": ann["player_id"], "text": "hello?"}),
                ("initiative", {"order": [ann["player_id"]], "current": 0}),
                ("kick", {"player_id": ann["player_id"]}),
                ("kick", {"player_id": 9999}),
            ]:
                with pytest.raises(RequestError) as refused:
                    await gina.request(event, data)
                assert refused.value.code == "not_found", event
            with pytest.raises(RequestError) as refused:
                await gina.request("kick", {"player_id": gm["player_id"]})
            assert (refused.value.code, refused.value.detail) == (
                "forbidden", "the GM cannot kick itself")
            with pytest.raises(RequestError) as refused:
                await gina.request("kick", {})
            assert refused.value.code == "invalid_data"

        history = (await table.http.get(f"/api/games/{gm['code']}/history",
                                        headers=bearer(gm))).json()
        kicked_flags = {p["name"]: p["kicked"] for p in history["players"]}
        assert kicked_flags == {"Gina": False, "Ann": True, "Bob": False}
        assert (await table.me(bob)).status_code == 200


# ------------------------------------------------------------------ DB sessions


async def test_every_message_gets_its_own_database_session(tmp_path: Path) -> None:
    """The audit's failure 6: one session for a whole connection. Here every message
    opens its own (hub's message_scope) and closes it after the handler."""
    async with game_table(tmp_path) as table:
        _, ann = await seats(table, "Gina", "Ann")
        async with table.client(ann) as client:
            await client.wait_connected()
            db = table.app.state.db
            factory = db.session
            opened: list[Any] = []
            closed: list[Any] = []

            @asynccontextmanager
            async def tracked() -> AsyncIterator[Any]:
                try:
                    async with factory() as session:
                        opened.append(session)
                        yield session
                finally:
                    closed.append(session)

            db.session = tracked
            await client.request("chat", {"text": "one"})
            await client.request("roll", {"expr": "d6"})
            with pytest.raises(RequestError):
                await client.request("roll", {"expr": "nope"})
            await client.request("chat", {"text": "two"})
            assert len(opened) == 4
            assert len({id(s) for s in opened}) == 4
            assert closed == opened
