"""The search end to end on one machine: real worker processes, real data, real S3 protocol.

A tiny configuration (digits, 240 images, a width-4 ResNet, one epoch per stage) keeps each run
to a minute or so on 2 cores; every stage of the algorithm still runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import yaml

from selfaugment.trainer.config import load_config
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import done_task_ids

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = {
    "dataset.limit": 240,
    "model.width": 4,
    "moco.queue_size": 128,
    "optim.batch_size": 64,
    "search.base_candidates": "[RandomResizedCrop, Rotate]",
    "search.base_epochs": 1,
    "search.fold_epochs": 1,
    "search.folds": 2,
    "search.trials": 3,
    "search.startup_trials": 2,
    "search.top_policies": 2,
    "search.sub_policies": 2,
    "retrain.epochs": 1,
    "evaluation.epochs": 2,
}


def tiny_config(tmp_path: Path, **extra: object) -> Path:
    overrides = [f"{key}={value}" for key, value in {**TINY, **extra}.items()]
    spec = load_config(AugmentSearchSpec, EXAMPLES / "search-smoke.yaml", overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))
    return path


def search_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "selfaugment.cli",
        "search",
        "-f",
        str(config),
        "-o",
        str(output),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def result_seconds(run: Path) -> dict[str, float]:
    return {
        path.parent.name: json.loads(path.read_text())["seconds"]
        for path in (run / "tasks").glob("*/result.json")
    }


@pytest.mark.slow
def test_search_runs_every_stage_and_resumes_after_a_kill(tmp_path: Path) -> None:
    config, run, port = tiny_config(tmp_path), tmp_path / "run", free_port()
    process = subprocess.Popen(
        search_command(config, run, "--metrics-port", str(port)),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    # Kill the whole process group (runner and workers) once the folds are being trained.
    deadline = time.monotonic() + 300
    metrics = ""
    while not (run / "tasks" / "fold-0" / "progress.json").exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "the search never reached the fold stage"
        metrics = scrape(port) or metrics
        time.sleep(0.2)
    metrics = scrape(port) or metrics
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = result_seconds(run)
    assert {"base-randomresizedcrop", "base-rotate"} <= set(before)
    assert "report" not in before
    # Prometheus metrics were served while the search ran
    labels = 'namespace="local",search="tiny"'
    assert f"selfaugment_search_progress_ratio{{{labels}}}" in metrics
    assert f'selfaugment_search_stage{{{labels},stage="folds"}} 1.0' in metrics
    assert f'selfaugment_tasks{{{labels},state="succeeded"}}' in metrics

    resumed = subprocess.run(
        search_command(config, run), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = result_seconds(run)
    # finished tasks were not redone: their results are the very same
    assert {task: after[task] for task in before} == before
    store = open_store(run)
    spec = load_config(AugmentSearchSpec, config)
    assert len(done_task_ids(store)) == 9
    policy = json.loads((run / "policy.json").read_text())
    assert policy["schema_version"] == 1 and policy["sub_policies"]
    report = json.loads((run / "report.json").read_text())
    assert report["base_policy"] in ("RandomResizedCrop", "Rotate")
    assert set(report["folds"]) == {"fold-0", "fold-1"}
    assert 0.0 <= report["final"]["rotation_accuracy"] <= 1.0
    for plot in report["plots"]:
        assert (run / plot).stat().st_size > 1000
    assert "## Found policy" in (run / "report.md").read_text()
    assert spec.search.trials == 3

    status = subprocess.run(
        [sys.executable, "-m", "selfaugment.cli", "status", str(run)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "stage: done" in status.stdout and "tasks 9/9" in status.stdout


@pytest.mark.slow
def test_search_stores_everything_in_s3(tmp_path: Path, s3_server: str) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="searches")
    config = tiny_config(
        tmp_path,
        **{
            "search.base_policy": "RandomResizedCrop",
            "storage.uri": "s3://searches/tiny",
            "storage.endpoint": s3_server,
        },
    )
    result = subprocess.run(
        search_command(config, tmp_path / "local"),
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="searches")
    keys = {item["Key"] for item in listed["Contents"]}
    for key in (
        "tiny/spec.json",
        "tiny/policy.json",
        "tiny/report.json",
        "tiny/report.md",
        "tiny/tasks/fold-0/result.json",
        "tiny/tasks/fold-0/checkpoint.pt",
        "tiny/tasks/search-f1-r0/trials.json",
        "tiny/tasks/retrain/checkpoint.pt",
        "tiny/plots/objective_per_trial.png",
    ):
        assert key in keys, key
    assert not any(key.startswith("tiny/tasks/base-") for key in keys)
    # nothing but logs is written locally
    local = {p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*")}
    assert local and all(name.startswith("logs") for name in local)
    assert "test-secret-key" not in json.dumps(sorted(keys))
    assert "tiny/.run.lock" not in keys  # the run's lease is released when it ends
    # each worker's scratch files in the cache went with its task: no checkpoint stays there
    cache = Path(os.environ["SELFAUGMENT_CACHE"])
    scratch = [p.relative_to(cache).as_posix() for p in (cache / "work").rglob("*") if p.is_file()]
    assert scratch == [], scratch


@pytest.mark.slow
def test_selfrandaugment_scores_the_grid_and_retrains_the_best(tmp_path: Path) -> None:
    """SelfRandAugment: one short MoCo model per (N, M), ranked by held-out rotation; the best
    is retrained with crop, flip and RandAugment(N, M) and evaluated; the report shows the grid."""
    config = tiny_config(
        tmp_path,
        **{"search.algorithm": "selfrandaugment", "search.randaugment": "{n: [1, 2], m: [9]}"},
    )
    run = tmp_path / "run"
    finished = subprocess.run(
        search_command(config, run, "--no-progress"), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr
    assert done_task_ids(open_store(run)) == {
        "randaugment-n1-m9",
        "randaugment-n2-m9",
        "retrain",
        "report",
    }
    grid = {
        key: json.loads((run / "tasks" / f"randaugment-{key}" / "result.json").read_text())
        for key in ("n1-m9", "n2-m9")
    }
    best = max(grid.values(), key=lambda r: (r["rotation_accuracy"], -r["rotation_loss"]))
    retrain = json.loads((run / "tasks" / "retrain" / "result.json").read_text())
    assert retrain["policy"] == f"randaugment:{best['n']}:9"
    assert retrain["augment"]["crop"] is True and retrain["augment"]["base"] == "none"
    assert 0.0 <= retrain["linear_accuracy"] <= 1.0
    report = (run / "report.md").read_text()
    assert report.startswith("# Search report (SelfRandAugment)")
    assert f"| {best['n']} | 9 | {best['rotation_accuracy']:.4f} |" in report
    assert (run / "plots" / "randaugment_grid.png").stat().st_size > 1000
    # policy.json holds RandAugment(N, 9) as explicit sub-policies: 15**N of them
    policy = json.loads((run / "policy.json").read_text())
    assert policy["name"] == f"randaugment:{best['n']}:9"
    assert len(policy["sub_policies"]) == 15 ** best["n"]
    assert (
        "policy: "
        in subprocess.run(
            [sys.executable, "-m", "selfaugment.cli", "status", str(run)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def _results_without_places(run: Path) -> dict[str, object]:
    """Every task's result, less its timings and the paths that name the run's folder."""

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "seconds"}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value.replace(str(run), "RUN") if isinstance(value, str) else value

    return {
        path.parent.name: strip(json.loads(path.read_text()))
        for path in sorted((run / "tasks").glob("*/result.json"))
    }


@pytest.mark.slow
def test_reused_workers_give_the_results_of_fresh_ones(tmp_path: Path) -> None:
    """The same search with workers that serve task after task (the default) and with a new
    process per task (`--fresh-workers`): every task's result is the same, to the last digit,
    and the serving run started no more worker processes than it has slots."""
    config = tiny_config(tmp_path, **{"parallelism.max_workers": 2})
    results = {}
    for name, extra in (("reused", ()), ("fresh", ("--fresh-workers",))):
        run = tmp_path / name
        finished = subprocess.run(
            search_command(config, run, "--no-progress", *extra),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        results[name] = _results_without_places(run)
    assert len(results["reused"]) == 9
    assert results["reused"] == results["fresh"]
    serving_logs = sorted(path.name for path in (tmp_path / "reused" / "logs").glob("worker-*"))
    assert serving_logs == ["worker-1.log", "worker-2.log"]
    assert not list((tmp_path / "fresh" / "logs").glob("worker-*"))
    # each task's output went to its own log, also from a serving worker
    assert "task fold-0 done" in (tmp_path / "reused" / "logs" / "fold-0.log").read_text()


@pytest.mark.slow
def test_a_killed_serving_worker_is_replaced_and_its_task_redone(
    tmp_path: Path, worker_pids: Callable[[Path], list[int]]
) -> None:
    """SIGKILL (the OOM killer) takes a serving worker in the middle of a fold: the runner
    reports the task as failed, starts a new worker, and the search finishes."""
    config, run = tiny_config(tmp_path, **{"search.fold_epochs": 30}), tmp_path / "run"
    process = subprocess.Popen(
        search_command(config, run, "--no-progress"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "tasks" / "fold-0" / "progress.json").exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the search never reached the fold stage"
            time.sleep(0.2)
        victims = worker_pids(run)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "failed (exit code -9), retrying" in stderr
    assert len(done_task_ids(open_store(run))) == 9
    assert victims[0] not in worker_pids(run)
