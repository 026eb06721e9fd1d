"""A search at lower cost, same policies? The paper's search against the cheaper settings.

For each search seed, runs whole searches with `selfaugment search` (separate processes,
same thread count) on the same data, and compares them paired by seed:

- `paper`: exhaustive base selection (every candidate trained `base_epochs`), every TPE
  candidate scored on all held-out images (the SelfAugment paper's Algorithm 1);
- `halving`: successive halving over the base candidates (eta 2), TPE candidates scored in full;
- `cheap`: successive halving over the base candidates (eta 2) and racing of the TPE
  candidates (search.racing).

Per run it records: the base transform chosen, the found policy's supervised linear accuracy
after the same retraining (`final.linear_accuracy` of the report: a linear head on the frozen
retrained backbone, trained on the training split and measured on `evaluation_dataset`),
the worker-seconds per stage, the candidate-epochs of the base stage and the held-out images
scored by the TPE stage (those two do not depend on the machine's load). Each finished run is
written to `<out>/per-run/<arm>-seed<k>.json` at once and skipped when the study is run again, so
the study can be spread over several sessions; the summary (`study.json`, `README.md`) is
rewritten from whatever runs exist.

    .venv/bin/python benchmarks/study_search_cost.py --seeds 0 1 2 \
        --out docs/results/search-cost-fmnist

The config is examples/search-fashion-mnist.yaml as it is (`--scale example`) or reduced
(`--scale reduced`, the default of --out docs/results/search-cost-fmnist-reduced): see SCALES.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "search-fashion-mnist.yaml"

#: The study's scales. `example`: examples/search-fashion-mnist.yaml unchanged (8,000 training
#: images at 16 px, 2 base epochs, 3 folds of 6 epochs, 30 TPE trials per fold, 12 retraining
#: epochs, evaluated on 2,000 test images). `reduced`: 2,000 training images, base candidates
#: trained 4 epochs (so that successive halving has three rungs, 1, 2 and 4 epochs, as at the
#: paper's scale it has several), 2 folds of 4 epochs, 20 TPE trials per fold, 8 retraining epochs.
SCALES: dict[str, list[str]] = {
    "example": [],
    "reduced": [
        "dataset.limit=2000",
        "search.base_epochs=4",
        "search.folds=2",
        "search.fold_epochs=4",
        "search.trials=20",
        "search.startup_trials=8",
        "retrain.epochs=8",
    ],
}
ARMS: dict[str, list[str]] = {
    "paper": ["search.base_selection.method=exhaustive", "search.racing.enabled=false"],
    "halving": [
        "search.base_selection.method=successive_halving",
        "search.base_selection.eta=2",
        "search.racing.enabled=false",
    ],
    "cheap": [
        "search.base_selection.method=successive_halving",
        "search.base_selection.eta=2",
        "search.racing.enabled=true",
    ],
}
STAGES = ("base", "fold", "search", "merge", "retrain")


def run_search(arm: str, seed: int, work: Path, threads: int, scale: str) -> dict[str, Any]:
    """One whole search in its own process; the figures the study compares."""
    out = work / f"{scale}-{arm}-seed{seed}"
    overrides = [*SCALES[scale], *ARMS[arm], f"search.seed={seed}", "runtime.progress=false"]
    command = [sys.executable, "-m", "selfaugment.cli", "search", "-f", str(CONFIG), "-o", str(out)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    started = time.time()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    elapsed = time.time() - started
    report = json.loads((out / "report.json").read_text())
    stage_seconds = {stage: 0.0 for stage in STAGES}
    for task_id, seconds in report["task_seconds"].items():
        stage = task_id.split("-")[0]
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + float(seconds or 0.0)
    scored = in_full = 0
    for result_file in sorted((out / "tasks").glob("search-*/result.json")):
        racing = json.loads(result_file.read_text()).get("racing", {})
        scored += int(racing.get("images_scored", 0))
        in_full += int(racing.get("images_in_full", 0))
    selection = report.get("base_selection") or {}
    base_tasks = {
        task_id: round(float(seconds or 0.0), 2)
        for task_id, seconds in report["task_seconds"].items()
        if task_id.startswith("base-")
    }
    return {
        "arm": arm,
        "seed": seed,
        "command": " ".join(command[1:]),
        "code": _commit(),
        "scale": scale,
        "base_policy": report["base_policy"],
        "linear_accuracy": report["final"]["linear_accuracy"],
        "rotation_accuracy": report["final"]["rotation_accuracy"],
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "seconds_before_retraining": round(
            sum(v for k, v in stage_seconds.items() if k != "retrain"), 1
        ),
        "base_candidate_epochs": selection.get("epochs_trained"),
        "base_candidate_epochs_exhaustive": selection.get("epochs_exhaustive"),
        "base_task_seconds": base_tasks,
        "heldout_images_scored": scored,
        "heldout_images_in_full": in_full,
        "wall_seconds": round(elapsed, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "threads": threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def _commit() -> str:
    """The git commit of the code that ran (the study may run from a snapshot checkout)."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, paired by seed against `paper`: accuracy difference (arm - paper), cost ratios."""
    by_key = {(run["arm"], run["seed"]): run for run in runs}
    summary: dict[str, Any] = {}
    for arm in ARMS:
        if arm == "paper":
            continue
        seeds = sorted(seed for a, seed in by_key if a == "paper" and (arm, seed) in by_key)
        rows = []
        for seed in seeds:
            paper, other = by_key[("paper", seed)], by_key[(arm, seed)]
            rows.append(
                {
                    "seed": seed,
                    "base": [paper["base_policy"], other["base_policy"]],
                    "accuracy": [paper["linear_accuracy"], other["linear_accuracy"]],
                    "accuracy_difference": other["linear_accuracy"] - paper["linear_accuracy"],
                    "seconds_ratio": paper["seconds_before_retraining"]
                    / max(other["seconds_before_retraining"], 1e-9),
                    "epochs_ratio": (paper["base_candidate_epochs"] or 0)
                    / max(other["base_candidate_epochs"] or 1, 1),
                    "images_ratio": paper["heldout_images_scored"]
                    / max(other["heldout_images_scored"], 1),
                }
            )
        differences = [row["accuracy_difference"] for row in rows]
        summary[arm] = {
            "pairs": rows,
            "mean_accuracy_difference": statistics.fmean(differences) if differences else None,
            "sd_accuracy_difference": statistics.stdev(differences)
            if len(differences) > 1
            else None,
        }
    return summary


def _fewer(ratio: float) -> str:
    """`paper / arm` as '1.94x fewer', or '1.25x more' when the arm needed more."""
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"


def _per_rung(seconds: dict[str, float]) -> str:
    """Median seconds of a base task per rung (`base-<t>`: the one rung of the exhaustive
    stage; `base-r<k>-...`: rung k): each task pays a fixed cost (a worker process, the data,
    the rotation probe) besides its epochs."""
    rungs: dict[str, list[float]] = {}
    for task_id, value in seconds.items():
        parts = task_id.split("-")
        rung = (
            parts[1] if len(parts) > 2 and parts[1][:1] == "r" and parts[1][1:].isdigit() else "r0"
        )
        rungs.setdefault(rung, []).append(value)
    return (
        ", ".join(
            f"{rung} {statistics.median(values):.1f} ({len(values)})"
            for rung, values in sorted(rungs.items())
        )
        or "-"
    )


def render(
    runs: list[dict[str, Any]], summary: dict[str, Any], seeds_asked: list[int], scale: str
) -> str:
    overrides = " ".join(SCALES[scale]) or "nothing changed"
    lines = [
        f"# The paper's search against successive halving + racing (Fashion-MNIST, {scale} scale)",
        "",
        "Command: `.venv/bin/python benchmarks/study_search_cost.py --scale "
        + scale
        + " --seeds "
        + " ".join(str(s) for s in seeds_asked)
        + f" --out docs/results/search-cost-fmnist-{scale}`  ",
        f"Config: `examples/search-fashion-mnist.yaml` with `{overrides}`; arms: "
        + "; ".join(f"`{arm}`: `{' '.join(overrides)}`" for arm, overrides in ARMS.items())
        + ".",
        "",
        "| arm | seed | base | linear accuracy | base candidate-epochs | held-out images scored "
        "| worker-s before retraining (base / fold / search) | retrain s "
        "| median s per base task, by rung | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
        stages = run["stage_seconds"]
        lines.append(
            f"| {run['arm']} | {run['seed']} | {run['base_policy']} "
            f"| {100 * run['linear_accuracy']:.2f} "
            f"| {run['base_candidate_epochs']} | {run['heldout_images_scored']:,} "
            f"| {run['seconds_before_retraining']:.0f} ({stages.get('base', 0):.0f} / "
            f"{stages.get('fold', 0):.0f} / {stages.get('search', 0):.0f}) "
            f"| {stages.get('retrain', 0):.0f} "
            f"| {_per_rung(run.get('base_task_seconds', {}))} "
            f"| {run['load_average'][0]}-{run['load_average'][1]} |"
        )
    for arm, result in summary.items():
        if not result["pairs"]:
            continue
        lines += ["", f"`{arm}` against `paper`, paired by seed ({arm} - paper):", ""]
        for row in result["pairs"]:
            lines.append(
                f"- seed {row['seed']}: bases {row['base'][0]} / {row['base'][1]}; accuracy "
                f"{100 * row['accuracy_difference']:+.2f} points; base candidate-epochs "
                f"{_fewer(row['epochs_ratio'])}; held-out images scored "
                f"{_fewer(row['images_ratio'])}; worker-seconds before retraining "
                f"{_fewer(row['seconds_ratio'])}"
            )
        sd = result["sd_accuracy_difference"]
        lines += [
            "",
            f"Mean paired accuracy difference: {100 * result['mean_accuracy_difference']:+.2f} "
            f"points over {len(result['pairs'])} seed(s)"
            + (f" (sd {100 * sd:.2f})" if sd is not None else "")
            + ".",
        ]
    missing = [
        f"{arm}-seed{seed}"
        for seed in seeds_asked
        for arm in ARMS
        if not any(r["arm"] == arm and r["seed"] == seed for r in runs)
    ]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--scale", choices=list(SCALES), default="reduced")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=REPO / "runs/study-search-cost")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary-only", action="store_true", help="Only rewrite the summary.")
    args = parser.parse_args()
    args.out = args.out or REPO / f"docs/results/search-cost-fmnist-{args.scale}"
    (args.out / "per-run").mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for seed in args.seeds:
            for arm in args.arms:
                target = args.out / "per-run" / f"{arm}-seed{seed}.json"
                if target.exists():
                    print(f"{target}: done already, skipped", flush=True)
                    continue
                run = run_search(arm, seed, args.work, args.threads, args.scale)
                target.write_text(json.dumps(run, indent=1) + "\n")
                print(f"{target}: {run['base_policy']}, {run['linear_accuracy']:.4f}", flush=True)
    runs = [json.loads(path.read_text()) for path in sorted((args.out / "per-run").glob("*.json"))]
    summary = summarise(runs)
    (args.out / "study.json").write_text(json.dumps({"summary": summary}, indent=1) + "\n")
    readme = args.out / "README.md"
    notes = ""
    if readme.exists() and "## What we read from it" in readme.read_text():
        notes = readme.read_text()[readme.read_text().index("## What we read from it") :]
    readme.write_text(
        render(runs, summary, args.seeds, args.scale) + ("\n" + notes if notes else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
