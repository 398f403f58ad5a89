"""A game table: a GM runs a session, players join with a code; FastAPI + SQLAlchemy + wsroom.

Run it from the repository root with the README's example command (it installs the
`examples` extra from uv.lock into .venv), then open http://127.0.0.1:8000 in a few tabs:

    .venv/bin/uvicorn --app-dir examples/fastapi_game app:app

The data goes to ./game.db (SQLite), or to the SQLAlchemy URL in GAME_DATABASE_URL.

- HTTP: the GM creates a game and players join it with its code and a name; each gets a
  credential (kept by the page, so a reload is the same player).
- WebSocket (wsroom, at /ws): the hello carries the credential; everyone is in the room
  ``game:<code>``. Chat and server-side dice rolls for all; scene, initiative, whispers
  (on the player's own ``@inbox`` stream) and kicks for the GM. A client that drops and
  comes back gets what it missed; a new one gets a snapshot of the table from the database.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import dice
from db import ChatMessage, Database, Game, Player, Roll, Whisper, iso, new_code, url_from_env
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Route

import wsroom
from wsroom import (
    Backplane,
    ClientError,
    Connection,
    Handshake,
    Hub,
    HubConfig,
    Identity,
    MessageContext,
    Reject,
)
from wsroom.metrics import metrics_app

STATIC = Path(__file__).parent / "static"
KICKED = 4501  # an application close code in 4500-4999: the client must not reconnect
INBOX = "@inbox"


def room_of(code: str) -> str:
    return f"game:{code}"


# ------------------------------------------------------------------ validation


def no_control_characters(value: str) -> str:
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError("control characters are not allowed")
    return value


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32),
                 AfterValidator(no_control_characters)]
ChatText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
                     AfterValidator(no_control_characters)]
SceneText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]
# A database integer: a larger number is a client's mistake, not a crash.
PlayerId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class NewPlayer(BaseModel):
    name: Name


class Seat(BaseModel):
    """What the GM or a player gets when creating or joining a game."""

    code: str
    player_id: int
    credential: str
    role: Literal["gm", "player"]


class Me(BaseModel):
    code: str
    player_id: int
    name: str
    role: Literal["gm", "player"]


class Chat(BaseModel):
    text: ChatText


class RollDice(BaseModel):
    expr: str  # parsed by dice.parse, which says what is wrong with it (bad_dice)


class Scene(BaseModel):
    text: SceneText


class Initiative(BaseModel):
    order: list[PlayerId] = Field(max_length=100)
    current: int = Field(ge=0)

    @model_validator(mode="after")
    def current_is_in_order(self) -> Initiative:
        if len(set(self.order)) != len(self.order):
            raise ValueError("a player appears twice in the order")
        if self.current >= max(len(self.order), 1):
            raise ValueError("current must be an index into order")
        return self


class WhisperTo(BaseModel):
    to: PlayerId
    text: ChatText


class Kick(BaseModel):
    player_id: PlayerId


# ------------------------------------------------ what clients see (events, snapshots)


def player_view(player: Player) -> dict[str, Any]:
    return {"player_id": player.id, "name": player.name, "role": player.role,
            "kicked": player.kicked}


def chat_view(message: ChatMessage, name: str) -> dict[str, Any]:
    return {"id": message.id, "player_id": message.player_id, "name": name,
            "text": message.text, "at": iso(message.created_at)}


def roll_view(roll: Roll, name: str) -> dict[str, Any]:
    return {"id": roll.id, "player_id": roll.player_id, "name": name, "expr": roll.expr,
            "rolls": roll.rolls, "modifier": roll.modifier, "total": roll.total,
            "at": iso(roll.created_at)}


def whisper_view(whisper: Whisper, sender: str) -> dict[str, Any]:
    return {"id": whisper.id, "from": sender, "text": whisper.text, "at": iso(whisper.created_at)}


def initiative_view(initiative: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    order = [{"player_id": pid, "name": names.get(pid, "?")} for pid in initiative["order"]]
    return {"order": order, "current": initiative["current"]}


async def table_state(session: AsyncSession, game: Game) -> dict[str, Any]:
    """The whole table as a new client needs it: the snapshot of ``game:<code>``."""
    players = (await session.scalars(
        select(Player).where(Player.game_id == game.id).order_by(Player.id))).all()
    names = {player.id: player.name for player in players}
    chat = (await session.scalars(
        select(ChatMessage).where(ChatMessage.game_id == game.id)
        .order_by(ChatMessage.id.desc()).limit(100))).all()
    rolls = (await session.scalars(
        select(Roll).where(Roll.game_id == game.id).order_by(Roll.id.desc()).limit(50))).all()
    return {
        "game": {"code": game.code, "scene": game.scene,
                 "initiative": initiative_view(game.initiative, names)},
        "players": [player_view(player) for player in players],
        "chat": [chat_view(message, names[message.player_id]) for message in reversed(chat)],
        "rolls": [roll_view(roll, names[roll.player_id]) for roll in reversed(rolls)],
    }


async def inbox_state(session: AsyncSession, player_id: int) -> dict[str, Any]:
    """The snapshot of a player's ``@inbox``: the GM's whispers to it."""
    whispers = (await session.scalars(
        select(Whisper).where(Whisper.to_player_id == player_id)
        .order_by(Whisper.id.desc()).limit(100))).all()
    gm_name = await session.scalar(
        select(Player.name).join(Game, Game.gm_player_id == Player.id)
        .where(Game.id == select(Player.game_id).where(Player.id == player_id)
               .scalar_subquery()))
    return {"whispers": [whisper_view(whisper, gm_name or "GM") for whisper in reversed(whispers)]}


# ------------------------------------------------------------------ HTTP API

api = APIRouter(prefix="/api")
bearer = HTTPBearer(auto_error=False)


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.db.session() as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(db_session)]


async def find_game(session: AsyncSession, code: str) -> Game:
    game = await session.scalar(select(Game).where(Game.code == code.strip().upper()))
    if game is None:
        raise HTTPException(404, "no game with this code")
    return game


async def current_player(
    session: DbSession,
    auth: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Player:
    player = None if auth is None else await session.scalar(
        select(Player).where(Player.credential == auth.credentials))
    if player is None:
        raise HTTPException(401, "a valid credential is required",
                            headers={"WWW-Authenticate": "Bearer"})
    if player.kicked:
        raise HTTPException(403, "you were removed from this game")
    return player


CurrentPlayer = Annotated[Player, Depends(current_player)]


@api.post("/games", status_code=201)
async def create_game(body: NewPlayer, session: DbSession) -> Seat:
    """Create a game; the caller is its GM."""
    for _ in range(10):  # 31**6 codes: a collision is rare, ten in a row never happens
        code = new_code()
        if await session.scalar(select(Game.id).where(Game.code == code)) is None:
            break
    else:
        raise HTTPException(503, "could not find a free game code, try again")
    game = Game(code=code)
    session.add(game)
    await session.flush()  # assigns game.id
    gm = Player(game_id=game.id, name=body.name, role="gm")
    session.add(gm)
    await session.flush()
    game.gm_player_id = gm.id
    await session.commit()
    return Seat(code=game.code, player_id=gm.id, credential=gm.credential, role="gm")


@api.post("/games/{code}/players", status_code=201)
async def join_game(code: str, body: NewPlayer, session: DbSession) -> Seat:
    """Join a game as a player, under a name nobody at the table has."""
    game = await find_game(session, code)
    names = await session.scalars(select(Player.name).where(Player.game_id == game.id))
    if body.name.casefold() in {name.casefold() for name in names}:
        raise HTTPException(409, "this name is taken in this game")
    player = Player(game_id=game.id, name=body.name, role="player")
    session.add(player)
    try:
        await session.commit()
    except IntegrityError:  # the same name, joined at the same moment
        raise HTTPException(409, "this name is taken in this game") from None
    return Seat(code=game.code, player_id=player.id, credential=player.credential,
                role="player")


@api.get("/me")
async def me(player: CurrentPlayer, session: DbSession) -> Me:
    game = await session.get(Game, player.game_id)
    return Me(code=game.code, player_id=player.id, name=player.name, role=player.role)


@api.get("/games/{code}/history")
async def history(code: str, player: CurrentPlayer, session: DbSession) -> dict[str, Any]:
    """The table as the room's snapshot shows it (chat and rolls included)."""
    game = await find_game(session, code)
    if player.game_id != game.id:
        raise HTTPException(403, "you are not at this table")
    return await table_state(session, game)


# ------------------------------------------------------------------ WebSocket


async def authenticate(db: Database, handshake: Handshake) -> Identity | None:
    """The hello's ``auth`` is ``{"credential": ...}``; unknown or kicked: refused (3500)."""
    auth = handshake.auth
    credential = auth.get("credential") if isinstance(auth, dict) else None
    if not isinstance(credential, str) or not 0 < len(credential) <= 64:
        return None
    async with db.session() as session:
        player = await session.scalar(select(Player).where(Player.credential == credential))
    if player is None or player.kicked:
        return None
    # The id is logged and shown to the table: the player id, never the credential.
    return Identity(id=str(player.id), info={"name": player.name, "role": player.role})


async def take_seat(db: Database, conn: Connection) -> None:
    """on_connect: join the game's room (a resumed session is in it already)."""
    assert conn.identity is not None
    async with db.session() as session:
        player, code = (await session.execute(
            select(Player, Game.code).join(Game, Game.id == Player.game_id)
            .where(Player.id == int(conn.identity.id)))).one()
    if player.kicked:  # kicked since `authenticate` read it
        raise Reject(KICKED, "kicked")
    conn.state.update(player_id=player.id, room=room_of(code))
    conn.meta = {"role": player.role}
    await conn.join(room_of(code))


async def snapshot(db: Database, conn: Connection, stream: str) -> Any:
    """What a client that cannot be replayed its missed messages starts from."""
    async with db.session() as session:  # a fresh session: the hook runs outside messages
        if stream == INBOX:
            return await inbox_state(session, conn.state["player_id"])
        code = stream.removeprefix("game:")  # the only rooms are the games'
        game = await session.scalar(select(Game).where(Game.code == code))
        return None if game is None else await table_state(session, game)


def db_of(ctx: MessageContext) -> AsyncSession:
    session: AsyncSession = ctx.scope  # one session per message: see Hub(message_scope=...)
    return session


async def sender(ctx: MessageContext) -> Player:
    """The player who sent the message, as the database says now."""
    player = await db_of(ctx).get(Player, ctx.connection.state["player_id"])
    if player is None or player.kicked:
        raise Reject(KICKED, "kicked")
    return player


async def game_master(ctx: MessageContext) -> Player:
    player = await sender(ctx)
    if player.role != "gm":
        raise ClientError("forbidden", "only the GM can do that")
    return player


async def player_at_table(ctx: MessageContext, gm: Player, player_id: int) -> Player:
    player = await db_of(ctx).get(Player, player_id)
    if player is None or player.game_id != gm.game_id or player.kicked:
        raise ClientError("not_found", f"no player {player_id} at this table")
    return player


async def chat(ctx: MessageContext, data: Chat) -> dict[str, Any]:
    player = await sender(ctx)
    message = ChatMessage(game_id=player.game_id, player_id=player.id, text=data.text)
    db_of(ctx).add(message)
    await db_of(ctx).commit()  # stored first, then published: history never lacks it
    event = chat_view(message, player.name)
    await ctx.publish(ctx.connection.state["room"], "chat", event)
    return event


async def roll(ctx: MessageContext, data: RollDice) -> dict[str, Any]:
    player = await sender(ctx)
    try:
        parsed = dice.parse(data.expr)
    except dice.DiceError as exc:
        raise ClientError("bad_dice", str(exc)) from None
    rolls = dice.roll(parsed)
    result = Roll(game_id=player.game_id, player_id=player.id, expr=str(parsed), rolls=rolls,
                  modifier=parsed.modifier, total=sum(rolls) + parsed.modifier)
    db_of(ctx).add(result)
    await db_of(ctx).commit()
    event = roll_view(result, player.name)
    await ctx.publish(ctx.connection.state["room"], "roll", event)
    return event


async def scene(ctx: MessageContext, data: Scene) -> dict[str, Any]:
    gm = await game_master(ctx)
    game = await db_of(ctx).get(Game, gm.game_id)
    game.scene = data.text
    await db_of(ctx).commit()
    event = {"text": game.scene}
    await ctx.publish(ctx.connection.state["room"], "scene", event)
    return event


async def initiative(ctx: MessageContext, data: Initiative) -> dict[str, Any]:
    gm = await game_master(ctx)
    names = {pid: (await player_at_table(ctx, gm, pid)).name for pid in data.order}
    game = await db_of(ctx).get(Game, gm.game_id)
    game.initiative = {"order": data.order, "current": data.current}
    await db_of(ctx).commit()
    event = initiative_view(game.initiative, names)
    await ctx.publish(ctx.connection.state["room"], "initiative", event)
    return event


async def whisper(ctx: MessageContext, data: WhisperTo) -> dict[str, Any]:
    gm = await game_master(ctx)
    target = await player_at_table(ctx, gm, data.to)
    message = Whisper(game_id=gm.game_id, to_player_id=target.id, text=data.text)
    db_of(ctx).add(message)
    await db_of(ctx).commit()
    event = whisper_view(message, gm.name)
    # To every session of that player, on its @inbox: a player who is reconnecting gets
    # it when it resumes; one who never connected finds it in its inbox's snapshot.
    await ctx.hub.send_to(str(target.id), "whisper", event)
    return event


async def kick(ctx: MessageContext, data: Kick) -> dict[str, Any]:
    gm = await game_master(ctx)
    if data.player_id == gm.id:
        raise ClientError("forbidden", "the GM cannot kick itself")
    target = await player_at_table(ctx, gm, data.player_id)
    target.kicked = True  # its credential stops working: /api/me 403, hello 3500
    await db_of(ctx).commit()
    event = {"player_id": target.id, "name": target.name}
    await ctx.publish(ctx.connection.state["room"], "kicked", event)
    # Every session of the player ends now, a reconnecting one too: its open tabs get
    # 4501 after what is queued for them (so they see "kicked"), and the roster drops
    # it at once.
    await ctx.hub.disconnect(str(target.id), KICKED, "kicked")
    return event


def create_hub(db: Database, config: HubConfig | None = None,
               backplane: Backplane | None = None) -> Hub:
    hub = Hub(
        config,
        backplane=backplane,
        authenticate=partial(authenticate, db),
        message_scope=lambda ctx: db.session(),  # a new DB session for every message
        snapshot=partial(snapshot, db),
    )
    hub.on_connect(partial(take_seat, db))
    hub.on("chat")(chat)
    hub.on("roll")(roll)
    hub.on("scene")(scene)
    hub.on("initiative")(initiative)
    hub.on("whisper")(whisper)
    hub.on("kick")(kick)
    return hub


# ------------------------------------------------------------------ the app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    db: Database = app.state.db
    await db.create_tables()
    try:
        async with app.state.hub.lifespan(app):  # runs the hub; drains it on shutdown
            yield
    finally:
        await db.dispose()


def config_from_env() -> HubConfig:
    """Production settings from the environment (comma-separated lists):
    GAME_RESUME_SECRETS (the same on every worker and across restarts, or resumes fail
    after one), GAME_ALLOWED_ORIGINS, GAME_TRUSTED_PROXIES."""

    def listed(name: str) -> list[str] | None:
        value = os.environ.get(name, "").strip()
        return [item.strip() for item in value.split(",") if item.strip()] or None

    return HubConfig(resume_secrets=listed("GAME_RESUME_SECRETS"),
                     allowed_origins=listed("GAME_ALLOWED_ORIGINS"),
                     trusted_proxies=listed("GAME_TRUSTED_PROXIES"))


def backplane_from_env() -> Backplane | None:
    """GAME_REDIS_URL (e.g. ``redis://127.0.0.1:6379/0``): run on Redis, so that several
    workers (``uvicorn --workers 4``) serve one game; GAME_RESUME_SECRETS is then
    required. Unset: one process, in memory."""
    url = os.environ.get("GAME_REDIS_URL", "").strip()
    if not url:
        return None
    from wsroom.redis import RedisBackplane

    return RedisBackplane(url, prefix="wsroom-game")


def create_app(database_url: str | None = None, *, hub_config: HubConfig | None = None,
               backplane: Backplane | None = None) -> FastAPI:
    """The app on `database_url` (default: GAME_DATABASE_URL, else ./game.db), with
    `hub_config` (default: `config_from_env`) and `backplane` (default:
    `backplane_from_env`)."""
    db = Database(database_url or url_from_env())
    hub_config = hub_config if hub_config is not None else config_from_env()
    app = FastAPI(title="wsroom game table", lifespan=lifespan)
    app.state.db = db
    if backplane is None:
        backplane = backplane_from_env()
    app.state.hub = hub = create_hub(db, hub_config, backplane)
    app.include_router(api)
    app.add_api_websocket_route("/ws", hub.endpoint)
    # Prometheus metrics (restrict this path to your monitoring in the proxy).
    app.router.routes.append(Route("/metrics", metrics_app(hub)))
    app.router.routes.append(Route("/ready", hub.readiness))  # the load balancer's probe

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC, html=True), name="static")
    app.mount("/wsroom", wsroom.static_files(), name="wsroom")  # the browser client
    return app


app = create_app()
hub: Hub = app.state.hub
