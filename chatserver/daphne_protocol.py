"""daphne's WebSocket factory, adjusted for the wire contract: frame size limit and going away.

Frames over the size limit close the socket with 1009. autobahn, under daphne, lets an
application close only with 1000 or 3000-4999, and by default answers an oversized message by
dropping the TCP connection (1006). The limit has to be set on the protocol factory daphne builds,
with ``failByDrop`` off so that autobahn sends the 1009 close itself.

On SIGTERM, open sockets close with 1001 (going away), so clients reconnect at once, to another
process, and resume. daphne 4.2 itself only cancels the application instances before the reactor
stops and lets the process exit under its sockets: clients see the TCP connection drop (1006)
with no close frame. The factory therefore adds a reactor "before shutdown" trigger of its own
that sends every open socket a 1001 close frame and holds the shutdown until the close handshakes
are done, or ``GOING_AWAY_WAIT_SECS`` have passed.

daphne walks every connection in one go once a second (reaping finished applications) and
every two seconds (timeouts and pings). With 5,000 sockets each walk held the event loop for
10-20 ms, and every push arriving meanwhile waited (docs/performance.md). Here each walk is
spread over ten slices, ten times as often: every connection is still checked as often as in
daphne, but the loop is never held for more than a tenth of it.

daphne offers no hook for any of these, so its factory classes and its server's two checkers are
replaced once, on import of ``chatserver.asgi``, which both ``daphne chatserver.asgi:application``
and ``manage.py serve`` do before daphne builds the factory and starts the checkers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pprint
import time
from collections.abc import Iterable
from typing import Any

import autobahn.websocket.protocol
import daphne.server
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from django.conf import settings
from twisted.web.http import HTTPChannel

logger = logging.getLogger(__name__)

GOING_AWAY = 1001
GOING_AWAY_REASON = b"server restarting"
# autobahn drops a connection whose client does not answer a close within 1 s (its default
# closeHandshakeTimeout); this only bounds the wait for the slowest of them.
GOING_AWAY_WAIT_SECS = 3.0


# Close codes of RFC 6455 that the application may send, though autobahn's sendClose() takes
# only 1000 and 3000-4999: 1001 going away, 1011 unexpected condition, 1013 try again later.
PROTOCOL_CLOSE_CODES = {1001, 1011, 1013}


class ChatWebSocketProtocol(WebSocketProtocol):  # type: ignore[misc]
    """daphne's protocol, telling a shutdown waiting for it when it has closed, and letting the
    application close with the RFC's "try again later" codes."""

    closed_waiter: Any = None  # a Twisted Deferred while a shutdown waits for this socket

    def connectionMade(self) -> None:
        # daphne hands over the connection of an HTTP request it parsed (an upgrade), but
        # leaves Twisted's HTTP channel registered as the transport's producer, and with it that
        # request, its headers and its body buffer, for as long as the socket lives. The socket
        # has no use for it, or for the channel's pausing of reads.
        if isinstance(getattr(self.transport, "producer", None), HTTPChannel):
            self.transport.unregisterProducer()
        super().connectionMade()

    def onOpen(self) -> None:
        # The raw handshake, kept by autobahn after it has been parsed and answered.
        self.http_request_data = self.http_response_data = b""
        super().onOpen()

    def serverClose(self, code: int | None = None) -> None:
        if code in PROTOCOL_CLOSE_CODES and self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, isReply=False)
            return
        super().serverClose(code)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            super().onClose(wasClean, code, reason)
        finally:
            waiter, self.closed_waiter = self.closed_waiter, None
            if waiter is not None and not waiter.called:
                waiter.callback(None)


class LimitedWebSocketFactory(WebSocketFactory):  # type: ignore[misc]
    protocol = ChatWebSocketProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # daphne.server installed Twisted's asyncio reactor on import; this is that reactor.
        from twisted.internet import reactor

        # The interface's stub has no ``self``, so mypy sees the arguments shifted by one.
        trigger = self.close_sockets_going_away
        reactor.addSystemEventTrigger("before", "shutdown", trigger)  # type: ignore[arg-type]

    def setProtocolOptions(self, **options: Any) -> None:
        limit = settings.WS_MAX_FRAME_BYTES
        options["maxMessagePayloadSize"] = min(options.get("maxMessagePayloadSize") or limit, limit)
        options["maxFramePayloadSize"] = min(options.get("maxFramePayloadSize") or limit, limit)
        options["failByDrop"] = False
        super().setProtocolOptions(**options)
        # autobahn copies every option (29) from the factory onto each connection's protocol,
        # unless the protocol has it already: as class attributes they take no room per socket,
        # and the protocol's attribute dict stays in the next smaller size (1.6 KB less).
        # (A callable option, e.g. perMessageCompressionAccept, must not become a method.)
        for name in self.protocol.CONFIG_ATTRS:
            value = getattr(self, name)
            setattr(self.protocol, name, staticmethod(value) if callable(value) else value)

    def close_sockets_going_away(self) -> Any:
        """Send 1001 to every open socket; returns a Deferred that fires when all have closed
        (or the wait is over), which holds the reactor's shutdown until then."""
        from twisted.internet import defer, reactor

        sockets = [
            protocol
            for protocol in list(self.server_class.connections)
            if isinstance(protocol, ChatWebSocketProtocol) and protocol.state == protocol.STATE_OPEN
        ]
        if not sockets:
            return None
        logger.info("shutting down: closing %d sockets with %d", len(sockets), GOING_AWAY)
        waiters = []
        for protocol in sockets:
            protocol.closed_waiter = defer.Deferred()
            waiters.append(protocol.closed_waiter)
            # sendClose() refuses the 1xxx codes, which are the protocol's own; the frame method
            # beneath it sends any, and 1001 is exactly what RFC 6455 has for this.
            protocol.sendCloseFrame(code=GOING_AWAY, reasonUtf8=GOING_AWAY_REASON, isReply=False)
        all_closed = defer.DeferredList(waiters, consumeErrors=True)
        all_closed.addTimeout(GOING_AWAY_WAIT_SECS, reactor)
        all_closed.addErrback(lambda _failure: None)  # timed out: stop anyway
        return all_closed


class RawBodyWebRequest(WebRequest):  # type: ignore[misc]
    """daphne's HTTP request, without Twisted parsing form bodies into ``request.args``.

    daphne hands Django the raw body, and Django parses forms itself; Twisted's parse only
    costs time (it reads every POST's Content-Type through the email package: about a tenth of
    a webhook's CPU)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsePOSTFormSubmission = False


class RawBodyHTTPFactory(HTTPFactory):  # type: ignore[misc]
    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = RawBodyWebRequest
        return protocol


class _LazyPformat:
    """``pformat`` of an object, computed only if a log line is actually formatted."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)


class ConnectionPass:
    """A walk over a changing set of connections, one slice per call: each call takes the
    next ``1/slices`` of a snapshot, and a new snapshot once the previous one is done."""

    def __init__(self, slices: int) -> None:
        self.slices = slices
        self._left: list[Any] = []
        self._size = 1

    def next_slice(self, current: Iterable[Any]) -> list[Any]:
        if not self._left:
            self._left = list(current)
            self._size = max(1, math.ceil(len(self._left) / self.slices))
        chunk = self._left[: self._size]
        del self._left[: self._size]
        return chunk


CHECK_SLICES = 10
APPLICATION_CHECK_SECS = 1.0  # daphne's: each connection's application once a second
TIMEOUT_CHECK_SECS = 2.0  # daphne's: each connection's timeouts and ping every two seconds


def application_checker(server: daphne.server.Server) -> None:
    """daphne's ``Server.application_checker``, a slice of the connections at a time."""
    from twisted.internet import reactor

    for protocol in _next_slice(server, "_application_pass"):
        check_application(server, protocol)
    # (The interface's stub has no ``self``, so mypy sees the arguments shifted by one.)
    reactor.callLater(APPLICATION_CHECK_SECS / CHECK_SLICES, server.application_checker)  # type: ignore[arg-type]


def timeout_checker(server: daphne.server.Server) -> None:
    """daphne's ``Server.timeout_checker`` (timeouts and pings), a slice at a time."""
    from twisted.internet import reactor

    for protocol in _next_slice(server, "_timeout_pass"):
        protocol.check_timeouts()
    reactor.callLater(TIMEOUT_CHECK_SECS / CHECK_SLICES, server.timeout_checker)  # type: ignore[arg-type]


def _next_slice(server: daphne.server.Server, name: str) -> list[Any]:
    walk = server.__dict__.get(name)
    if walk is None:
        walk = server.__dict__[name] = ConnectionPass(CHECK_SLICES)
    return [
        protocol
        for protocol in walk.next_slice(server.connections)
        if protocol in server.connections
    ]


def check_application(server: daphne.server.Server, protocol: Any) -> None:
    """What daphne's checker does for one connection: cancel an application that outlives its
    disconnected connection too long, report the exception it ended with, and forget a
    connection whose application is done and which has disconnected."""
    details = server.connections[protocol]
    disconnected = details.get("disconnected")
    application_instance = details.get("application_instance")
    if (
        disconnected
        and time.time() - disconnected > server.application_close_timeout
        and application_instance
        and not application_instance.done()
    ):
        logger.warning(
            "Application instance %r for connection %s took too long to shut down and was killed.",
            application_instance,
            repr(protocol),
        )
        application_instance.cancel()
    if application_instance and application_instance.done():
        try:
            exception = application_instance.exception()
        except asyncio.CancelledError:
            pass
        else:
            if isinstance(exception, KeyboardInterrupt):
                server.stop()  # the application asks the server to exit (tests)
            elif exception:
                logger.error("Exception inside application: %s", exception, exc_info=exception)
                if not disconnected:
                    protocol.handle_exception(exception)
        del details["application_instance"]
        application_instance = None
    if not application_instance and disconnected:
        del server.connections[protocol]


def install() -> None:
    daphne.server.WebSocketFactory = LimitedWebSocketFactory
    daphne.server.HTTPFactory = RawBodyHTTPFactory
    daphne.server.Server.application_checker = application_checker
    daphne.server.Server.timeout_checker = timeout_checker
    # autobahn pretty-prints its options for a debug line on every connection, also when debug
    # logging is off: 3 % of a connect's CPU.
    autobahn.websocket.protocol.pformat = _LazyPformat  # type: ignore[attr-defined,assignment]
