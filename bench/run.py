"""Load test of the chat server: ``.venv/bin/python bench/run.py [options]``.

Creates a fresh PostgreSQL database (``chatbench``), provisions a region and one chat per
device, starts one daphne process (``manage.py serve``; ``--processes N``: N of them) on the
machine's Redis under a prefix of this run, runs the scenarios from this process (the load
generator), prints a Markdown report and stops everything it started, also on Ctrl-C or an
error. With ``--reference`` it then runs the same scenarios against the reference servers
(stock Channels with default and with raised capacity, bare websockets + Redis pub/sub), one
after the other, and ends the report with one comparison table. Exits 1 when a connect of the
chat server failed or a push to it was lost or duplicated (the references' failures are
reported, not counted), 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and the server importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compare, monitor, report, stack, system, targets
from bench.scenarios import SCENARIOS, Context, Result, server_log_problems, warm_up

DEFAULT_SCENARIOS = ["connect", "burst"]
# File descriptors the generator needs besides one per socket (HTTP pool, Redis, PostgreSQL).
SPARE_FDS = 200
BASELINE_SECS = 3.0
QUIET_BUSY_PCT = 40.0
QUIET_SAMPLE_SECS = 3.0
FIXES = (
    "DJANGO_SETTINGS_MODULE=bench.server_settings",
    "BENCH_DB_POOL_MAX=40",
    "BENCH_SYNC_THREADS=8",
    "BENCH_LISTEN_BACKLOG=1024",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help=f"run these, in order (repeatable; default: {' '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--sockets", type=int, default=1000, help="devices with an open socket")
    parser.add_argument("--webhooks-per-device", type=int, default=2, help="burst: replies each")
    parser.add_argument(
        "--burst-devices",
        type=int,
        default=0,
        help="burst: to the first this many devices (default: all --sockets)",
    )
    parser.add_argument(
        "--connect-secs",
        type=float,
        default=0,
        help="connect: spread the connects evenly over this long, s (default: all at once)",
    )
    parser.add_argument(
        "--reconnect-secs",
        type=float,
        default=10,
        help="reconnect: spread the reconnects evenly over this long, s",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes (same Redis and database, ports of their own); sockets and "
        "webhooks are spread over them",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="then run the same scenarios (except rest and reconnect) against the reference "
        "servers: " + ", ".join(targets.REFERENCES.values()) + "; print a comparison table",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="burst: webhooks in flight")
    parser.add_argument("--rate", type=float, default=200, help="rate: webhooks per second")
    parser.add_argument("--rate-secs", type=float, default=30, help="rate: for this long, s")
    parser.add_argument("--floor-secs", type=float, default=10, help="floor: each part for, s")
    parser.add_argument("--idle-secs", type=float, default=30, help="idle: hold sockets, s")
    parser.add_argument("--rest-secs", type=float, default=10, help="rest: each target for, s")
    parser.add_argument("--open-timeout", type=float, default=10, help="handshake timeout, s")
    parser.add_argument(
        "--history-timeout", type=float, default=10, help="chat.history after the handshake, s"
    )
    parser.add_argument(
        "--drain-quiet",
        type=float,
        default=10,
        help="burst: give up after this long without a frame, s",
    )
    parser.add_argument(
        "--drain-limit", type=float, default=120, help="burst: wait at most this long for frames, s"
    )
    parser.add_argument(
        "--duplicate-grace",
        type=float,
        default=1.0,
        help="burst: keep listening after the last frame, s",
    )
    parser.add_argument(
        "--time-limit", type=float, default=900, help="scenarios of each server measured, s"
    )
    parser.add_argument("--database", default="chatbench", help="dropped and created fresh")
    parser.add_argument(
        "--db-connection-limit",
        type=int,
        default=80,
        help="connections the server may hold to it (the machine's PostgreSQL is shared)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of the (first) server process, the next ones follow (default: free ones)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the server (repeatable), e.g. CHANNEL_CAPACITY=100",
    )
    parser.add_argument(
        "--fixes",
        action="store_true",
        help="measure the server with the changes docs/performance.md recommends "
        "(bench/server_settings.py): " + " ".join(FIXES),
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the server with py-spy during each scenario (pip install -e '.[bench]')",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECS",
        help="first wait up to this long for the machine to be quiet (others' load below "
        f"{QUIET_BUSY_PCT:g}%% of one core over {QUIET_SAMPLE_SECS:g} s); the report says whether "
        "it was",
    )
    parser.add_argument(
        "--rev",
        help="run the server from a clean export of this commit (default: the working tree)",
    )
    parser.add_argument("--keep-db", action="store_true", help="keep the database afterwards")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    args.scenario = args.scenario or DEFAULT_SCENARIOS
    for item in args.server_env:
        if "=" not in item:
            parser.error(f"--server-env needs NAME=VALUE, not {item!r}")
    if not 1 <= args.sockets <= 50_000:
        parser.error("--sockets must be 1..50000")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be 1..1000")
    if not 1 <= args.processes <= 8:
        parser.error("--processes must be 1..8")
    if args.profile and args.processes > 1:
        parser.error("--profile records one server process: use it with --processes 1")
    return args


def progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def no_collections() -> Iterator[None]:
    """The generator's own garbage collector held off while a scenario measures. A full
    collection over thousands of sockets and their frames paused the generator for 300-400 ms,
    and every push arriving meanwhile was counted that much late."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def run_scenarios(
    args: argparse.Namespace,
    target: targets.Target,
    database: str,
    scenarios: list[str],
    profile: Path | None = None,
) -> list[Result]:
    probe = await monitor.Probe(target.pids, database).open()
    ctx = Context(args=args, target=target, database=database, probe=probe)
    fleet = target.fleet
    results: list[Result] = []
    try:
        await warm_up(ctx)
        results.append(await baseline(ctx))
        for name in scenarios:
            progress(f"{target.label}: scenario {name}: {SCENARIOS[name].description}")
            with profiled(profile, target.pids[0], name, gil=args.profile_gil), no_collections():
                result = await SCENARIOS[name].run(ctx)
            results.append(result)
            for problem in result.problems:
                progress(f"  problem: {problem}")
        rss_open = ctx.rss_kib()
        await fleet.close()
        await asyncio.sleep(1)
        if results:
            peak = sum(system.peak_rss_kib(pid) for pid in target.pids)
            results[-1].notes.append(
                f"server RSS {rss_open / 1024:.1f} MiB with the sockets open, "
                f"{ctx.rss_kib() / 1024:.1f} MiB 1 s after closing them all "
                f"(peak {peak / 1024:.1f} MiB)"
            )
    finally:
        await fleet.close()
        await probe.close()
    return results


@contextlib.contextmanager
def profiled(directory: Path | None, pid: int, name: str, *, gil: bool) -> Iterator[None]:
    """Sample the server's stacks with py-spy (collapsed stacks, one file per scenario)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{name}.txt"
    recorder = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--nonblocking",
            *(["--gil"] if gil else []),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
        progress(f"  server profile: {output}")


async def baseline(ctx: Context) -> Result:
    """The machine before any load: the server idle after its warm-up. On a shared machine,
    CPU used here is someone else's, and it competes with every scenario."""
    result = Result("baseline")
    before = await ctx.probe.usage()
    await asyncio.sleep(BASELINE_SECS)
    cost = monitor.cost(before, await ctx.probe.usage())
    result.add(f"CPU over {BASELINE_SECS:g} s with the server idle", cost.summary())
    result.add("server RSS idle (after warm-up)", f"{ctx.rss_kib() / 1024:.1f} MiB")
    result.add("server threads idle", sum(system.threads(pid) for pid in ctx.target.pids))
    return result


def machine_rows(server: stack.Server | None) -> list[tuple[str, object]]:
    return [
        ("CPU", system.cpu_model()),
        ("cores", os.cpu_count()),
        ("RAM", f"{system.ram_gib():.1f} GiB"),
        ("kernel", system.kernel()),
        (
            "open files limit (generator / server)",
            f"{system.open_files_limit()} / "
            f"{system.open_files_limit(server.pid) if server and server.alive() else 'n/a'}",
        ),
        (
            "processes",
            "server and generator on the same machine; 127.0.0.1 only; Redis and PostgreSQL "
            "shared with the machine",
        ),
    ]


def version_rows(database: stack.Database, rev: str | None) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = list(system.package_versions().items())
    rows.append(("server code", server_code_version(rev)))
    rows.append(("redis-server", stack.redis_server_version()))
    rows.append(("PostgreSQL", database.server_version()))
    return rows


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=stack.ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout


def server_code_version(rev: str | None) -> str:
    """The commit the server ran from, and whether its code had uncommitted changes."""
    try:
        if rev is not None:
            return f"{_git('rev-parse', '--short', rev).strip()} (exported, clean)"
        head = _git("rev-parse", "--short", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--", "chatserver", "consumers", "manage.py")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = len(dirty.splitlines())
    return f"{head} + uncommitted changes in {changed} files (working tree)" if changed else head


def settings_rows(
    args: argparse.Namespace,
    settings: dict[str, Any],
    database: stack.Database,
    server: stack.Server,
    prefix: str,
) -> list[tuple[str, object]]:
    processes = (
        "1 daphne process"
        if args.processes == 1
        else f"{args.processes} daphne processes (ports from {server.port}; device i's socket on "
        "process i mod N; each webhook to a process picked per article, independent of that)"
    )
    return [
        ("server", f"{processes}: manage.py serve (no worker, no bot)"),
        ("channel layer", f"{settings['layer']} on redis://127.0.0.1:6379/0, prefix {prefix}"),
        ("CHANNEL_CAPACITY", settings["capacity"]),
        ("REDIS_MAX_CONNECTIONS", settings["redis_max_connections"]),
        ("layer expiry / group expiry", f"{settings['expiry']} s / {settings['group_expiry']} s"),
        (
            "database",
            f"PostgreSQL {database.name}, CONN_MAX_AGE {settings['conn_max_age']}, "
            f"connection limit {database.connection_limit} "
            f"(server's max_connections {database.max_connections()}, shared)",
        ),
        ("database pool", settings["pool"] or "none"),
        ("threads for the request path's database calls", settings["consumer_db_threads"]),
        ("server listen backlog", system.listen_backlog(server.port)),
        ("CHAT_RATE_LIMITS_ENABLED", settings["rate_limits"]),
        ("LOG_LEVEL", settings["log_level"]),
        ("WS_PING_INTERVAL_SECS", settings["ping_interval"]),
        (
            "extra server environment",
            " ".join([*(FIXES if args.fixes else ()), *args.server_env]) or "none",
        ),
        (
            "sockets / burst devices / webhooks per device / in flight",
            f"{args.sockets} / {min(args.burst_devices or args.sockets, args.sockets)} / "
            f"{args.webhooks_per_device} / {args.concurrency}",
        ),
        ("timeouts: handshake / history", f"{args.open_timeout:g} s / {args.history_timeout:g} s"),
        (
            "generator",
            "this process: asyncio, websockets (no compression, no client pings), aiohttp",
        ),
    ]


def wait_until_quiet(limit_secs: float) -> str:
    """On a shared machine, others' builds and tests take CPU from both ends of the benchmark."""
    deadline = time.monotonic() + limit_secs
    while True:
        before = system.MachineCpu.read()
        time.sleep(QUIET_SAMPLE_SECS)
        busy = 100 * (system.MachineCpu.read().busy_secs - before.busy_secs) / QUIET_SAMPLE_SECS
        if busy < QUIET_BUSY_PCT:
            return f"quiet ({busy:.0f}% busy) when the run began"
        if time.monotonic() > deadline:
            return f"not quiet after waiting {limit_secs:g} s ({busy:.0f}% busy)"
        progress(f"waiting for a quiet machine ({busy:.0f}% busy)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, entry in SCENARIOS.items():
            print(f"{name:12} {entry.description}")
        return 0
    # Ctrl-C and SIGTERM both end the run through the same clean-up, even when started from a
    # shell that had SIGINT ignored for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    limit = system.raise_open_files_limit()
    if args.sockets + args.concurrency + SPARE_FDS > limit:
        progress(f"{args.sockets} sockets need more open files than the limit of {limit}")
        return 2
    prefix = stack.new_prefix()
    keys = stack.Secrets()
    database = stack.Database(args.database, args.db_connection_limit)
    workdir = Path(tempfile.mkdtemp(prefix="chatbench-"))
    overrides = dict(
        item.split("=", 1) for item in (*(FIXES if args.fixes else ()), *args.server_env)
    )
    servers: list[stack.Server] = []
    results: list[Result] = []
    references: list[report.Section] = []
    rows: dict[str, list[tuple[str, object]]] = {}
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else "not checked"
    try:
        progress(f"creating database {database.name}, migrating, {args.sockets} chats")
        database.create()
        env = stack.server_env(database, prefix, overrides)
        tree = stack.source_tree(args.rev, workdir)
        settings = stack.provision(env, tree, keys, args.sockets)
        ports = _ports(args.port, args.processes)
        for number, port in enumerate(ports):
            log = workdir / ("server.log" if number == 0 else f"server-{number}.log")
            progress(f"starting the server on 127.0.0.1:{port} (log: {log})")
            servers.append(stack.Server(env, tree, port, log))
            servers[-1].start()
        rows["machine"] = [*machine_rows(servers[0]), ("machine before the run", quiet)]
        rows["versions"] = version_rows(database, args.rev)
        rows["settings"] = settings_rows(args, settings, database, servers[0], prefix)
        target = targets.chat_server_target(servers, keys, args.sockets, prefix)
        results = asyncio.run(
            asyncio.wait_for(
                run_scenarios(args, target, database.name, args.scenario, args.profile),
                args.time_limit,
            )
        )
        if args.reference:
            # The chat server stops first: the references get the machine to themselves.
            for server in servers:
                server.stop()
            references = [
                run_reference(args, key, database.name, workdir) for key in targets.REFERENCES
            ]
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except TimeoutError:
        progress(f"the run took longer than --time-limit {args.time_limit:g} s")
        return 2
    except Exception:
        progress(f"the run failed:\n{traceback.format_exc()}")
        for server in servers:
            progress(f"server log tail ({server.log_path.name}):\n{server.log_tail()}")
        return 2
    finally:
        progress("stopping the server, removing the layer's keys and the database")
        for server in servers:
            server.stop()
        stack.delete_layer_keys(prefix)
        if not args.keep_db:
            database.drop()
    own = report.Section(targets.server_label(args.processes), [], results)
    text = report.render(
        machine=rows["machine"],
        versions=rows["versions"],
        settings=rows["settings"],
        results=results,
        server_log=_log_problems(servers),
        command=shlex.join(["bench/run", *(argv if argv is not None else sys.argv[1:])]),
        references=references,
        comparison=compare.table(args, [own, *references]) if results else None,
    )
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if any(result.problems for result in results) else 0


def run_reference(
    args: argparse.Namespace, key: str, database: str, workdir: Path
) -> report.Section:
    """Start one reference server, run the scenarios that apply to it, stop it and delete its
    Redis keys. A reference that fails is reported, not fatal: the chat server's figures stand."""
    label = targets.REFERENCES[key]
    scenarios = [name for name in args.scenario if SCENARIOS[name].references]
    target: targets.Target | None = None
    try:
        port = _ports(0, 1)[0]
        progress(f"starting the reference {label} on 127.0.0.1:{port}")
        target = targets.start_reference(key, port, workdir)
        results = asyncio.run(
            asyncio.wait_for(run_scenarios(args, target, database, scenarios), args.time_limit)
        )
        return report.Section(label, target.settings, results, _log_problems(target.servers))
    except Exception as error:
        reason = (
            f"took longer than --time-limit {args.time_limit:g} s"
            if isinstance(error, TimeoutError)
            else f"failed: {type(error).__name__}: {error}"
        )
        progress(f"the reference {label} {reason}")
        if target is not None:
            for server in target.servers:
                progress(f"its log tail:\n{server.log_tail()}")
        return report.Section(label, [], [], error=reason)
    finally:
        if target is not None:
            target.stop()
            stack.delete_layer_keys(target.layer_prefix)


def _log_problems(servers: list[stack.Server]) -> tuple[int, list[str]]:
    count, lines = 0, []
    for server in servers:
        more, distinct = server_log_problems(server.log_path)
        count += more
        lines += distinct
    return count, lines[:8]


def _ports(first: int, count: int) -> list[int]:
    if first:
        return [first + number for number in range(count)]
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _free_port() -> int:
    from chatserver.fakes.base import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
