"""daphne's periodic checks, spread over slices (chatserver/daphne_protocol.py): every connection
is still checked once per round, finished applications are reaped and reported as daphne does,
and a real daphne still pings idle sockets and closes those that do not answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from chatserver.daphne_protocol import ConnectionPass, check_application
from chatserver.fakes.base import free_port
from chatserver.models import Region

from .conftest import Daphne, server_env, skip_without_shared_services


def test_a_pass_takes_every_connection_once_per_round_in_slices() -> None:
    walk = ConnectionPass(slices=10)
    connections = dict.fromkeys(range(25))
    first_round = [walk.next_slice(connections) for _ in range(9)]
    assert [len(chunk) for chunk in first_round] == [3] * 8 + [1]
    assert sorted(item for chunk in first_round for item in chunk) == list(range(25))
    connections[25] = None  # arrives during the round: checked from the next one on
    second_round = [walk.next_slice(connections) for _ in range(9)]
    assert sorted(item for chunk in second_round for item in chunk) == list(range(26))
    assert walk.next_slice({}) == []


class FakeServer:
    application_close_timeout = 10

    def __init__(self) -> None:
        self.connections: dict[Any, dict[str, Any]] = {}
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class FakeProtocol:
    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []

    def handle_exception(self, exception: BaseException) -> None:
        self.exceptions.append(exception)


async def test_a_finished_application_of_a_closed_connection_is_forgotten() -> None:
    server, protocol = FakeServer(), FakeProtocol()
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    server.connections[protocol] = {"application_instance": finished}
    check_application(server, protocol)
    assert server.connections == {protocol: {}}  # still connected: kept
    server.connections[protocol]["disconnected"] = time.time()
    check_application(server, protocol)
    assert server.connections == {}


async def test_an_application_outliving_its_connection_too_long_is_cancelled() -> None:
    server, protocol = FakeServer(), FakeProtocol()
    running = asyncio.get_running_loop().create_future()  # an application still running
    recently = time.time() - 1
    server.connections[protocol] = {"application_instance": running, "disconnected": recently}
    check_application(server, protocol)
    assert not running.cancelled()
    server.connections[protocol]["disconnected"] = time.time() - 11
    check_application(server, protocol)
    assert running.cancelled()
    assert server.connections == {}  # cancelled is done: forgotten in the same pass
    assert protocol.exceptions == []


async def test_an_application_that_crashed_is_reported_to_its_open_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, protocol = FakeServer(), FakeProtocol()
    crashed = asyncio.get_running_loop().create_future()
    error = RuntimeError("boom")
    crashed.set_exception(error)
    server.connections[protocol] = {"application_instance": crashed}
    check_application(server, protocol)
    assert protocol.exceptions == [error]
    assert "Exception inside application: boom" in caplog.text
    assert not server.stopped


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
async def test_idle_sockets_are_pinged_and_closed_when_they_stop_answering(
    live_region: Region,
) -> None:
    """Pings come from the sliced timeout check: an idle socket that answers them stays open,
    one that stops answering is closed after the ping timeout (two ping intervals)."""
    skip_without_shared_services()
    server = Daphne(free_port(), server_env(CHATBOT_URL="", WS_PING_INTERVAL_SECS="1")).start()
    url = f"{server.ws_url}/ws/v3/augsburg/de/chat/pinged-device/"
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url, autoping=False) as socket,
        ):
            pings = 0
            while pings < 3:  # each answered
                message = await socket.receive(timeout=10)
                if message.type == aiohttp.WSMsgType.PING:
                    pings += 1
                    await socket.pong(message.data)
                else:
                    assert message.type == aiohttp.WSMsgType.TEXT
            while True:  # no longer answered
                message = await socket.receive(timeout=15)
                if message.type != aiohttp.WSMsgType.PING:
                    break
            assert message.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED}
    finally:
        server.stop()
