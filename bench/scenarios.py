"""The scenarios: each is an async function of the run's ``Context`` that returns a ``Result``.

They run in the order given, on one event loop, and share the device sockets (``ctx.fleet``):
``connect`` opens them, ``burst`` pushes to them (and opens them first if nothing did).
A new scenario is a function decorated with ``@scenario("name", "what it measures")``.

The same scenarios measure the reference servers (``bench/targets.py``): what differs per target
is only how sockets connect (``ctx.fleet``) and how a push is made (``ctx.pusher``). Figures
that the comparison table needs are also kept as numbers (``Result.values``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
from redis import asyncio as aioredis

from bench import monitor, payloads, stack, system
from bench.clients import Fleet, Sent, Socket, parse_frame
from bench.stack import REGION_SLUG, Server, device_id
from bench.targets import Pusher, Target, WebhookPusher

PINGS_IN_FLIGHT = 200
# The last line of a traceback, e.g. "redis.exceptions.MaxConnectionsError: Too many connections",
# or daphne's "Exception inside application: ...".
EXCEPTION_LINE = re.compile(r"^(Exception inside application|[\w.]*(Error|Exception)): ")


@dataclass
class Context:
    args: argparse.Namespace
    target: Target
    database: str
    probe: monitor.Probe

    @property
    def fleet(self) -> Fleet:
        return self.target.fleet

    @property
    def pusher(self) -> Pusher:
        return self.target.pusher

    @property
    def server(self) -> Server:
        """The first (usually the only) server process."""
        return self.target.servers[0]

    @property
    def layer_prefix(self) -> str:
        return self.target.layer_prefix

    def rss_kib(self) -> int:
        """RSS of all server processes together."""
        return sum(system.rss_kib(pid) for pid in self.target.pids)

    def open_fds(self) -> int:
        return sum(system.open_fds(pid) for pid in self.target.pids)

    async def usage(self) -> monitor.Usage:
        return await self.probe.usage()


@dataclass
class Result:
    name: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # any makes the run fail
    notes: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)  # for the comparison table

    def add(self, label: str, value: object) -> None:
        self.figures.append((label, str(value)))


Scenario = Callable[[Context], Awaitable[Result]]


@dataclass(frozen=True)
class Entry:
    run: Scenario
    description: str
    references: bool  # also measured on the reference servers


SCENARIOS: dict[str, Entry] = {}


def scenario(
    name: str, description: str, *, references: bool = True
) -> Callable[[Scenario], Scenario]:
    def register(run: Scenario) -> Scenario:
        SCENARIOS[name] = Entry(run, description, references)
        return run

    return register


# --- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an unsorted list (0 for an empty one)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def ms(secs: float) -> str:
    if secs < 0.01:
        return f"{secs * 1000:.1f} ms"
    return f"{secs * 1000:.0f} ms" if secs < 10 else f"{secs:.1f} s"


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {ms(percentile(values, 50))}, p90 {ms(percentile(values, 90))}, "
        f"p99 {ms(percentile(values, 99))}, max {ms(max(values))}"
    )


def counted(counter: Counter[str]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in counter.most_common()) or "none"


# --- connect ------------------------------------------------------------------------------------


async def open_devices(ctx: Context, count: int) -> list[Socket]:
    """Open ``count`` device sockets: all at once, or spread evenly over --connect-secs."""
    return await ctx.fleet.open(
        ((index, device_id(index)) for index in range(count)),
        open_timeout=ctx.args.open_timeout,
        history_timeout=ctx.args.history_timeout,
        spread_secs=ctx.args.connect_secs,
    )


def report_opening(
    result: Result,
    sockets: list[Socket],
    failures: Counter[str],
    elapsed_secs: float,
    *,
    noun: str,
    done: str,
    first_frame: str,
    reasons: str,
) -> None:
    """The rows that the connect and reconnect scenarios share: failures, time, time per socket."""
    result.add(f"failed {noun}s", sum(failures.values()))
    if failures:
        result.add(reasons, counted(failures))
        result.problems.append(f"{sum(failures.values())} of {len(sockets)} {noun}s failed")
    result.add(done if not failures else "time until the last attempt ended", ms(elapsed_secs))
    result.add(
        f"{noun} time per socket ({first_frame})",
        spread([s.history_at - s.started_at for s in sockets if s.history_at is not None]),
    )


async def warm_up(ctx: Context) -> None:
    """One socket per server process and one push before anything is measured: the servers
    have imported and connected everything they need lazily, so memory before the load is a
    fair baseline."""
    fleet = ctx.fleet.sibling()
    count = len(ctx.target.servers)
    sockets = await fleet.open(
        [(-1 - number, f"bench-warmup-{number}") for number in range(count)],
        open_timeout=ctx.args.open_timeout,
        history_timeout=10,
    )
    for socket in sockets:
        if socket.failure:
            raise RuntimeError(f"the warm-up socket failed: {socket.failure}")
    await fleet.close()
    await ctx.pusher.warm_up()


@scenario(
    "connect",
    "N sockets connecting at once (or spread over --connect-secs); failures, time, server memory "
    "per socket",
)
async def connect(ctx: Context) -> Result:
    result = Result("connect")
    count = ctx.args.sockets
    rss_before = ctx.rss_kib()
    tcp_before = system.tcp_counters()
    usage_before = await ctx.usage()
    async with monitor.Sampler(ctx.probe, ctx.layer_prefix) as peaks:
        started = time.perf_counter()
        sockets = await open_devices(ctx, count)
        finished = time.perf_counter()
        usage_after = await ctx.usage()
    rss_after = ctx.rss_kib()
    tcp = {name: value - tcp_before[name] for name, value in system.tcp_counters().items()}

    ready = [s for s in sockets if s.history_at is not None]
    failures = Counter(s.failure for s in sockets if s.failure is not None)
    result.add(
        "sockets opened",
        f"{count} at once"
        if not ctx.args.connect_secs
        else f"{count}, spread evenly over {ctx.args.connect_secs:g} s",
    )
    report_opening(
        result,
        sockets,
        failures,
        finished - started,
        noun="connect",
        done="time to all connected",
        first_frame="start to first frame: chat.history, or ready",
        reasons="failure reasons",
    )
    result.add(
        "  of which handshake",
        spread([s.opened_at - s.started_at for s in ready if s.opened_at is not None]),
    )
    result.add(
        "server RSS before / after", f"{rss_before / 1024:.1f} MiB / {rss_after / 1024:.1f} MiB"
    )
    result.values.update(sockets=count, failed=sum(failures.values()))
    if not failures:
        result.values["connect_secs"] = finished - started
    if len(ready) >= 0.9 * count:
        per_socket = (rss_after - rss_before) / len(ready)
        result.add("server memory per socket", f"{per_socket:.0f} KiB")
        result.values["kib_per_socket"] = per_socket
    elif ready:
        per_socket = (rss_after - rss_before) / len(ready)
        result.add(
            "server memory per socket",
            f"{per_socket:.0f} KiB, but only {len(ready)} of {count} connected (RSS delta / "
            "connected; not in the comparison)",
        )
    result.add("server open files after", ctx.open_fds())
    result.add(
        "kernel: accept-queue overflows / drops / SYN cookies",
        f"{tcp['ListenOverflows']} / {tcp['ListenDrops']} / {tcp['SyncookiesSent']}",
    )
    cost = monitor.cost(usage_before, usage_after)
    result.add("CPU while connecting", cost.summary())
    result.add("server CPU per connect", f"{1000 * cost.server_cpu_secs / count:.1f} ms")
    result.values["cpu_ms_per_connect"] = 1000 * cost.server_cpu_secs / count
    result.add(
        "peaks: server DB connections / server threads",
        f"{peaks.db_connections} / {peaks.server_threads}",
    )
    return result


# --- burst --------------------------------------------------------------------------------------


@dataclass
class Arrivals:
    delivered: dict[int, float] = field(default_factory=dict)  # article -> first arrival
    duplicates: int = 0
    misrouted: int = 0
    unmatched: int = 0
    other_frames: Counter[str] = field(default_factory=Counter)


def match_frames(
    sockets: list[Socket], since: dict[int, int], expected: dict[int, int]
) -> Arrivals:
    """Match every frame received since the burst began to the article it carries.

    ``expected`` maps article id -> device index."""
    arrivals = Arrivals()
    for socket in sockets:
        for arrived_at, raw in socket.frames[since.get(socket.device, 0) :]:
            frame = parse_frame(raw)
            if frame is None or frame.get("type") != "chat.message":
                arrivals.other_frames[str(frame.get("type") if frame else "not JSON")] += 1
                continue
            article = payloads.article_of(str(frame.get("message", {}).get("content", "")))
            if article is None or article not in expected:
                arrivals.unmatched += 1
            elif expected[article] != socket.device:
                arrivals.misrouted += 1
            elif article in arrivals.delivered:
                arrivals.duplicates += 1
            else:
                arrivals.delivered[article] = arrived_at
    return arrivals


async def wait_for_frames(
    fleet: Fleet, target: int, *, quiet_secs: float, limit_secs: float
) -> None:
    """Until ``target`` message frames have arrived, or none arrived for ``quiet_secs``, or
    ``limit_secs`` have passed (waits on the fleet's arrival event, never polls)."""
    sink = fleet.sink
    deadline = time.perf_counter() + limit_secs
    last_change = time.perf_counter()
    while sink.count < target:
        wait = min(deadline, last_change + quiet_secs) - time.perf_counter()
        if wait <= 0:
            return
        sink.arrived.clear()
        try:
            await asyncio.wait_for(sink.arrived.wait(), wait)
        except TimeoutError:
            continue  # the loop ends it: quiet too long, or past the deadline
        last_change = time.perf_counter()


def slowest(delivered: dict[int, float], by_article: dict[int, Sent], started: float) -> str:
    """When the five slowest pushes were sent, and what they took: a stall shows as several
    sent within a few milliseconds of each other."""
    latency = {
        article: arrived - by_article[article].sent_at for article, arrived in delivered.items()
    }
    worst = sorted(latency, key=latency.__getitem__, reverse=True)[:5]
    return ", ".join(
        f"{by_article[article].sent_at - started:.2f} s ({ms(latency[article])})"
        for article in worst
    )


async def pushes(
    ctx: Context,
    result: Result,
    deliveries: list[payloads.Delivery],
    send: Callable[[list[payloads.Delivery]], Awaitable[list[Sent]]],
    *,
    how: str,
) -> Result:
    """Post ``deliveries`` with ``send`` to the open sockets' devices and account for every push:
    delivered, lost, duplicated, misrouted, latency; what it cost the server, Redis and
    PostgreSQL."""
    args = ctx.args
    sockets = ctx.fleet.ready
    listening = {socket.device for socket in sockets}
    expected = {d.article_id: d.device for d in deliveries if d.device in listening}
    since = {socket.device: len(socket.frames) for socket in sockets}
    frames_before = ctx.fleet.message_frames()

    commands_before = await ctx.probe.redis_commands()
    sessions_before = await ctx.probe.pg_sessions()
    usage_before = await ctx.usage()
    async with monitor.Sampler(ctx.probe, ctx.layer_prefix) as peaks:
        started = time.perf_counter()
        sent = await send(deliveries)
        all_answered = time.perf_counter()
        await wait_for_frames(
            ctx.fleet,
            frames_before + len(expected),
            quiet_secs=args.drain_quiet,
            limit_secs=args.drain_limit,
        )
        usage_after = await ctx.usage()
        # A short grace to catch duplicates that trail the last expected frame.
        await asyncio.sleep(args.duplicate_grace)
    commands = await ctx.probe.redis_commands() - commands_before
    sessions = await ctx.probe.pg_sessions() - sessions_before

    arrivals = match_frames(sockets, since, expected)
    by_article: dict[int, Sent] = {s.delivery.article_id: s for s in sent}
    errors = Counter(s.error or f"HTTP {s.status}" for s in sent if not s.ok)
    outcomes = Counter(s.outcome or "none" for s in sent if s.ok)
    # A push can only be expected where the server took the webhook; failed webhooks are
    # counted apart (Zammad would retry them).
    accepted = {a for a in expected if by_article[a].ok and by_article[a].outcome == "message"}
    lost = len(accepted - arrivals.delivered.keys())
    missing = len(expected) - len(arrivals.delivered)
    latencies = [
        arrived - by_article[article].sent_at for article, arrived in arrivals.delivered.items()
    ]
    answer_times = [s.answered_at - s.sent_at for s in sent if s.answered_at is not None]

    noun = ctx.pusher.noun
    result.add(f"{noun}s sent", f"{len(sent)} ({how})")
    result.add("  each", ctx.pusher.how)
    if isinstance(ctx.pusher, WebhookPusher) and len(ctx.pusher.urls) > 1:
        result.add(
            "  taken by another process than the device's socket",
            f"{ctx.pusher.cross_process(deliveries)} of {len(deliveries)}",
        )
    result.add(f"{noun} errors", sum(errors.values()))
    if errors:
        result.add("  error kinds", counted(errors))
        result.problems.append(f"{sum(errors.values())} {noun}s failed")
    result.add(f"{noun} outcomes", counted(outcomes))
    result.add(
        f"{noun} rate",
        f"{len(sent) / (all_answered - started):.0f}/s "
        f"(all answered after {ms(all_answered - started)})",
    )
    result.add(f"{noun} answer time", spread(answer_times))
    result.add(f"pushes expected ({noun} taken, socket open)", len(accepted))
    result.add("delivered", len(arrivals.delivered))
    result.add("lost (taken by the server, never pushed)", lost)
    if missing != lost:
        result.add("missing in all (including failed webhooks)", missing)
    result.add("duplicated", arrivals.duplicates)
    if arrivals.misrouted or arrivals.unmatched:
        result.add("misrouted / unmatched frames", f"{arrivals.misrouted} / {arrivals.unmatched}")
    if arrivals.other_frames:
        result.add("other frames", counted(arrivals.other_frames))
    if lost:
        result.problems.append(f"{lost} of {len(accepted)} pushes lost")
    if arrivals.duplicates:
        result.problems.append(f"{arrivals.duplicates} pushes duplicated")
    if arrivals.misrouted:
        result.problems.append(f"{arrivals.misrouted} pushes reached the wrong device")
    result.values.update(
        sent_per_s=len(sent) / max(all_answered - started, 1e-9),
        expected=len(accepted),
        delivered=len(arrivals.delivered),
        lost=lost,
        missing=missing,
        duplicated=arrivals.duplicates,
        webhook_errors=sum(errors.values()),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
    )
    if arrivals.delivered:
        last = max(arrivals.delivered.values())
        label = "time to all delivered" if not missing else "time to last delivered"
        result.add(label, ms(last - started))
        result.values["last_delivered_secs"] = last - started
        if not missing:
            result.values["all_delivered_secs"] = last - started
        result.values["pushes_per_s"] = len(arrivals.delivered) / max(last - started, 1e-9)
        result.add(
            "pushes delivered per s (first sent to last received)",
            f"{result.values['pushes_per_s']:.0f}/s",
        )
    result.add("push latency (sent to frame received)", spread(latencies))
    if arrivals.delivered:
        result.add(
            "slowest pushes (sent at, after the first)",
            slowest(arrivals.delivered, by_article, started),
        )
    closed = ctx.fleet.closed_unexpectedly()
    if closed:
        result.add("sockets closed by the server so far", counted(closed))
        result.problems.append(f"{sum(closed.values())} sockets closed by the server")
    cost = monitor.cost(usage_before, usage_after)
    result.add("CPU while posting and delivering", cost.summary())
    result.add(
        "server CPU per push (with its webhook or HTTP request)",
        f"{1000 * cost.server_cpu_secs / max(1, len(sent)):.2f} ms",
    )
    result.values["cpu_ms_per_push"] = 1000 * cost.server_cpu_secs / max(1, len(sent))
    per_webhook = ", ".join(
        f"{name} {commands[name] / len(sent):.1f}" for name in REDIS_COMMANDS if commands[name]
    )
    result.add(
        "Redis commands per push (whole Redis)",
        f"{sum(commands.values()) / max(1, len(sent)):.1f}: {per_webhook or 'none of the layer'}",
    )
    result.add("PostgreSQL sessions opened", sessions)
    result.add(
        "peaks: server DB connections / server threads / layer queue",
        f"{peaks.db_connections} / {peaks.server_threads} / {peaks.layer_backlog}",
    )
    if peaks.errors:
        result.notes.append(f"sampler errors: {counted(peaks.errors)}")
    return result


# What channels-redis sends per group_send and per received message (the rest is others').
REDIS_COMMANDS = (
    "zremrangebyscore",
    "zrange",
    "eval",
    "evalsha",
    "bzpopmin",
    "zadd",
    "zpopmin",
    "expire",
    "zcount",
    "set",
)


@scenario(
    "burst",
    "pushes (signed Zammad webhooks to this server) as fast as the server takes them, to the "
    "first --burst-devices open sockets",
)
async def burst(ctx: Context) -> Result:
    args = ctx.args
    if not ctx.fleet.ready:
        await open_devices(ctx, args.sockets)
    devices = min(args.burst_devices or args.sockets, args.sockets)
    # Round by round: every device's first push before any second one, as a counsellor team
    # answering many chats would produce them.
    deliveries = [
        ctx.pusher.delivery(device)
        for _ in range(args.webhooks_per_device)
        for device in range(devices)
    ]

    async def send(items: list[payloads.Delivery]) -> list[Sent]:
        return await ctx.pusher.send_all(items, concurrency=args.concurrency)

    how = f"{devices} devices, {args.webhooks_per_device} each, {args.concurrency} in flight"
    return await pushes(ctx, Result("burst"), deliveries, send, how=how)


@scenario(
    "rate",
    "pushes (signed Zammad webhooks to this server) at a fixed rate (--rate per second for "
    "--rate-secs), to the open sockets",
)
async def rate(ctx: Context) -> Result:
    args = ctx.args
    if not ctx.fleet.ready:
        await open_devices(ctx, args.sockets)
    count = max(1, round(args.rate * args.rate_secs))
    deliveries = [ctx.pusher.delivery(index % args.sockets) for index in range(count)]

    async def send(items: list[payloads.Delivery]) -> list[Sent]:
        return await ctx.pusher.send_paced(items, rate=args.rate, max_in_flight=args.concurrency)

    result = Result("rate")
    how = f"{args.rate:g}/s for {args.rate_secs:g} s, at most {args.concurrency} in flight"
    return await pushes(ctx, result, deliveries, send, how=how)


@scenario(
    "floor",
    "the parts every push must pass through, each alone at --rate per second for --floor-secs "
    "with the sockets open: an HTTP request to the cheapest Django view, a durable one-row "
    "commit on the server's database, a message handed from one Redis connection to another; "
    "their medians added up are about the lowest push p50 that a server pushing only what it "
    "has stored can reach",
    references=False,
)
async def floor(ctx: Context) -> Result:
    args = ctx.args
    result = Result("floor")
    if not ctx.fleet.ready:
        await open_devices(ctx, args.sockets)
    how = f"{args.rate:g}/s for {args.floor_secs:g} s each"
    healthz = f"{ctx.server.url}/healthz"
    async with aiohttp.ClientSession() as session:

        async def request() -> float:
            started = time.perf_counter()
            async with session.get(healthz) as answer:
                await answer.read()
            return time.perf_counter() - started

        http = await paced(request, args.rate, args.floor_secs)
    commits, round_trips = await paced_statements(
        stack.Database.url_of(ctx.database), args.rate, args.floor_secs
    )
    async with RedisHandOver() as redis_hand_over:
        redis = await paced(redis_hand_over.one, args.rate, args.floor_secs)
    sockets = itertools.cycle(ctx.fleet.ready)

    async def socket_ping() -> float:
        return await ping(next(sockets), args.history_timeout) or math.inf

    pings = await paced(socket_ping, args.rate, args.floor_secs)
    parts = [
        ("HTTP: GET /healthz answered (the cheapest Django view)", http),
        ("PostgreSQL: one row inserted and committed (autocommit, the WAL flushed)", commits),
        ("Redis: a message pushed on one connection, popped on another (BLPOP)", redis),
    ]
    for label, latencies in parts:
        result.add(label, spread(latencies))
    floor_p50 = sum(percentile(latencies, 50) for _, latencies in parts)
    result.add(
        "the three medians added up: about the lowest p50 a push can have",
        f"{floor_p50 * 1000:.1f} ms ({how}; target for the push p50: at most 5 ms)",
    )
    result.add(
        "not in the sum: PostgreSQL, one statement's round trip (SELECT 1)", spread(round_trips)
    )
    result.add(
        "not in the sum: WebSocket ping to pong (both ways through daphne and the consumer)",
        spread(pings),
    )
    result.values.update(floor_p50=floor_p50)
    return result


async def paced(call: Callable[[], Awaitable[float]], rate: float, secs: float) -> list[float]:
    """Start ``call`` ``rate`` times a second for ``secs``, each at its own time whether or not
    the ones before have finished, and collect the latencies it returns."""
    count = max(1, round(rate * secs))
    started = time.monotonic()

    async def one(index: int) -> float:
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        return await call()

    return list(await asyncio.gather(*(one(index) for index in range(count))))


async def paced_statements(
    database_url: str, rate: float, secs: float
) -> tuple[list[float], list[float]]:
    """On a connection of the server's database: one-row inserts, each its own transaction (in
    a table of the bench's own, dropped afterwards), then ``SELECT 1``: the latencies of each."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as connection:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, body text)"
        )
        body = "x" * 200

        async def timed(sql: str, params: tuple[str, ...] = ()) -> float:
            started = time.perf_counter()
            await connection.execute(sql, params)
            return time.perf_counter() - started

        try:
            commits = await paced(
                lambda: timed("INSERT INTO bench_floor (body) VALUES (%s)", (body,)), rate, secs
            )
        finally:
            await connection.execute("DROP TABLE bench_floor")
        return commits, await paced(lambda: timed("SELECT 1"), rate, secs)


class RedisHandOver:
    """Messages pushed onto a list by one connection and popped by another that waits on it, as
    the channel layer hands an event from the publishing process to the socket's process."""

    def __init__(self) -> None:
        self.key = f"chatbench:floor:{os.getpid()}"
        self.sender = aioredis.Redis.from_url(stack.REDIS_URL)
        self.receiver = aioredis.Redis.from_url(stack.REDIS_URL)
        self.waiting: dict[bytes | str, asyncio.Future[float]] = {}
        self.numbers = itertools.count()
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RedisHandOver:
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.reader is not None
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.sender.delete(self.key)
        await self.sender.aclose()
        await self.receiver.aclose()

    async def _read(self) -> None:
        while True:
            popped = await self.receiver.blpop([self.key], timeout=0)
            arrived = time.perf_counter()
            if popped is not None:
                future = self.waiting.pop(popped[1], None)
                if future is not None and not future.done():
                    future.set_result(arrived)

    async def one(self) -> float:
        token = str(next(self.numbers)).encode()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        started = time.perf_counter()
        await self.sender.rpush(self.key, token)
        arrived: float = await asyncio.wait_for(future, 10)
        return arrived - started


@scenario(
    "idle",
    "the open sockets held idle for --idle-secs, then each pinged: who is still there",
)
async def idle(ctx: Context) -> Result:
    args = ctx.args
    result = Result("idle")
    if not ctx.fleet.ready:
        await open_devices(ctx, args.sockets)
    sockets = ctx.fleet.ready
    rss_before = ctx.rss_kib()
    usage_before = await ctx.usage()
    await asyncio.sleep(args.idle_secs)
    cost = monitor.cost(usage_before, await ctx.usage())
    still_open = [socket for socket in sockets if socket.ready]
    closed = Counter(socket.closed for socket in sockets if socket.closed is not None)
    pongs = await ping_all(still_open, args.history_timeout, PINGS_IN_FLIGHT)
    answered = [secs for secs in pongs if secs is not None]
    result.add("sockets held idle", f"{len(sockets)} for {args.idle_secs:g} s")
    result.add("closed by the server while idle", sum(closed.values()))
    if closed:
        result.add("  close reasons", counted(closed))
        result.problems.append(f"{sum(closed.values())} idle sockets closed by the server")
    result.add(
        "answered a ping",
        f"{len(answered)} of {len(still_open)} ({PINGS_IN_FLIGHT} pings in flight, "
        f"{args.history_timeout:g} s each)",
    )
    if len(answered) < len(still_open):
        result.problems.append(f"{len(still_open) - len(answered)} open sockets did not answer")
    result.add("ping to pong", spread(answered))
    result.values.update(
        idle_lost=sum(closed.values()) + len(still_open) - len(answered),
        ping_p99=percentile(answered, 99),
    )
    result.add("CPU while idle", cost.summary())
    result.add(
        "server RSS before / after idling",
        f"{rss_before / 1024:.1f} MiB / {ctx.rss_kib() / 1024:.1f} MiB",
    )
    return result


@scenario(
    "rest",
    "REST polls as today's apps make them: GET of a 20-message chat and a poll answered 304 by "
    "its ETag, each against the cheapest Django view (/healthz) on the same server",
    references=False,
)
async def rest(ctx: Context) -> Result:
    args = ctx.args
    result = Result("rest")
    device = device_id(0)
    chat_url = f"{ctx.server.url}/api/v3/{REGION_SLUG}/de/chat/{device}/"
    async with aiohttp.ClientSession() as session:
        for number in range(REST_MESSAGES):
            async with session.post(chat_url, data={"message": f"message {number}"}) as answer:
                if answer.status != 200:
                    result.problems.append(f"setting up the chat: POST answered {answer.status}")
                    return result
        async with session.get(chat_url) as answer:
            etag = answer.headers.get("ETag", "")
            messages = len((await answer.json())["messages"])
        # Every device's chat polled in turn by its ETag, as many apps would: each chat once
        # read, then unchanged.
        every_chat: list[tuple[str, dict[str, str]]] = []
        for index in range(args.sockets):
            url = f"{ctx.server.url}/api/v3/{REGION_SLUG}/de/chat/{device_id(index)}/"
            async with session.get(url) as answer:
                if answer.status == 200:
                    every_chat.append((url, {"If-None-Match": answer.headers.get("ETag", "")}))
    targets: list[tuple[str, list[tuple[str, dict[str, str]]], int]] = [
        ("cheapest Django view (/healthz)", [(f"{ctx.server.url}/healthz", {})], 200),
        (f"GET of a {messages}-message chat", [(chat_url, {})], 200),
        ("poll answered 304 by its ETag", [(chat_url, {"If-None-Match": etag})], 304),
        (f"polls of {len(every_chat)} chats in turn, each answered 304", every_chat, 304),
    ]
    rates: list[float] = []
    for label, requests, expected in targets:
        usage_before = await ctx.usage()
        done, wrong, latencies = await hammer(requests, expected, args.rest_secs, 32)
        cost = monitor.cost(usage_before, await ctx.usage())
        rate = done / args.rest_secs
        rates.append(rate)
        result.add(label, f"{rate:.0f} requests/s; {spread(latencies)}; CPU: {cost.summary()}")
        if wrong:
            result.problems.append(f"{label}: {wrong} answers were not {expected}")
    if rates[0]:
        result.add("GET / cheapest view", f"{rates[1] / rates[0]:.0%} (target at least 60 %)")
        result.add("304 / cheapest view", f"{rates[2] / rates[0]:.0%} (target at least 80 %)")
        result.add("304s of every chat / cheapest view", f"{rates[3] / rates[0]:.0%}")
        result.values.update(
            cheapest_per_s=rates[0],
            get_ratio=rates[1] / rates[0],
            poll_ratio=rates[2] / rates[0],
            every_chat_poll_ratio=rates[3] / rates[0],
        )
    return result


REST_MESSAGES = 20


# --- reconnect ----------------------------------------------------------------------------------


def last_message_id(socket: Socket) -> int:
    """The highest message id a socket has seen: ``last_id`` of its ``chat.history`` and the
    ids of the messages in it and pushed since."""
    last = 0
    for _, raw in socket.frames:
        frame = parse_frame(raw)
        if frame is None:
            continue
        if frame.get("type") == "chat.history":
            ids = [m.get("id", 0) for m in frame.get("messages", [])]
            last = max([last, int(frame.get("last_id") or 0), *ids])
        elif frame.get("type") == "chat.message":
            last = max(last, int(frame.get("message", {}).get("id", 0)))
    return last


def received_articles(socket: Socket) -> Counter[int]:
    """Articles in a socket's frames (in ``chat.history`` and pushed), counted; a message that
    names no article counts under minus its message id."""
    got: Counter[int] = Counter()
    for _, raw in socket.frames:
        frame = parse_frame(raw)
        if frame is None:
            continue
        if frame.get("type") == "chat.history":
            messages = list(frame.get("messages", []))
        elif frame.get("type") == "chat.message":
            messages = [frame.get("message", {})]
        else:
            continue
        for message in messages:
            article = payloads.article_of(str(message.get("content", "")))
            got[article if article is not None else -int(message.get("id", 0))] += 1
    return got


@scenario(
    "reconnect",
    "the open sockets dropped (TCP aborted, no close handshake), one webhook per device while "
    "they are away, then every device reconnects with ?after=<last id> spread over "
    "--reconnect-secs: does each get exactly the messages it missed?",
    references=False,
)
async def reconnect(ctx: Context) -> Result:
    args = ctx.args
    result = Result("reconnect")
    if not ctx.fleet.ready:
        await open_devices(ctx, args.sockets)
    last = {socket.device: last_message_id(socket) for socket in ctx.fleet.ready}
    devices = sorted(last)
    dropped = ctx.fleet.drop()
    result.add("sockets dropped (TCP aborted)", dropped)

    # While they are away: one webhook per device through the webhook view, all answered.
    deliveries = [ctx.pusher.delivery(device) for device in devices]
    away_started = time.perf_counter()
    sent = await ctx.pusher.send_all(deliveries, concurrency=args.concurrency)
    away_secs = time.perf_counter() - away_started
    errors = Counter(s.error or f"HTTP {s.status}" for s in sent if not s.ok)
    missed: dict[int, set[int]] = {device: set() for device in devices}
    for item in sent:
        if item.ok and item.outcome == "message":
            missed[item.delivery.device].add(item.delivery.article_id)
    result.add(
        "webhooks while away",
        f"{len(sent)} (1 per device, {args.concurrency} in flight, all answered after "
        f"{ms(away_secs)})",
    )
    result.add("webhook HTTP errors", sum(errors.values()))
    if errors:
        result.add("  error kinds", counted(errors))
        result.problems.append(f"{sum(errors.values())} webhooks failed")

    # Back: every device with ?after=<the last id it saw>, spread over --reconnect-secs.
    usage_before = await ctx.usage()
    rss_before = ctx.rss_kib()
    async with monitor.Sampler(ctx.probe, ctx.layer_prefix) as peaks:
        started = time.perf_counter()
        sockets = await ctx.fleet.open(
            ((device, device_id(device)) for device in devices),
            open_timeout=args.open_timeout,
            history_timeout=args.history_timeout,
            after=last,
            spread_secs=args.reconnect_secs,
        )
        finished = time.perf_counter()
        usage_after = await ctx.usage()
    # A short grace for live pushes and duplicates trailing the history.
    await asyncio.sleep(args.duplicate_grace)

    failures = Counter(s.failure for s in sockets if s.failure is not None)
    exact = missing = duplicated = extra = 0
    for socket in sockets:
        if socket.failure is not None:
            continue
        got = received_articles(socket)
        want = missed[socket.device]
        lacking = want - got.keys()
        doubled = any(count > 1 for count in got.values())
        others = got.keys() - want
        missing += bool(lacking)
        duplicated += doubled
        extra += bool(others)
        exact += not lacking and not doubled and not others
    reconnected = len(sockets) - sum(failures.values())
    result.add(
        "reconnects",
        f"{len(sockets)} with ?after=<last id>, spread over {args.reconnect_secs:g} s",
    )
    report_opening(
        result,
        sockets,
        failures,
        finished - started,
        noun="reconnect",
        done="time until all reconnected",
        first_frame="start to chat.history",
        reasons="  failure reasons",
    )
    result.add("devices with exactly the messages they missed", f"{exact} of {reconnected}")
    result.add("devices missing a message", missing)
    result.add("devices with a message twice", duplicated)
    result.add("devices also sent messages from before the drop", extra)
    if missing:
        result.problems.append(f"{missing} devices did not get every message they missed")
    if duplicated:
        result.problems.append(f"{duplicated} devices got a message twice")
    if extra:
        result.problems.append(f"{extra} devices got messages from before their ?after")
    cost = monitor.cost(usage_before, usage_after)
    result.add("CPU while reconnecting", cost.summary())
    result.add(
        "server CPU per reconnect", f"{1000 * cost.server_cpu_secs / max(1, len(sockets)):.1f} ms"
    )
    result.add(
        "server RSS before / after",
        f"{rss_before / 1024:.1f} MiB / {ctx.rss_kib() / 1024:.1f} MiB",
    )
    result.add(
        "peaks: server DB connections / server threads / layer queue",
        f"{peaks.db_connections} / {peaks.server_threads} / {peaks.layer_backlog}",
    )
    result.values.update(
        sockets=len(sockets),
        failed=sum(failures.values()),
        reconnect_secs=finished - started,
        reconnect_p99=percentile(
            [s.history_at - s.started_at for s in sockets if s.history_at is not None], 99
        ),
        exact=exact,
        not_exact=len(sockets) - exact,  # a failed reconnect got nothing it missed
        cpu_ms_per_reconnect=1000 * cost.server_cpu_secs / max(1, len(sockets)),
    )
    return result


async def hammer(
    requests: Sequence[tuple[str, dict[str, str]]], expected: int, secs: float, concurrency: int
) -> tuple[int, int, list[float]]:
    """GET each of ``requests`` (URL, headers) in turn from ``concurrency`` keep-alive clients
    for ``secs``: answers counted, answers with another status, latencies."""
    latencies: list[float] = []
    wrong = 0
    deadline = time.monotonic() + secs
    turns = itertools.cycle(requests)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal wrong
            while time.monotonic() < deadline:
                url, headers = next(turns)
                started = time.perf_counter()
                async with session.get(url, headers=headers) as answer:
                    await answer.read()
                    if answer.status != expected:
                        wrong += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies), wrong, latencies


async def ping(socket: Socket, timeout: float) -> float | None:
    """Send the protocol's ping frame and wait for its pong; seconds, None without one."""
    assert socket.connection is not None
    pong = socket.expect('{"type": "pong"')
    started = time.perf_counter()
    try:
        await socket.connection.send('{"type": "ping"}')
        return await asyncio.wait_for(pong, timeout) - started
    except Exception:
        return None
    finally:
        socket.watch = None


async def ping_all(sockets: list[Socket], timeout: float, in_flight: int) -> list[float | None]:
    """Ping every socket, at most ``in_flight`` unanswered at a time (pinging 10,000 sockets at
    once would measure a burst of 10,000 frames, not whether each socket is still there)."""
    slots = asyncio.Semaphore(in_flight)

    async def one(socket: Socket) -> float | None:
        async with slots:
            return await ping(socket, timeout)

    return await asyncio.gather(*(one(socket) for socket in sockets))


# --- helpers for the runner ---------------------------------------------------------------------


def server_log_problems(log_path: Path, limit: int = 8) -> tuple[int, list[str]]:
    """Warnings and errors the server logged, counted, with the first few distinct ones."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    flagged = [
        line
        for line in lines
        if any(level in line for level in (" WARNING ", " ERROR ", "Traceback"))
        or EXCEPTION_LINE.match(line)
    ]
    distinct: list[str] = []
    seen: set[str] = set()
    for line in flagged:
        key = " ".join(line.split()[2:])[:160]
        if key not in seen:
            seen.add(key)
            distinct.append(line[:240])
        if len(distinct) >= limit:
            break
    return len(flagged), distinct
