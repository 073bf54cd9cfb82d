"""Reference servers that ``bench/run --reference`` measures side by side with the chat server.

- ``stock``: the pattern the Channels tutorial teaches, a Django + Channels ASGI app under daphne
  with channels-redis at its default settings (``bench/reference/stock/``);
- ``bare``: a ``websockets`` server with one Redis pub/sub connection per process
  (``bench/reference/bare.py``), the limit of what Python and Redis allow.

Both serve ``/ws/<device>/`` (a socket joins the device's group or channel and gets a
``{"type": "ready"}`` frame once it is subscribed), answer ``{"type": "ping"}`` with
``{"type": "pong"}`` and forward every push unchanged as one text frame. The generator builds
the pushed frames, shaped like the chat server's
(``{"type": "chat.message", "message": {"id": ..., "content": ..., "sent": ...}}``), so that
the chat server's accounting (lost, duplicated, misrouted, latency) applies unchanged.
"""
