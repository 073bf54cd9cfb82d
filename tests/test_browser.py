"""The demo page (``/demo/``) end to end in headless Chromium, against ``manage.py demo``.

What runs: ``python manage.py demo --port P --bot-delay 0.5`` as a subprocess, on a SQLite file
of the test's own (``DATABASE_URL``, ``REDIS_URL`` and ``CHATBOT_URL`` removed: the demo stack is
self-contained, with its in-process channel layer and worker, its fake Zammad and fake bot).
Debian's Chromium (``/usr/bin/chromium``) is driven by Playwright's Python package with
``executable_path``; Playwright never downloads a browser here. Everything waits on DOM
conditions with timeouts, never on fixed sleeps. Screenshots of every step, and the server's
output of each start, go to ``test-output/browser/``.

The steps:

1. The page opens, generates a device id and keeps it in localStorage, connects its socket and
   shows the fake Zammad's agent console in an iframe.
2. A message sent with Enter is acknowledged and becomes "sent"; the bot's answer appears (the
   client saw ``chat.typing`` frames on the way).
3. An agent replies through the fake Zammad's control API (``POST <fake>/__fake__/tickets/<id>/
   reply``, the fake's URL parsed from the command's output): the reply arrives live, its HTML
   rendered as HTML, with the server's sanitising in force (an ``onerror`` handler never runs).
4. The server process stops: the client shows "reconnecting…".
5. The server starts again on the same port and SQLite file: the client reconnects with
   ``?after=<highest id>`` and shows the same history, nothing duplicated.

   The demo command starts a *fresh* fake Zammad (and bot) on new random ports at every start and
   points the region at it, so the old ticket does not exist in the new fake: an agent reply
   after the restart is impossible (as is one while the server is down, the fake being part of
   the stopped process). What is checked after the restart instead: the reconnect and catch-up
   without duplicates, and that a NEW message sent after the restart gets a bot answer.
6. A reload (a fresh client, full history) shows exactly the messages the live client shows.
7. A second page forced onto the REST fallback (``?transport=rest``, same device) polls the same
   history, sends by POST and sees the bot's answer arrive by polling.

Chromium and Playwright are installed when missing (``apt-get install chromium`` after
``apt-get update``, as root; ``pip install playwright``, which ``scripts/setup`` normally does
through the dev extra); the test is skipped, saying why, only when that is impossible.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from chatserver.fakes.base import free_port

from .helpers import wait_for

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-output" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# What this machine needs (machines/python-svc.md); Playwright adds --headless and a new, empty
# --user-data-dir of its own for every launch (it refuses that flag in ``args``).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # longest DOM wait: a reconnect after a restart, with the client's backoff
FAKE_ZAMMAD_LINE = re.compile(r"^Fake Zammad\s+(http://\S+?)/__fake__/", re.MULTILINE)
DEMO_PAGE_LINE = re.compile(r"^Demo page\s+(http://\S+/demo/)", re.MULTILINE)


# --- installing what the test needs -----------------------------------------------------------


def _run(command: list[str], timeout: float) -> str | None:
    """Runs an install step; the reason it failed, or None."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`{' '.join(command)}` failed: {error}"
    if result.returncode != 0:
        return f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()[-400:]}"
    return None


def _ensure_chromium() -> str | None:
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium"
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing and installing Debian's chromium needs root"
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        failure = _run(command, timeout=600)
        if failure is not None:
            return failure
    return None if CHROMIUM.exists() else f"apt-get installed chromium, but {CHROMIUM} is missing"


def _ensure_playwright() -> str | None:
    try:
        importlib.import_module("playwright.async_api")
    except ImportError:
        failure = _run([sys.executable, "-m", "pip", "install", "playwright>=1.48"], timeout=600)
        if failure is not None:
            return failure
        importlib.invalidate_caches()
        try:
            importlib.import_module("playwright.async_api")
        except ImportError as error:
            return f"playwright was installed but does not import: {error}"
    return None


@pytest.fixture(scope="module")
def browser_tools() -> None:
    for ensure in (_ensure_chromium, _ensure_playwright):
        reason = ensure()
        if reason is not None:
            pytest.skip(f"cannot run the browser test: {reason}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)


# --- the demo stack as a subprocess -----------------------------------------------------------


class DemoServer:
    """``manage.py demo`` on a fixed port and SQLite file, to stop and start again."""

    def __init__(self, port: int, sqlite_path: Path, log_dir: Path) -> None:
        self.port = port
        self.sqlite_path = sqlite_path
        self.log_dir = log_dir
        self.starts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.fake_zammad_url = ""
        self.demo_url = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DATABASE_URL", "REDIS_URL", "CHATBOT_URL", "PORT"}
        }
        env.update(
            {
                "SQLITE_PATH": str(self.sqlite_path),
                "CHAT_DEMO_PAGE": "true",
                "CHAT_RATE_LIMITS_ENABLED": "false",
                "LOG_LEVEL": "WARNING",
                "DJANGO_SETTINGS_MODULE": "chatserver.settings",
                "PYTHONUNBUFFERED": "1",  # the URLs must reach the log before serving starts
            }
        )
        return env

    async def start(self) -> DemoServer:
        self.starts += 1
        log_path = self.log_dir / f"demo-server-{self.starts}.log"
        with log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "manage.py",
                "demo",
                "--port",
                str(self.port),
                "--bot-delay",
                "0.5",
                cwd=ROOT,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                output = log_path.read_text(errors="replace")
                if self.process.returncode is not None:
                    raise AssertionError(f"manage.py demo exited early:\n{output[-3000:]}")
                zammad = FAKE_ZAMMAD_LINE.search(output)
                demo = DEMO_PAGE_LINE.search(output)
                if zammad and demo and await self._healthy(http):
                    self.fake_zammad_url, self.demo_url = zammad.group(1), demo.group(1)
                    return self
                if time.monotonic() > deadline:
                    raise AssertionError(f"manage.py demo did not come up:\n{output[-3000:]}")
                await asyncio.sleep(0.1)

    async def _healthy(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(1)) as answer:
                return answer.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def demo_server(browser_tools: None, tmp_path: Path) -> Any:
    # The server's output goes beside the screenshots, to read when something fails.
    server = DemoServer(free_port(), tmp_path / "demo.sqlite3", SCREENSHOTS)
    await server.start()
    yield server
    await server.stop()


# --- the page's views, without a browser ---------------------------------------------------------


def test_demo_page_is_off_unless_enabled(client: Any, settings: Any) -> None:
    settings.CHAT_DEMO_PAGE = False
    for path in ("/demo/", "/demo/demo.js", "/demo/demo.css", "/demo/console/"):
        assert client.get(path).status_code == 404, path


def test_demo_page_defaults_and_query(client: Any, settings: Any) -> None:
    settings.CHAT_DEMO_PAGE = True
    settings.CHAT_DEMO_ZAMMAD_CONSOLE_URL = "http://127.0.0.1:9/__fake__/"
    response = client.get("/demo/")
    assert response.status_code == 200
    config = response.context["config"]
    assert (config["region"], config["language"], config["device"]) == ("demo", "en", "")
    assert config["wsPath"] == "/ws/v3/demo/en/chat/"
    assert b'id="console-frame" src="console/"' in response.content
    assert b'dir="ltr"' in response.content

    response = client.get("/demo/?region=augsburg&language=fa&device=abc-1&transport=rest")
    config = response.context["config"]
    assert (config["region"], config["language"], config["device"]) == ("augsburg", "fa", "abc-1")
    assert config["transport"] == "rest"
    assert b'dir="rtl"' in response.content
    # Anything invalid falls back to the defaults: the page always opens.
    response = client.get("/demo/?region=%3Cx%3E&language=english&device=a%20b&transport=x")
    config = response.context["config"]
    assert (config["region"], config["language"], config["device"]) == ("demo", "en", "")
    assert config["transport"] == "auto"

    console = client.get("/demo/console/")
    assert (console.status_code, console["Location"]) == (302, "http://127.0.0.1:9/__fake__/")
    script = client.get("/demo/demo.js")
    assert script.status_code == 200
    assert script["Content-Type"].startswith("text/javascript")
    assert b"chat.send" in b"".join(script.streaming_content)
    assert client.get("/demo/demo.css")["Content-Type"].startswith("text/css")
    assert client.get("/demo/settings.py").status_code == 404


def test_demo_console_missing(client: Any, settings: Any) -> None:
    settings.CHAT_DEMO_PAGE = True
    settings.CHAT_DEMO_ZAMMAD_CONSOLE_URL = ""
    assert client.get("/demo/console/").status_code == 404
    assert b"No agent console is configured" in client.get("/demo/").content


# --- the browser test ---------------------------------------------------------------------------


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def message_ids(page: Page) -> list[int]:
    ids: list[str | None] = await page.eval_on_selector_all(
        "#messages > li", "items => items.map(item => item.dataset.id || null)"
    )
    assert None not in ids, f"a message without an id is still shown: {ids}"
    numbers = [int(value) for value in ids if value is not None]
    assert numbers == sorted(set(numbers)), f"messages duplicated or out of order: {numbers}"
    return numbers


@pytest.mark.e2e
# Generous for a first run that installs Chromium; the test itself takes well under a minute.
@pytest.mark.timeout(900)
async def test_demo_page_in_chromium(demo_server: DemoServer) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            await _scenario(browser, demo_server)
        finally:
            await browser.close()


async def _scenario(browser: Browser, server: DemoServer) -> None:
    from playwright.async_api import expect

    page_errors: list[str] = []
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda error: page_errors.append(f"{error}: {error.stack}"))
    connection = page.locator("#connection")
    users = page.locator("#messages > li.user")
    # Automatic messages: the bot's answers, and machine translations of counsellor replies (the
    # demo region's default language is German, the page's English).
    bot_answers = page.locator("#messages > li.automatic", has_text="Automatic answer")
    translations = page.locator("#messages > li.automatic", has_text="[en]")
    counsellor = page.locator("#messages > li.agent:not(.automatic)")

    # 1. Open: a device id is generated and stored, the socket connects, the console is embedded.
    assert server.demo_url == f"{server.url}/demo/"
    await page.goto(server.demo_url)
    await expect(connection).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    await expect(connection).to_have_text("connected")
    device = await page.evaluate("localStorage.getItem('integreat-chat-demo-device')")
    assert re.fullmatch(r"demo-[0-9a-f]{24}", device)
    assert await page.get_attribute("body", "data-device") == device
    console = page.frame_locator("#console-frame")
    await expect(console.locator("h1")).to_have_text("Fake Zammad")
    assert page.frame(url=f"{server.fake_zammad_url}/__fake__/") is not None
    await expect(page.locator("#empty")).to_be_visible()
    await shot(page, "01-connected")

    # 2. Send with Enter: acknowledged, then sent to Zammad; the bot answers.
    await page.fill("#message-input", "Hello, where can I learn German?")
    await page.press("#message-input", "Enter")
    await expect(users).to_have_count(1)
    await expect(users.first).to_contain_text("Hello, where can I learn German?")
    await expect(bot_answers).to_have_count(1, timeout=WAIT_MS)
    await expect(bot_answers.first).to_contain_text("Automatic answer")
    await expect(users.first).to_have_attribute("data-status", "sent", timeout=WAIT_MS)
    await expect(page.locator("#typing")).to_be_hidden()
    frames: list[str] = await page.evaluate("window.demoClient.frames")
    assert {"chat.history", "chat.ack", "chat.message", "chat.status", "chat.typing"} <= set(
        frames
    ), frames
    await shot(page, "02-bot-answer")

    # 3. An agent answers in Zammad: the reply arrives live, as HTML, sanitised by the server,
    # followed by its machine translation.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.fake_zammad_url}/__fake__/tickets") as answer:
            tickets = await answer.json()
        assert len(tickets) == 1, tickets
        reply = (
            "<p>Hello from <strong>Emma</strong>, your counsellor.</p>"
            '<img src="x" onerror="window.injected = true">'
        )
        async with http.post(
            f"{server.fake_zammad_url}/__fake__/tickets/{tickets[0]['id']}/reply",
            json={"body": reply},
        ) as answer:
            assert answer.status == 201, await answer.text()
    await expect(counsellor).to_have_count(1, timeout=WAIT_MS)
    await expect(counsellor.first).to_contain_text("Hello from Emma, your counsellor.")
    await expect(counsellor.first.locator(".content strong")).to_have_text("Emma")
    await expect(translations).to_have_count(1, timeout=WAIT_MS)
    assert await page.evaluate("window.injected") is None
    await shot(page, "03-agent-reply")
    before = await message_ids(page)
    assert len(before) == 4, before

    # 4. The server goes away: the client says so.
    await server.stop()
    await expect(connection).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    await expect(connection).to_have_text("reconnecting…")
    await shot(page, "04-reconnecting")

    # 5. Back on the same port and database: reconnect with ?after, no duplicates, and a new
    # message gets a bot answer (the fresh fake Zammad knows no old tickets; see the docstring).
    await server.start()
    await expect(connection).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    frames = await page.evaluate("window.demoClient.frames")
    assert frames.count("chat.history") == 2, frames
    assert await message_ids(page) == before
    # The console was reloaded and shows the new, empty fake Zammad.
    await expect(console.locator("#tickets")).to_contain_text("No tickets yet.")
    # The frame's address follows its content (a redirect from /demo/console/): wait for it.
    await wait_for(
        lambda: page.frame(url=f"{server.fake_zammad_url}/__fake__/"),
        what="the console on the new fake Zammad",
    )
    await shot(page, "05-reconnected")
    await page.fill("#message-input", "And where is the nearest library?")
    await page.click("#send-button")
    await expect(users).to_have_count(2)
    await expect(bot_answers).to_have_count(2, timeout=WAIT_MS)
    await expect(bot_answers.nth(1)).to_contain_text("nearest library")
    after = await message_ids(page)
    assert after[: len(before)] == before
    assert len(after) == len(before) + 2, after
    await shot(page, "06-after-restart")

    # 6. A fresh client (reload) shows exactly what the live client showed.
    await page.reload()
    await expect(connection).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    await expect(page.locator("#messages > li")).to_have_count(len(after))
    assert await message_ids(page) == after
    assert await page.evaluate("localStorage.getItem('integreat-chat-demo-device')") == device
    await shot(page, "07-reloaded")

    # 7. The REST fallback: same device, polling only; a POSTed message gets a bot answer.
    rest = await browser.new_page(viewport={"width": 1400, "height": 900})
    rest.on("pageerror", lambda error: page_errors.append(f"{error}: {error.stack}"))
    await rest.goto(f"{server.demo_url}?transport=rest&device={device}")
    await expect(rest.locator("#connection")).to_have_attribute("data-state", "polling")
    await expect(rest.locator("#messages > li")).to_have_count(len(after), timeout=WAIT_MS)
    assert await message_ids(rest) == after
    await rest.fill("#message-input", "Is there a course in the evening?")
    await rest.click("#send-button")
    await expect(rest.locator("#messages > li.user")).to_have_count(3, timeout=WAIT_MS)
    rest_answers = rest.locator("#messages > li.automatic", has_text="Automatic answer")
    await expect(rest_answers).to_have_count(3, timeout=WAIT_MS)
    await expect(rest_answers.nth(2)).to_contain_text("evening")
    rest_ids = await message_ids(rest)
    assert len(rest_ids) == len(after) + 2, rest_ids
    await shot(rest, "08-rest-polling")
    # The socket client saw the same messages pushed.
    await expect(page.locator("#messages > li")).to_have_count(len(rest_ids), timeout=WAIT_MS)
    assert await message_ids(page) == rest_ids

    # Uncaught errors of the demo client. (The fake Zammad's console in the iframe throws while
    # its fake is down with the stopped server; that is the fake's, and expected.)
    own_errors = [error for error in page_errors if "/__fake__/" not in error]
    assert own_errors == []
