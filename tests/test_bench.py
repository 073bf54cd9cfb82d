"""bench/run end to end at a tiny size: every scenario against this server, the references
against theirs, one report. Figures at this size mean nothing and are not checked; that the
benchmark still runs, and finds no push lost or doubled, is (docs/performance.md "Reproduce")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import skip_without_shared_services

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_bench_runs_every_scenario_here_and_on_the_references(tmp_path: Path) -> None:
    skip_without_shared_services()  # the bench starts its own database and Redis prefix there
    report = tmp_path / "report.md"
    # fmt: off
    command = [
        sys.executable, str(ROOT / "bench" / "run.py"),
        "--database", f"chatbench_test_{os.getpid()}", "--sockets", "20",
        "--scenario", "connect", "--scenario", "burst",
        "--scenario", "rate", "--rate", "20", "--rate-secs", "1",
        "--scenario", "floor", "--floor-secs", "0.5",
        "--scenario", "idle", "--idle-secs", "0.5",
        "--scenario", "rest", "--rest-secs", "0.5",
        "--scenario", "reconnect", "--reconnect-secs", "1",
        "--reference", "--output", str(report),
    ]
    # fmt: on
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert finished.returncode == 0, finished.stderr[-3000:]
    text = report.read_text()
    for scenario in ("connect", "burst", "rate", "floor", "idle", "rest", "reconnect"):
        assert f"## Scenario `{scenario}`" in text
    for reference in ("stock Channels (defaults)", "stock Channels (capacity 10,000)", "bare"):
        assert f"## Reference: {reference}" in text
    assert "## Comparison" in text
    assert "- PASS: no failed connect, no lost or duplicated push" in text
