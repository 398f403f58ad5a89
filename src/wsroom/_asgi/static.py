"""Serving the browser client (``wsroom.js``) shipped inside the package."""

from __future__ import annotations

from starlette.staticfiles import StaticFiles

__all__ = ["static_files"]


def static_files() -> StaticFiles:
    """An ASGI app serving wsroom's browser files: the ES module ``wsroom.js``.

    Mount it anywhere in a Starlette or FastAPI app; the module needs no build step and
    has no dependencies. It speaks the [wire protocol](../topics/protocol.md) like the
    [Python client](../client.md): it reconnects with backoff, resumes, and drops
    duplicates by offset.

    Example:
        ```python
        app = Starlette(routes=[
            Mount("/wsroom", app=static_files()),
            WebSocketRoute("/ws", hub.endpoint),
        ], lifespan=hub.lifespan)
        ```

        ```html
        <script type="module">
          import {WsroomClient} from "/wsroom/wsroom.js";

          const client = new WsroomClient(`ws://${location.host}/ws`, {
            storage: window.sessionStorage,  // a reload resumes the session
            onMessage: ({stream, event, data}) => console.log(stream, event, data),
          });
          client.connect();
        </script>
        ```
    """
    return StaticFiles(packages=[("wsroom", "static")])
