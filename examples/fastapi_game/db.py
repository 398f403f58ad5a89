"""The game's database: SQLAlchemy 2 (asyncio) models and the session factory.

SQLite by default (zero set-up); any SQLAlchemy async URL through ``GAME_DATABASE_URL``
(for example ``postgresql+asyncpg://game@localhost/game``).
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_URL = "sqlite+aiosqlite:///./game.db"

# Join codes: no 0/O, 1/I/L, so that a code read aloud at the table is typed right.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 6


def url_from_env() -> str:
    return os.environ.get("GAME_DATABASE_URL", DEFAULT_URL)


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def new_credential() -> str:
    return secrets.token_urlsafe(24)


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """A timestamp as ISO 8601 UTC. SQLite gives naive datetimes back: they are UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


class Base(DeclarativeBase):
    pass


class Game(Base):
    __tablename__ = "games"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(CODE_LENGTH), unique=True)
    gm_player_id: Mapped[int | None] = mapped_column(default=None)
    scene: Mapped[str] = mapped_column(Text, default="")
    # {"order": [player id, ...], "current": index into order}
    initiative: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=lambda: {"order": [], "current": 0})
    created_at: Mapped[datetime] = mapped_column(default=now)


class Player(Base):
    __tablename__ = "players"
    __table_args__ = (UniqueConstraint("game_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    game_id: Mapped[int] = mapped_column(ForeignKey("games.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(8))  # "gm" | "player"
    credential: Mapped[str] = mapped_column(String(64), unique=True, default=new_credential)
    kicked: Mapped[bool] = mapped_column(default=False)


class ChatMessage(Base):
    __tablename__ = "chat_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    game_id: Mapped[int] = mapped_column(ForeignKey("games.id"), index=True)
    player_id: Mapped[int] = mapped_column(ForeignKey("players.id"))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=now)


class Roll(Base):
    __tablename__ = "rolls"

    id: Mapped[int] = mapped_column(primary_key=True)
    game_id: Mapped[int] = mapped_column(ForeignKey("games.id"), index=True)
    player_id: Mapped[int] = mapped_column(ForeignKey("players.id"))
    expr: Mapped[str] = mapped_column(String(32))
    rolls: Mapped[list[int]] = mapped_column(JSON)
    modifier: Mapped[int]
    total: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=now)


class Whisper(Base):
    __tablename__ = "whispers"

    id: Mapped[int] = mapped_column(primary_key=True)
    game_id: Mapped[int] = mapped_column(ForeignKey("games.id"), index=True)
    to_player_id: Mapped[int] = mapped_column(ForeignKey("players.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=now)


class Database:
    """An engine and its session factory: ``async with db.session() as session``."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(url)
        # expire_on_commit=False: objects stay readable after the explicit commit, to
        # build the message that is published next.
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    async def create_tables(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)

    async def dispose(self) -> None:
        await self.engine.dispose()
