"""The printed report: machine, versions, settings and each scenario's figures, as Markdown
tables that paste into docs/performance.md unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.scenarios import Result


@dataclass
class Section:
    """One measured server: its label, its own settings and its scenarios' results."""

    label: str
    settings: list[tuple[str, object]]
    results: list[Result]
    server_log: tuple[int, list[str]] = (0, [])
    error: str | None = None  # why it could not be measured


def table(rows: Iterable[tuple[str, object]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {label} | {str(value).replace('|', '/')} |" for label, value in rows]
    return "\n".join(lines)


def render(
    *,
    machine: Sequence[tuple[str, object]],
    versions: Sequence[tuple[str, object]],
    settings: Sequence[tuple[str, object]],
    results: Sequence[Result],
    server_log: tuple[int, list[str]],
    command: str,
    references: Sequence[Section] = (),
    comparison: str | None = None,
) -> str:
    parts = [
        "# Benchmark report",
        "",
        f"Command: `{command}`",
        "",
        "## Machine",
        "",
        table(machine, ("", "")),
        "",
        "## Versions",
        "",
        table(versions, ("component", "version")),
        "",
        "## Settings",
        "",
        table(settings, ("setting", "value")),
    ]
    parts += _scenarios(results, "##")
    parts += _log(server_log, "##")
    for section in references:
        parts += ["", f"## Reference: {section.label}", ""]
        if section.error:
            parts += [f"Not measured: {section.error}."]
            continue
        parts += [table(section.settings, ("setting", "value"))]
        parts += _scenarios(section.results, "###")
        parts += _log(section.server_log, "###")
        failures = [f"{r.name}: {problem}" for r in section.results for problem in r.problems]
        parts += ["", "Its failures (reported, not counted in the verdict):", ""]
        parts += [f"- {failure}" for failure in failures] or ["- none"]
    if comparison:
        title = "Comparison" if references else "Summary and issue 6 targets"
        parts += ["", f"## {title}", "", comparison]
    problems = [f"{result.name}: {problem}" for result in results for problem in result.problems]
    parts += ["", "## Verdict", ""]
    parts += [f"- FAIL {problem}" for problem in problems] or [
        "- PASS: no failed connect, no lost or duplicated push"
    ]
    return "\n".join(parts) + "\n"


def _scenarios(results: Sequence[Result], level: str) -> list[str]:
    parts: list[str] = []
    for result in results:
        parts += [
            "",
            f"{level} Scenario `{result.name}`",
            "",
            table(result.figures, ("figure", "value")),
        ]
        for note in result.notes:
            parts += ["", f"Note: {note}"]
    return parts


def _log(server_log: tuple[int, list[str]], level: str) -> list[str]:
    count, lines = server_log
    parts = ["", f"{level} Server log", "", f"{count} warning/error lines."]
    if lines:
        parts += ["", "```", *lines, "```"]
    return parts
