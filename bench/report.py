"""The printed report: machine, versions, settings and each scenario's figures, as Markdown
tables that paste into docs/performance.md unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bench.scenarios import Result


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
    for result in results:
        parts += [
            "",
            f"## Scenario `{result.name}`",
            "",
            table(result.figures, ("figure", "value")),
        ]
        for note in result.notes:
            parts += ["", f"Note: {note}"]
    count, lines = server_log
    parts += ["", "## Server log", "", f"{count} warning/error lines."]
    if lines:
        parts += ["", "```", *lines, "```"]
    problems = [f"{result.name}: {problem}" for result in results for problem in result.problems]
    parts += ["", "## Verdict", ""]
    parts += [f"- FAIL {problem}" for problem in problems] or [
        "- PASS: no failed connect, no lost or duplicated push"
    ]
    return "\n".join(parts) + "\n"
