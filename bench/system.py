"""What the machine is and what each process costs: /proc readings, versions, open-file limits.

Everything here is read-only and Linux-only (the benchmark runs where the server runs).
"""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CLOCK_TICKS_PER_SEC = os.sysconf("SC_CLK_TCK")
PACKAGES = (
    "Django",
    "channels",
    "channels-redis",
    "redis",
    "daphne",
    "Twisted",
    "autobahn",
    "asgiref",
    "psycopg",
    "websockets",
    "aiohttp",
)


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.

    Also used as ``preexec_fn`` of the server process, so both ends can hold every socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_files_limit(pid: int | None = None) -> int | None:
    """The soft open-files limit of a process, as the kernel reports it."""
    path = Path(f"/proc/{pid or 'self'}/limits")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1024 * 1024)
    return 0.0


def kernel() -> str:
    return platform.release()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --- processes ----------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} for pid {pid}")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def threads(pid: int) -> int:
    return _status_kib(pid, "Threads")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_cpu_secs(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    return _cpu_secs(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_secs(pid: int) -> float:
    """User + system CPU seconds so far of a process's main thread (the server's event loop;
    its other threads are the database threads and the pools' workers)."""
    return _cpu_secs(Path(f"/proc/{pid}/task/{pid}/stat"))


def _cpu_secs(stat: Path) -> float:
    text = stat.read_text()
    # The command name may contain spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SEC


def self_cpu_secs() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class MachineCpu:
    busy_secs: float  # summed over all cores
    total_secs: float

    @staticmethod
    def read() -> MachineCpu:
        fields = [
            int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ]
        idle = fields[3] + fields[4]  # idle + iowait
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        return MachineCpu((total - idle) / CLOCK_TICKS_PER_SEC, total / CLOCK_TICKS_PER_SEC)


# --- TCP ----------------------------------------------------------------------------------------

LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent")


def tcp_counters(names: tuple[str, ...] = LISTEN_COUNTERS) -> dict[str, int]:
    """Kernel TCP counters (this network namespace), e.g. connections dropped because a
    listening socket's accept queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    counters: dict[str, int] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            counters = dict(zip(header.split()[1:], map(int, values.split()[1:]), strict=False))
    return {name: counters.get(name, 0) for name in names}


def listen_backlog(port: int) -> int | None:
    """The accept-queue size of the socket listening on ``port`` (``ss``'s Send-Q)."""
    import subprocess

    try:
        output = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "LISTEN":
            return int(fields[2])
    return None


def postgres_cpu_secs() -> float:
    """CPU seconds of the PostgreSQL server: its live processes, plus what the postmaster
    collected from backends that have exited (a backend per short-lived connection). All
    databases of the cluster count: on a shared server, others' queries are in it."""
    total = 0.0
    processes: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] != "postgres":
            continue
        fields = text[text.rindex(")") + 2 :].split()
        processes[int(entry.name)] = (int(fields[1]), fields)
    for ppid, fields in processes.values():
        total += int(fields[11]) + int(fields[12])
        if ppid not in processes:  # the postmaster: add its reaped children
            total += int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS_PER_SEC
