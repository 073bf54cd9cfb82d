"""The bot client against the fake bot, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from chatserver import chatbot
from chatserver.chatbot import BotAnswer, BotRefused, ChatbotClient
from chatserver.errors import TemporaryUpstreamError
from chatserver.fakes.chatbot import (
    HUMAN_HANDOVER_ANSWER,
    UNSUPPORTED,
    FakeChatbot,
    FakeChatbotServer,
    automatic_answer_html,
)
from chatserver.metrics import UPSTREAM_ERRORS


@pytest.fixture
def bot() -> Iterator[FakeChatbotServer]:
    server = FakeChatbot.start_threaded()
    yield server
    server.stop()


@pytest.fixture
async def client(bot: FakeChatbotServer) -> AsyncIterator[ChatbotClient]:
    yield ChatbotClient(bot.url + "/")  # a trailing slash in the setting must not matter
    await chatbot.close_sessions()


def errors(kind: str) -> float:
    value = UPSTREAM_ERRORS.labels("bot", kind)._value.get()
    assert isinstance(value, float)
    return value


async def ask(client: ChatbotClient, call: str) -> str:
    if call == "answer":
        return (await client.answer(["Hallo"], language="de", region="r", deadline_secs=10)).answer
    return await client.translate("Hallo", source_language="ar", target_language="de")


async def test_answer(client: ChatbotClient, bot: FakeChatbotServer) -> None:
    answer = await client.answer(["Hallo", "Wo ist das Amt?"], language="de", region="augsburg")

    assert answer == BotAnswer(
        answer=automatic_answer_html("Wo ist das Amt?", language="de", region="augsburg"),
        automatic_answers=True,
    )
    [request] = bot.received()
    assert request["path"] == "/chatanswers/extract_answer/"
    assert request["content_type"] == "application/json"
    assert request["json"] == {
        "messages": [
            {"role": "user", "content": "Hallo"},
            {"role": "user", "content": "Wo ist das Amt?"},
        ],
        "language": "de",
        "region": "augsburg",
    }


async def test_answer_sends_the_last_ten_messages(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    await client.answer([f"m{i}" for i in range(15)], language="en", region="r")

    [request] = bot.received()
    assert [m["content"] for m in request["json"]["messages"]] == [f"m{i}" for i in range(5, 15)]


async def test_human_handover(client: ChatbotClient) -> None:
    answer = await client.answer(["I want to talk to a HUMAN"], language="en", region="r")

    assert answer == BotAnswer(answer=HUMAN_HANDOVER_ANSWER, automatic_answers=False)


async def test_translate(client: ChatbotClient, bot: FakeChatbotServer) -> None:
    translation = await client.translate("مرحبا", source_language="ar", target_language="de")

    assert translation == "[de] مرحبا"
    [request] = bot.received()
    assert request["path"] == "/chatanswers/translate_message/"
    assert request["content_type"] == "application/json"
    assert request["json"] == {
        "message": "مرحبا",
        "source_language": "ar",
        "target_language": "de",
    }


async def test_translate_same_language_is_unchanged(client: ChatbotClient) -> None:
    assert await client.translate("Hallo", source_language="de", target_language="de") == "Hallo"


async def test_health(client: ChatbotClient) -> None:
    report = await client.health()

    assert report["status"] == "healthy"


async def test_health_reports_degraded_and_fails_on_5xx(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    bot.configure(fail="error", fail_on=["health"])
    assert (await client.health())["status"] == "degraded"

    bot.configure(fail="http_500")
    with pytest.raises(TemporaryUpstreamError):
        await client.health()


@pytest.mark.parametrize("call", ["answer", "translate"])
async def test_status_error_is_refused_at_once(
    client: ChatbotClient, bot: FakeChatbotServer, call: str
) -> None:
    bot.configure(fail="error")
    refused_before = errors("refused")

    with pytest.raises(BotRefused, match="simulated failure"):
        await ask(client, call)

    assert len(bot.received()) == 1  # the bot's final word: not asked again
    assert errors("refused") == refused_before + 1


async def test_answer_5xx_is_retried_within_the_deadline(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    bot.configure(fail="http_500", fail_count=1)
    errors_before = errors("http_5xx")

    answer = await client.answer(["Hallo"], language="de", region="r", deadline_secs=10)

    assert answer.automatic_answers
    assert len(bot.received()) == 2
    assert errors("http_5xx") == errors_before + 1


async def test_answer_connection_refused_is_retried_until_the_deadline(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    bot.call(bot.close_listener())
    started = time.monotonic()

    with pytest.raises(TemporaryUpstreamError, match=r"no answer within 0\.5 s"):
        await client.answer(["Hallo"], language="de", region="r", deadline_secs=0.5)

    assert time.monotonic() - started < 2


async def test_answer_stalled_past_the_deadline(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    bot.configure(fail="stall")
    started = time.monotonic()

    with pytest.raises(TemporaryUpstreamError, match=r"no answer within 1 s") as caught:
        await client.answer(["Hallo"], language="de", region="r", deadline_secs=1)

    assert 1 <= time.monotonic() - started < 3
    assert caught.value.temporary
    assert len(bot.received()) == 1


async def test_translate_timeout_is_temporary(
    client: ChatbotClient, bot: FakeChatbotServer
) -> None:
    bot.configure(translate_delay_secs=5)

    with pytest.raises(TemporaryUpstreamError, match=r"no translation within 0\.3 s"):
        await client.translate("x", source_language="ar", target_language="de", timeout_secs=0.3)


async def test_translate_5xx_is_temporary(client: ChatbotClient, bot: FakeChatbotServer) -> None:
    bot.configure(fail="http_500")

    with pytest.raises(TemporaryUpstreamError) as caught:
        await client.translate("x", source_language="ar", target_language="de")

    assert caught.value.status == 500
    assert len(bot.received()) == 1  # one attempt: retrying is the durable work's business


@pytest.mark.parametrize("call", ["answer", "translate"])
async def test_garbage_body_is_refused(
    client: ChatbotClient, bot: FakeChatbotServer, call: str
) -> None:
    bot.configure(fail="garbage")
    before = errors("bad_response")

    with pytest.raises(BotRefused, match="not a JSON object"):
        await ask(client, call)

    assert errors("bad_response") == before + 1


async def test_the_fake_refuses_a_charset_like_the_real_bot(bot: FakeChatbotServer) -> None:
    body = {"messages": [{"role": "user", "content": "Hallo"}], "language": "de", "region": "r"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            bot.url + "/chatanswers/extract_answer/",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json; charset=utf-8"},
        ) as response,
    ):
        assert response.status == 200
        assert await response.json() == {"status": "error", "message": UNSUPPORTED}

    [request] = bot.received()
    assert request["content_type"] == "application/json; charset=utf-8"


async def test_the_fake_requires_region_and_language(bot: FakeChatbotServer) -> None:
    async with aiohttp.ClientSession() as session:
        for body in ({"messages": [{"role": "user", "content": "x"}], "language": "de"}, {}):
            async with session.post(
                bot.url + "/chatanswers/extract_answer/",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                assert (await response.json())["status"] == "error"


async def test_http_controls(bot: FakeChatbotServer, client: ChatbotClient) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            bot.url + "/__fake__/configure", json={"fail": "error", "fail_count": 1}
        ) as response:
            assert response.status == 200
        with pytest.raises(BotRefused):
            await client.translate("x", source_language="ar", target_language="de")
        assert await client.translate("x", source_language="ar", target_language="de") == "[de] x"
        async with session.get(bot.url + "/__fake__/received") as response:
            assert [r["path"] for r in await response.json()] == [
                "/chatanswers/translate_message/"
            ] * 2
        async with session.post(bot.url + "/__fake__/configure", json={"fail": "x"}) as response:
            assert response.status == 400
        async with session.post(bot.url + "/__fake__/reset") as response:
            assert response.status == 200
    assert bot.received() == []


async def test_released_stall_is_answered(client: ChatbotClient, bot: FakeChatbotServer) -> None:
    bot.configure(fail="stall", fail_count=1)
    task = asyncio.create_task(client.answer(["Hallo"], language="de", region="r"))
    await bot.wait_received_async(1, timeout_secs=5)

    bot.release()

    answer = await asyncio.wait_for(task, timeout=5)
    assert answer.automatic_answers


async def test_stop_is_not_held_up_by_a_stalled_call(client: ChatbotClient) -> None:
    server = FakeChatbot.start_threaded()
    server.configure(fail="stall")
    stalled = ChatbotClient(server.url)
    task = asyncio.create_task(
        stalled.answer(["Hallo"], language="de", region="r", deadline_secs=1)
    )
    await server.wait_received_async(1, timeout_secs=5)
    started = time.monotonic()

    await asyncio.to_thread(server.stop)

    assert time.monotonic() - started < 2
    with pytest.raises(TemporaryUpstreamError):
        await asyncio.wait_for(task, timeout=5)


async def test_no_url_configured_is_permanent() -> None:
    with pytest.raises(BotRefused, match="CHATBOT_URL"):
        await ChatbotClient("").answer(["x"], language="de", region="r", deadline_secs=1)


def test_sync_wait_received(bot: FakeChatbotServer) -> None:
    with pytest.raises(TimeoutError, match="0 of 1"):
        bot.wait_received(1, timeout=0.1)
