"""The local runner's processes: workers die with their runner however it stops, and one run
holds a store at a time. Real `selfaugment search` processes on a tiny digits search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SELFAUGMENT = Path(sys.executable).parent / "selfaugment"


def _spec(path: Path) -> Path:
    raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    raw["dataset"]["limit"] = 512
    raw["search"].update(baseEpochs=200, folds=2)  # base workers run for minutes
    raw["parallelism"]["maxWorkers"] = 2
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _start(spec: Path, run: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen(
            [str(SELFAUGMENT), "search", "-f", str(spec), "-o", str(run), "--workers", "2"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SELFAUGMENT_THREADS": "1"},
        )


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_die_with_their_runner(
    tmp_path: Path, stop: signal.Signals, worker_pids: Callable[[Path], list[int]]
) -> None:
    spec, run = _spec(tmp_path / "search.yaml"), tmp_path / "run"
    runner = _start(spec, run, tmp_path / "runner.log")
    try:
        workers = _wait("two workers", lambda: len(worker_pids(run)) == 2 and worker_pids(run))
        runner.send_signal(stop)
        runner.wait(30)
        _wait("the workers to exit", lambda: not worker_pids(run), 20)
        assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in workers)
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in worker_pids(run):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_one_run_per_store_names_the_holder(
    tmp_path: Path, worker_pids: Callable[[Path], list[int]]
) -> None:
    spec, run = _spec(tmp_path / "search.yaml"), tmp_path / "run"
    first = _start(spec, run, tmp_path / "first.log")
    try:
        _wait("the first run's workers", lambda: worker_pids(run))
        second = subprocess.run(
            [str(SELFAUGMENT), "search", "-f", str(spec), "-o", str(run)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "is in use" in second.stderr
        assert len(worker_pids(run)) == 2  # the second run started none
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    # once the holder is gone, the store is free again (a stale lock never blocks a resume)
    again = _start(spec, run, tmp_path / "again.log")
    try:
        _wait("the resumed run's workers", lambda: worker_pids(run))
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
