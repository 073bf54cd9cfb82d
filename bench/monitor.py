"""What a phase of load cost, and who paid: CPU of the server, the generator, Redis and the whole
machine; Redis commands; PostgreSQL sessions; the channel layer's backlog, sampled while it runs.

CPU is given in percent of one core over the phase's wall time (200% = both cores of a 2-core
machine busy). "rest" is the machine's busy time not accounted to the server, the generator or
Redis: PostgreSQL, the kernel's interrupt work, anything else running. The server's figure is
split once more: "event loop" is its main thread (daphne, Django's request handling, the
consumers, the channel layer, the reads of polls); the remainder is its database threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from redis import asyncio as aioredis

from bench import system
from bench.stack import POSTGRES_ADMIN_URL, REDIS_URL

SAMPLE_INTERVAL_SECS = 0.1


@dataclass(frozen=True)
class Usage:
    wall: float
    server: float
    server_loop: float  # the server's main threads: the event loop
    generator: float
    redis: float
    postgres: float
    machine: system.MachineCpu


@dataclass(frozen=True)
class Cost:
    wall_secs: float
    server_pct: float
    server_loop_pct: float
    generator_pct: float
    redis_pct: float
    postgres_pct: float
    machine_pct: float
    server_cpu_secs: float

    @property
    def rest_pct(self) -> float:
        known = self.server_pct + self.generator_pct + self.redis_pct + self.postgres_pct
        return max(0.0, self.machine_pct - known)

    def summary(self) -> str:
        return (
            f"server {self.server_pct:.0f}% (event loop {self.server_loop_pct:.0f}%), "
            f"generator {self.generator_pct:.0f}%, "
            f"Redis {self.redis_pct:.0f}%, PostgreSQL {self.postgres_pct:.0f}%, "
            f"other {self.rest_pct:.0f}% (machine {self.machine_pct:.0f}% "
            f"of {100 * (os.cpu_count() or 1)}%)"
        )


def cost(before: Usage, after: Usage) -> Cost:
    wall = max(after.wall - before.wall, 1e-9)

    def pct(secs: float) -> float:
        return 100 * secs / wall

    return Cost(
        wall_secs=wall,
        server_pct=pct(after.server - before.server),
        server_loop_pct=pct(after.server_loop - before.server_loop),
        generator_pct=pct(after.generator - before.generator),
        redis_pct=pct(after.redis - before.redis),
        postgres_pct=pct(after.postgres - before.postgres),
        machine_pct=pct(after.machine.busy_secs - before.machine.busy_secs),
        server_cpu_secs=after.server - before.server,
    )


class Probe:
    """The server processes' CPU (summed), and connections of the generator's own to Redis and
    PostgreSQL (as superuser, outside the benchmark database's connection limit), opened before
    any load so that reading figures never competes with the server for a connection."""

    def __init__(self, server_pids: list[int], database: str) -> None:
        self.server_pids = server_pids
        self.database = database
        self.redis = aioredis.Redis.from_url(REDIS_URL)
        self._pg: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def open(self) -> Probe:
        self._pg = await psycopg.AsyncConnection.connect(POSTGRES_ADMIN_URL, autocommit=True)
        return self

    async def close(self) -> None:
        await self.redis.aclose()
        if self._pg is not None:
            await self._pg.close()

    async def _one(self, sql: str, *params: object) -> object:
        assert self._pg is not None
        cursor = await self._pg.execute(sql, params)
        row = await cursor.fetchone()
        return row[0] if row else None

    async def usage(self) -> Usage:
        info = await self.redis.info("cpu")
        return Usage(
            wall=time.perf_counter(),
            server=sum(system.process_cpu_secs(pid) for pid in self.server_pids),
            server_loop=sum(system.main_thread_cpu_secs(pid) for pid in self.server_pids),
            generator=system.self_cpu_secs(),
            redis=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            postgres=system.postgres_cpu_secs(),
            machine=system.MachineCpu.read(),
        )

    async def redis_commands(self) -> Counter[str]:
        stats = await self.redis.info("commandstats")
        return Counter(
            {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
        )

    async def pg_sessions(self) -> int:
        """Sessions ever opened to the benchmark database (pg_stat_database, PostgreSQL 14+)."""
        value = await self._one(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", self.database
        )
        return int(str(value or 0))

    async def pg_connections(self) -> int:
        value = await self._one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", self.database
        )
        return int(str(value or 0))


@dataclass
class Peaks:
    db_connections: int = 0
    server_threads: int = 0
    layer_backlog: int = 0
    samples: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def layer_queues(redis: aioredis.Redis, prefix: str, groups: int = 200) -> list[str]:
    """The Redis keys of the server processes' channel-layer queues.

    channels-redis keeps one queue (a sorted set) per server process for all of its sockets,
    "<prefix>specific.<process id>!", deleted while empty; the process ids are found in the
    members of the groups the sockets joined."""
    queues: set[str] = set()
    seen = 0
    async for key in redis.scan_iter(match=f"{prefix}:group:*", count=1000):
        for member in await redis.zrange(key, 0, -1):
            channel = member.decode() if isinstance(member, bytes) else str(member)
            queues.add(prefix + channel[: channel.index("!") + 1])
        seen += 1
        if seen >= groups:
            break
    return sorted(queues)


class Sampler:
    """Samples peaks while a phase runs: the server's PostgreSQL connections and threads, and
    the number of messages waiting in the server process's channel-layer queue in Redis."""

    def __init__(self, probe: Probe, layer_prefix: str) -> None:
        self.probe = probe
        self.layer_prefix = layer_prefix
        self.peaks = Peaks()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Peaks:
        queues = await layer_queues(self.probe.redis, self.layer_prefix)
        self._task = asyncio.create_task(self._run(queues))
        return self.peaks

    async def __aexit__(self, *exc: object) -> None:
        # Asked to stop, not cancelled: a cancel that landed inside a sample's PostgreSQL or
        # Redis call came back as an ordinary error, which the loop took for a failed sample
        # and went on, and the run waited for it forever (seen twice, at the end of a rate phase).
        assert self._task is not None
        self._stop.set()
        await self._task

    async def _run(self, queues: list[str]) -> None:
        peaks = self.peaks
        while not self._stop.is_set():
            peaks.samples += 1
            try:
                peaks.db_connections = max(peaks.db_connections, await self.probe.pg_connections())
                peaks.server_threads = max(
                    peaks.server_threads, sum(system.threads(p) for p in self.probe.server_pids)
                )
                backlog = sum([int(await self.probe.redis.zcard(key)) for key in queues])
                peaks.layer_backlog = max(peaks.layer_backlog, backlog)
            except Exception as error:  # a sample is best effort; the phase goes on
                peaks.errors[type(error).__name__] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SAMPLE_INTERVAL_SECS)
