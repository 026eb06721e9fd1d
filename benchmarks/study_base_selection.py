"""How often does the chosen base transform repeat across search seeds, and at what cost?

Runs only the base stage of a search (every `kind == "base"` task, in plan order, in this
process) for several `search.seed` values and base-selection settings, and writes per run: the
chosen transform, whether it is separated from the runner-up beyond its uncertainty, the
candidate-epochs and worker-seconds. Then, per setting: how often the most frequent choice was
chosen (the repeatability), and the mean cost.

    .venv/bin/python benchmarks/study_base_selection.py --seeds 0 1 2 3 4 \
        --out docs/results/base-selection-smoke

Settings compared: the paper's exhaustive stage (one seed), successive halving (eta 2, one
seed), and successive halving with 2 seeds on the last rung. The config is
examples/search-smoke.yaml (digits, 15 candidates, 2 base epochs) unless --config says otherwise.
Seconds depend on the machine's load (recorded); candidate-epochs do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, list[str]] = {
    "exhaustive": ["search.base_selection.method=exhaustive"],
    "halving": ["search.base_selection.method=successive_halving"],
    "halving+2seeds": [
        "search.base_selection.method=successive_halving",
        "search.base_selection.seeds=2",
    ],
}


def run_base_stage(config: Path, overrides: list[str], root: Path) -> dict[str, Any]:
    """Run every base task of the search in this process; the choice and its cost."""
    from selfaugment.trainer.config import load_config
    from selfaugment.trainer.search.base_selection import describe_separation, final_scores
    from selfaugment.trainer.search.base_selection import separation as separated
    from selfaugment.trainer.search.planner import all_tasks
    from selfaugment.trainer.search.report import _base_selection
    from selfaugment.trainer.search.tasks import run_task
    from selfaugment.trainer.spec import AugmentSearchSpec
    from selfaugment.trainer.store import open_store
    from selfaugment.trainer.store.layout import prepare_run

    spec = load_config(AugmentSearchSpec, config, overrides)
    store = open_store(root)
    prepare_run(store, spec)
    results = {task.id: run_task(store, task.id) for task in all_tasks(spec) if task.kind == "base"}
    scores = final_scores(spec, results)
    verdict = separated(scores)
    cost = _base_selection(spec, results)
    return {
        "chosen": scores[0].transform,
        "final": [score.to_dict() for score in scores],
        "separated": bool(verdict and verdict["separated"]),
        "verdict": describe_separation(verdict),
        "candidate_epochs": cost["epochs_trained"],
        "exhaustive_epochs": cost["epochs_exhaustive"],
        "worker_seconds": cost["worker_seconds"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    choices = Counter(run["chosen"] for run in runs)
    top, count = choices.most_common(1)[0]
    return {
        "choices": dict(choices),
        "most_frequent": top,
        "repeatability": count / len(runs),
        "separated_runs": sum(run["separated"] for run in runs),
        "mean_candidate_epochs": sum(r["candidate_epochs"] for r in runs) / len(runs),
        "mean_worker_seconds": sum(r["worker_seconds"] for r in runs) / len(runs),
    }


def markdown(study: dict[str, Any]) -> str:
    lines = [
        "# Base selection: repeatability across search seeds, and cost",
        "",
        f"Command: `{study['command']}`  ",
        f"Config: `{study['config']}`, search seeds {study['seeds']}; machine: {study['machine']}; "
        f"load average at start {study['load_start']}, at end {study['load_end']}.",
        "",
        "| setting | choices (seed: transform) | most frequent, share | separated runs | "
        "candidate-epochs (exhaustive) | worker-seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, setting in study["settings"].items():
        runs, summary = setting["runs"], setting["summary"]
        chosen = ", ".join(
            f"{seed}: {run['chosen']}" for seed, run in zip(study["seeds"], runs, strict=True)
        )
        lines.append(
            f"| {name} | {chosen} | {summary['most_frequent']}, "
            f"{100 * summary['repeatability']:.0f}% | {summary['separated_runs']}/{len(runs)} | "
            f"{summary['mean_candidate_epochs']:.0f} ({runs[0]['exhaustive_epochs']}) | "
            f"{summary['mean_worker_seconds']:.0f} |"
        )
    lines += ["", "Per run, the verdict on the winner:", ""]
    for name, setting in study["settings"].items():
        for seed, run in zip(study["seeds"], setting["runs"], strict=True):
            lines.append(f"- {name}, seed {seed}: {run['verdict']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "search-smoke.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, help="folder for study.json and README.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("SELFAUGMENT_THREADS", "1")))
    study: dict[str, Any] = {
        "command": "python benchmarks/study_base_selection.py "
        + " ".join(["--seeds", *map(str, args.seeds), "--settings", *args.settings]),
        "config": str(args.config.relative_to(REPO))
        if args.config.is_relative_to(REPO)
        else str(args.config),
        "seeds": args.seeds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "load_start": round(os.getloadavg()[0], 2),
        "settings": {},
    }
    started = time.time()
    for name in args.settings:
        runs = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as folder:
                overrides = [*SETTINGS[name], f"search.seed={seed}"]
                run = run_base_stage(args.config, overrides, Path(folder) / "run")
            print(f"{name} seed {seed}: {run['chosen']} ({run['verdict']})", flush=True)
            runs.append(run)
        study["settings"][name] = {"runs": runs, "summary": summarise(runs)}
    study["load_end"] = round(os.getloadavg()[0], 2)
    study["seconds"] = round(time.time() - started, 1)
    text = markdown(study)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
        (args.out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
