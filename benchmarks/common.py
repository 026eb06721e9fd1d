"""What every benchmark here does the same way: interleaved repeats, the load, and --write.

- Baseline and candidates run in turns within each repeat (``interleaved``), so a change of
  load during the run hits all of them alike; the medians are compared, never runs made at
  different times.
- The load average is recorded at the start and at the end. The machines we share have 2 cores
  and other jobs: a figure measured while the load average exceeded the number of cores
  understates the speed of whatever uses more than one thread, by up to 50x.
- Results are printed; they are written (``results/<name>.json`` and ``.md``) only with
  ``--write``, and a file measured on a loaded machine says so in its first line and in its
  ``quiet`` field, so that it is not mistaken for a figure to commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--write`` and ``--out DIR`` (default: benchmarks/results)."""
    parser.add_argument(
        "--write", action="store_true", help="write the results (default: print them only)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for --write")


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


class Load:
    """The load average at the start of a benchmark and, after ``finish``, at its end."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.start = load_average()
        self.end: float | None = None
        self.own = 0.0

    def finish(self, own: float = 0.0) -> None:
        """Read the end load; `own`: the cores the benchmark's own helper processes kept busy
        on average (servers it started), which the end reading counts but are not other load."""
        self.end = load_average()
        self.own = max(0.0, own)

    @property
    def quiet(self) -> bool:
        """Neither reading exceeded the number of cores (the end one less the benchmark's own)."""
        return max(self.start, (self.end or 0.0) - self.own) <= self.cores

    def record(self) -> dict[str, Any]:
        return {
            "cores": self.cores,
            "load_average_start": round(self.start, 2),
            "load_average_end": None if self.end is None else round(self.end, 2),
            "own_processes_cores": round(self.own, 2),
            "quiet": self.quiet,
        }

    def line(self) -> str:
        end = "?" if self.end is None else f"{self.end:.2f}"
        if self.own:
            end += f" (of which {self.own:.2f} the benchmark's own servers)"
        verdict = "quiet" if self.quiet else "LOADED: the figures understate the speed"
        return f"load average {self.start:.2f} at the start, {end} at the end, {self.cores} cores ({verdict})"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command() -> str:
    return " ".join([".venv/bin/python", *sys.argv])


def timed(
    function: Callable[[], object], device: torch.device | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, CUDA work included."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Timings:
    """Seconds of each run in each repeat: wall clock, and CPU time of this process.

    For runs on one thread, CPU time is what a loaded machine distorts least (waiting for a
    core is not counted); for runs on several threads it counts the waiting threads' spinning
    too, so compare those by wall clock only.
    """

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None
) -> Timings:
    """Time each run in each repeat, the runs taking turns within every repeat."""
    timings = Timings({name: [] for name in runs}, {name: [] for name in runs})
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = timed(run, device)
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(
    out: Path, name: str, report: dict[str, Any], markdown: str, load: Load
) -> list[Path]:
    """``out/name.json`` and ``out/name.md``; a loaded run is marked in both."""
    report = {**report, "load": load.record()}
    if not load.quiet:
        markdown = (
            f"> **Not quiet**: {load.line()}. Do not commit these figures; rerun on a quiet "
            "machine.\n\n" + markdown
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths


def finish(
    args: argparse.Namespace, name: str, report: dict[str, Any], markdown: str, load: Load
) -> None:
    """Print the results; write them with --write (marked when the machine was loaded)."""
    print(markdown)
    if not load.quiet:
        print(f"warning: {load.line()}", file=sys.stderr)
    if args.write:
        for path in write_results(args.out, name, report, markdown, load):
            print(f"wrote {path}")
