"""wsroom quickstart: a chat room in ~40 lines of server code.

Run it:  uvicorn --app-dir examples/quickstart app:app  then open http://127.0.0.1:8000
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute

from wsroom import ClientError, Connection, Handshake, Hub, Identity, MessageContext

PAGE = (Path(__file__).parent / "index.html").read_text()


async def authenticate(handshake: Handshake) -> Identity | None:
    # A real app checks a token or a session cookie here; never in the query string.
    name = handshake.auth.get("name") if isinstance(handshake.auth, dict) else None
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 24:
        return None  # closes with 3500
    return Identity(id=name.strip())


hub = Hub(authenticate=authenticate)


@hub.on_connect
async def joined(conn: Connection) -> None:
    await conn.join("lobby")


class Chat(BaseModel):
    text: str = Field(min_length=1, max_length=500)


@hub.on("chat")
async def chat(ctx: MessageContext, data: Chat) -> dict[str, bool]:
    if data.text.strip() == "":
        raise ClientError("empty", "say something")
    assert ctx.connection.identity is not None
    await ctx.publish("lobby", "chat", {"from": ctx.connection.identity.id, "text": data.text})
    return {"ok": True}


async def homepage(request: object) -> HTMLResponse:
    return HTMLResponse(PAGE)


app = Starlette(
    routes=[Route("/", homepage), WebSocketRoute("/ws", hub.endpoint)],
    lifespan=hub.lifespan,
)
