"""One tiny server app per peer; every one exposes the same control endpoints.

- the WebSocket endpoint (``/ws``; python-socketio: ``/socket.io/``): every client that
  connects joins the one room;
- ``GET /count``: how many clients are in the room now;
- ``GET /publish?n=M&size=S&rate=R``: publish M messages of about S bytes of JSON to the
  room, as fast as the server can (R=0) or at R messages/s; answers when the loop is
  done (the body is the number published).
"""
