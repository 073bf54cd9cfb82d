"""Figures of the fault and abuse suite (tests/test_abuse.py), printed at the end of the run.

The tests record what they tried and what came out (``FIGURES``); a pytest plugin registered in
tests/conftest.py prints them as the terminal summary section "fault and abuse suite" whenever
any test of the suite ran. The tests assert lost == doubled == HTTP 500s == 0 themselves; the
summary shows the totals behind those assertions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SECTION = "fault and abuse suite"


@dataclass
class Memory:
    label: str
    before_kib: int
    after_kib: int
    bound_kib: int
    warmup_kib: int | None = None

    def line(self) -> str:
        delta = (self.after_kib - self.before_kib) / 1024
        text = (
            f"{self.label}: before {self.before_kib / 1024:.1f} MiB, "
            f"after {self.after_kib / 1024:.1f} MiB ({delta:+.1f} MiB, "
            f"bound +{self.bound_kib / 1024:.0f} MiB)"
        )
        if self.warmup_kib is not None:
            text += f"; at start {self.warmup_kib / 1024:.1f} MiB, before warm-up"
        return text


@dataclass
class Figures:
    tests: int = 0
    inputs: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    doubled: int = 0
    http_statuses: Counter[int] = field(default_factory=Counter)
    socket_closes: Counter[int] = field(default_factory=Counter)
    memory: list[Memory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def tried(self, kind: str, count: int = 1) -> None:
        """Inputs fed to the server (malformed frames and bodies, unicode cases)."""
        self.inputs[kind] += count

    def sent_messages(self, route: str, count: int = 1) -> None:
        self.sent[route] += count

    def received_messages(self, where: str, count: int = 1) -> None:
        self.received[where] += count

    def http(self, status: int) -> int:
        self.http_statuses[status] += 1
        return status

    def closed(self, code: int) -> None:
        self.socket_closes[code] += 1

    def outcome(self, *, lost: int, doubled: int) -> None:
        self.lost += lost
        self.doubled += doubled

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def http_500s(self) -> int:
        return sum(
            count for status, count in self.http_statuses.items() if status >= 500 and status != 503
        )

    def lines(self) -> list[str]:
        answers = sum(self.http_statuses.values())
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.http_statuses.items()))
        lines = [
            f"tests run           {self.tests}",
            f"inputs tried        {sum(self.inputs.values())}  ({_breakdown(self.inputs)})",
            f"messages sent       {sum(self.sent.values())}  ({_breakdown(self.sent)})",
            f"messages received   {sum(self.received.values())}  ({_breakdown(self.received)})",
            f"lost                {self.lost}",
            f"doubled             {self.doubled}",
            f"HTTP 500s           {self.http_500s}  (of {answers} HTTP answers: {statuses})",
        ]
        if self.socket_closes:
            closes = ", ".join(f"{c}: {n}" for c, n in sorted(self.socket_closes.items()))
            lines.append(f"socket close codes  {closes}")
        lines.extend(f"memory              {memory.line()}" for memory in self.memory)
        lines.extend(f"- {note}" for note in self.notes)
        return lines


def _breakdown(counter: Counter[str]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counter.items())) or "none"


FIGURES = Figures()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if FIGURES.tests == 0:
        return
    terminalreporter.section(SECTION)
    for line in FIGURES.lines():
        terminalreporter.write_line(line)
