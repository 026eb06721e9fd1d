"""A whole local search with serving workers (the default) vs a fresh process per task.

    .venv/bin/python benchmarks/bench_workers.py [--config examples/search-smoke.yaml]
        [--repeats 2] [--workers N] [--write] [--out benchmarks/results]

Each repeat runs `selfaugment search` once each way, in turns (benchmarks/common.py), into a new
temporary folder: ``fresh`` (``--fresh-workers``: `selfaugment worker run` per task, what the
runner did before) and ``serving`` (`selfaugment worker serve`, trainer/search/serve.py).
Reported per way: the search's wall-clock seconds (medians), the worker-seconds its tasks
report (``seconds`` in each ``result.json``: from a task's start in its worker to its result,
so without the process start that serving saves too), the worker processes started, and
whether every run found the same policy. The compiled augmentation kernels are compiled and
cached before the first repeat, so no run pays numba's one-time compilation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

from selfaugment.trainer.policy import BatchAugmenter, load_policy

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"fresh": ["--fresh-workers"], "serving": []}


def warm_kernels() -> None:
    """Compile (or load) the augmentation kernels once, into the cache every worker reads."""
    augmenter = BatchAugmenter(load_policy(ROOT / "examples" / "mocov2-policy.json"))
    augmenter(torch.zeros((2, 1, 16, 16), dtype=torch.uint8))


def run_search(config: Path, way: str, workers: int | None) -> dict[str, Any]:
    """One search into a new folder: wall seconds, task seconds, tasks, workers, policy."""
    with tempfile.TemporaryDirectory(prefix=f"bench-workers-{way}-") as folder:
        run = Path(folder) / "run"
        command = [sys.executable, "-m", "selfaugment.cli", "search", "-f", str(config)]
        command += ["-o", str(run), "--no-progress", *WAYS[way]]
        if workers is not None:
            command += ["--workers", str(workers)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{way}: the search failed:\n{done.stderr[-3000:]}")
        results = [json.loads(path.read_text()) for path in run.glob("tasks/*/result.json")]
        serving_logs = list((run / "logs").glob("worker-*.log"))
        return {
            "wall_seconds": wall,
            "task_seconds": sum(float(result.get("seconds") or 0.0) for result in results),
            "tasks": len(results),
            "worker_processes": len(serving_logs) if serving_logs else len(results),
            "policy": (run / "policy.json").read_text(),
        }


def markdown(report: dict[str, Any], load: common.Load) -> str:
    fresh, serving = report["ways"]["fresh"], report["ways"]["serving"]
    lines = [
        "# A local search: serving workers vs a fresh process per task",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['processor']}, {load.cores} CPUs, torch "
        f"{report['machine']['torch']}, {load.line()}  ",
        f"Config: `{report['config']}`, {report['tasks']} tasks; medians of "
        f"{report['repeats']} interleaved repeats.",
        "",
        "| workers | search wall s | task worker-s | worker processes |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in WAYS:
        way = report["ways"][name]
        lines.append(
            f"| {name} | {way['wall_seconds']:.1f} | {way['task_seconds']:.1f} "
            f"| {way['worker_processes']:.0f} |"
        )
    lines += [
        "",
        f"Serving workers: {fresh['wall_seconds'] / serving['wall_seconds']:.2f}x less wall "
        f"time, {fresh['task_seconds'] / serving['task_seconds']:.2f}x fewer task "
        f"worker-seconds. Every run found the same policy: {report['same_policy']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "search-smoke.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="default: the config's")
    common.add_output_arguments(parser)
    args = parser.parse_args()
    warm_kernels()
    load = common.Load()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in WAYS}
    for _ in range(args.repeats):
        for name in WAYS:
            runs[name].append(run_search(args.config, name, args.workers))
    load.finish()
    ways = {
        name: {
            key: common.median([run[key] for run in done])
            for key in ("wall_seconds", "task_seconds", "worker_processes")
        }
        for name, done in runs.items()
    }
    policies = {run["policy"] for done in runs.values() for run in done}
    report = {
        "command": common.command(),
        "machine": common.machine(),
        "config": str(args.config.resolve().relative_to(ROOT)),
        "repeats": args.repeats,
        "tasks": runs["serving"][0]["tasks"],
        "ways": ways,
        "runs": {
            name: [{k: v for k, v in run.items() if k != "policy"} for run in done]
            for name, done in runs.items()
        },
        "same_policy": len(policies) == 1,
    }
    common.finish(args, "workers-cpu", report, markdown(report, load), load)


if __name__ == "__main__":
    main()
