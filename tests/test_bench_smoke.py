"""The benchmarks still run: each at tiny sizes, checking only completion and correctness.

Timing figures are never asserted here; bench/RESULTS.md records them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pgkit import base_url, require_postgres
from sandboxkit import require_sandbox

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_benchmark(script: str, *args: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, str(BENCH / script), *args],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    figures: dict[str, object] = json.loads(line)
    return figures


@pytest.mark.timeout(300)
def test_scheduler_benchmark_runs_and_every_client_gets_its_own_result() -> None:
    figures = run_benchmark("scheduler.py", "--bots", "2", "--clients", "3", "--actions", "40")
    assert figures["completed"] == 40
    assert figures["errors"] == 0 and figures["wrong_results"] == 0


@pytest.mark.timeout(300)
async def test_replicas_benchmark_runs_and_every_client_gets_its_own_result() -> None:
    await require_postgres()
    figures = await asyncio.to_thread(
        run_benchmark, "replicas.py", "--replicas", "2", "--bots", "2", "--clients", "3",
        "--actions", "30", "--database", base_url())
    assert figures["completed"] == 30 and figures["replicas"] == 2
    assert figures["errors"] == 0 and figures["wrong_results"] == 0


@pytest.mark.timeout(300)
def test_bots_held_benchmark_runs_with_every_session_healthy() -> None:
    figures = run_benchmark("bots_held.py", "--bots", "20", "--probes", "5",
                            "--processes", "1", "--max-seconds", "60")
    assert figures["healthy"] is True and figures["parked"] == 20
    assert figures["probes"] == 5


@pytest.mark.timeout(300)
def test_cas_benchmark_runs() -> None:
    figures = run_benchmark("cas.py", "--sizes", "1KiB,2MiB", "--repeat", "1",
                            "--small-blobs", "300", "--batch", "100")
    assert {"write_2MiB_MBps", "read_2MiB_MBps", "batch_update_300_blobs_s"} <= set(figures)


@pytest.mark.timeout(300)
def test_fuzz_benchmark_runs_without_problems() -> None:
    figures = run_benchmark("fuzz.py", "--requests", "300", "--seed", "1")
    assert figures["problems"] == 0 and figures["server_alive"] is True
    assert figures["stored_data_intact"] is True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["--secure", "--tls-only"])
def test_scheduler_benchmark_runs_over_tls(mode: str) -> None:
    figures = run_benchmark("scheduler.py", "--bots", "2", "--clients", "2", "--actions", "20",
                            mode)
    assert figures["secure"] == {"--secure": "tls+token", "--tls-only": "tls"}[mode]
    assert figures["completed"] == 20
    assert figures["errors"] == 0 and figures["wrong_results"] == 0


@pytest.mark.timeout(300)
def test_sandbox_benchmark_runs_both_modes() -> None:
    require_sandbox()
    figures = run_benchmark("sandbox.py", "--actions", "5", "--rounds", "1")
    assert isinstance(figures["bwrap_execution_ms"], float)
    assert isinstance(figures["none_execution_ms"], float)


@pytest.mark.timeout(300)
def test_scheduler_benchmark_runs_with_metrics_on() -> None:
    figures = run_benchmark("scheduler.py", "--bots", "2", "--clients", "2", "--actions", "20",
                            "--metrics")
    assert figures["completed"] == 20
    assert figures["errors"] == 0 and figures["wrong_results"] == 0


@pytest.mark.timeout(300)
def test_fairness_benchmark_runs_both_ways() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "fairness.py"), "--bots", "2", "--big", "30",
         "--small", "4", "--duration", "0.01", "--delay", "0.1"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [run["fair_builds"] for run in runs] == [True, False]  # (results are checked)
    core = run_benchmark("fairness.py", "--core", "300")
    assert core["actions"] == 300
    picks = run_benchmark("fairness.py", "--selection", "3000", "--groups", "30")
    assert picks["order"] == "fair"


@pytest.mark.timeout(300)
async def test_fairness_claim_benchmark_runs() -> None:
    await require_postgres()
    figures = await asyncio.to_thread(run_benchmark, "fairness.py", "--selection", "2000",
                                      "--groups", "20", "--postgres", base_url())
    assert figures["order"] == "fair" and figures["queued"] == 2000
