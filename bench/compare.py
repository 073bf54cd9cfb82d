"""The summary table at the end of every report: one row per figure, one column per measured
server (this server; with ``--reference`` the references too), then issue 6's target and
whether this server meets it.

A reference's cell also gives its ratio to this server's figure (reference / this server), so
that figures from a noisy machine still compare: all columns ran in the same invocation, one
after the other, with the same sockets, pushes and generator.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.report import Section
from bench.scenarios import PINGS_IN_FLIGHT, Result


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    key: str
    unit: str  # "KiB", "ms", "s", "/s", "%", "count"
    target: str = ""
    meets: Callable[[float], bool] | None = None
    # The target holds for this size of load; a smaller run says so next to its verdict.
    full_size: Callable[[argparse.Namespace], bool] | None = None
    ratio: bool = True


def _burst_full(args: argparse.Namespace) -> bool:
    devices = int(min(args.burst_devices or args.sockets, args.sockets))
    return devices >= 2000 and devices * int(args.webhooks_per_device) >= 2000


def _rows(args: argparse.Namespace) -> list[Row]:
    burst_devices = min(args.burst_devices or args.sockets, args.sockets)
    burst = f"burst of {burst_devices * args.webhooks_per_device:,} to {burst_devices:,} devices"
    rate = f"{args.rate:g} pushes/s for {args.rate_secs:g} s, {args.sockets:,} sockets"
    sockets = f"{args.sockets:,} sockets"
    connecting = (
        f"{sockets} at once" if not args.connect_secs else f"{sockets} over {args.connect_secs:g} s"
    )
    return [
        Row(
            f"server memory per idle socket ({sockets})",
            "connect",
            "kib_per_socket",
            "KiB",
            "≤ 30 KB (29.3 KiB), 10,000 sockets",
            lambda v: v <= 30_000 / 1024,
            lambda a: a.sockets >= 10_000,
        ),
        Row(
            f"failed connects ({connecting})",
            "connect",
            "failed",
            "count",
            "0 of 10,000",
            lambda v: v == 0,
            lambda a: a.sockets >= 10_000,
            ratio=False,
        ),
        Row(f"time to all connected ({connecting})", "connect", "connect_secs", "s"),
        Row("server CPU per connect", "connect", "cpu_ms_per_connect", "ms"),
        Row(
            f"idle {args.idle_secs:g} s: sockets closed or not answering a ping",
            "idle",
            "idle_lost",
            "count",
            "0 (10,000 sockets)",
            lambda v: v == 0,
            lambda a: a.sockets >= 10_000,
            ratio=False,
        ),
        Row(f"idle: ping to pong p99 ({PINGS_IN_FLIGHT} in flight)", "idle", "ping_p99", "ms"),
        Row(
            f"{burst}: lost",
            "burst",
            "lost",
            "count",
            "0",
            lambda v: v == 0,
            _burst_full,
            ratio=False,
        ),
        Row(
            f"{burst}: duplicated",
            "burst",
            "duplicated",
            "count",
            "0",
            lambda v: v == 0,
            ratio=False,
        ),
        Row(f"{burst}: pushes delivered per s", "burst", "pushes_per_s", "/s"),
        Row(f"{burst}: push p50", "burst", "p50", "ms"),
        Row(f"{burst}: push p99", "burst", "p99", "ms"),
        Row(
            f"{burst}: time to all delivered",
            "burst",
            "all_delivered_secs",
            "s",
            "≤ 3 s",
            lambda v: v <= 3,
            _burst_full,
        ),
        Row(f"{burst}: server CPU per push", "burst", "cpu_ms_per_push", "ms"),
        Row(f"{rate}: achieved rate (answered)", "rate", "sent_per_s", "/s"),
        Row(
            f"{rate}: lost",
            "rate",
            "lost",
            "count",
            "0 (200/s, 5,000 sockets)",
            lambda v: v == 0,
            lambda a: a.sockets >= 5000 and a.rate >= 200,
            ratio=False,
        ),
        Row(
            f"{rate}: push p50",
            "rate",
            "p50",
            "ms",
            "≤ 5 ms",
            lambda v: v <= 0.005,
            lambda a: a.sockets >= 5000 and a.rate >= 200,
        ),
        Row(
            f"floor of a push p50 at {args.rate:g}/s: the medians of its HTTP request, durable "
            "commit and Redis hand-over, each measured alone, added up",
            "floor",
            "floor_p50",
            "ms",
            ratio=False,
        ),
        Row(
            f"{rate}: push p99",
            "rate",
            "p99",
            "ms",
            "≤ 30 ms",
            lambda v: v <= 0.030,
            lambda a: a.sockets >= 5000 and a.rate >= 200,
        ),
        Row(f"{rate}: server CPU per push", "rate", "cpu_ms_per_push", "ms"),
        Row(
            f"reconnect of {sockets} with ?after: failed",
            "reconnect",
            "failed",
            "count",
            "0",
            lambda v: v == 0,
            lambda a: a.sockets >= 5000,
            ratio=False,
        ),
        Row(
            f"reconnect of {sockets}: devices without exactly the missed messages "
            "(failed reconnects included)",
            "reconnect",
            "not_exact",
            "count",
            "0 (5,000 sockets reconnecting within 10 s)",
            lambda v: v == 0,
            lambda a: a.sockets >= 5000 and a.reconnect_secs <= 10,
            ratio=False,
        ),
        Row(
            f"reconnect of {sockets}: time until all reconnected "
            f"(spread over {args.reconnect_secs:g} s)",
            "reconnect",
            "reconnect_secs",
            "s",
        ),
        Row(
            f"reconnect of {sockets}: reconnect p99 (start to chat.history)",
            "reconnect",
            "reconnect_p99",
            "ms",
        ),
        Row("server CPU per reconnect", "reconnect", "cpu_ms_per_reconnect", "ms"),
        Row("REST: cheapest Django view (/healthz)", "rest", "cheapest_per_s", "/s"),
        Row(
            "REST: GET of a 20-message chat / cheapest view",
            "rest",
            "get_ratio",
            "%",
            "≥ 60 %",
            lambda v: v >= 0.6,
            ratio=False,
        ),
        Row(
            "REST: poll answered 304 / cheapest view",
            "rest",
            "poll_ratio",
            "%",
            "≥ 80 %",
            lambda v: v >= 0.8,
            ratio=False,
        ),
        Row(
            "REST: polls of every device's chat in turn, 304 / cheapest view",
            "rest",
            "every_chat_poll_ratio",
            "%",
            ratio=False,
        ),
    ]


def _value(results: Sequence[Result], scenario: str, key: str) -> float | None:
    for result in results:
        if result.name == scenario and key in result.values:
            return result.values[key]
    return None


def _format(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.0%}"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "KiB":
        return f"{value:.1f} KiB"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":  # values in ms already, or latencies in s
        return f"{value:.2f} ms" if value < 10 else f"{value:,.0f} ms"
    return f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"


def _cell(row: Row, value: float | None, own: float | None) -> str:
    if value is None:
        return "n/a"
    latencies = ("p50", "p99", "floor_p50", "ping_p99", "reconnect_p99")
    shown = value * 1000 if row.key in latencies else value
    text = _format(shown, row.unit)
    if row.ratio and own and value and own != value:
        text += f" (x{value / own:.2g})"
    return text


def table(args: argparse.Namespace, sections: Sequence[Section]) -> str:
    """Rows = figures, columns = this server (first section), the references, issue 6's
    target, met?"""
    own = sections[0]
    header = ["figure", *(s.label for s in sections), "issue-6 target", "met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _rows(args):
        values = [_value(section.results, row.scenario, row.key) for section in sections]
        if all(value is None for value in values):
            continue
        mine = values[0]
        cells = [
            _cell(row, value, None if index == 0 else mine) for index, value in enumerate(values)
        ]
        for index, section in enumerate(sections):
            missing = _value(section.results, row.scenario, "missing")
            if values[index] is None and row.key == "all_delivered_secs" and missing:
                cells[index] = f"never: {missing:,.0f} missing"
        verdict = ""
        ran = any(result.name == row.scenario for result in own.results)
        if row.meets is not None and ran:
            verdict = "yes" if mine is not None and row.meets(mine) else "**no**"
            if row.full_size is not None and not row.full_size(args):
                verdict += " (smaller load than the target's)"
        lines.append(
            "| "
            + " | ".join([row.label, *cells, row.target or "", verdict]).replace("\n", " ")
            + " |"
        )
    unmeasured = [s.label for s in sections if s.error]
    notes = (
        ["", f"(xN): the reference's figure divided by {own.label}'s, measured in the same run."]
        if len(sections) > 1
        else []
    )
    if unmeasured:
        notes.append(f"Not measured: {', '.join(unmeasured)} (see its section).")
    return "\n".join(lines + notes)
