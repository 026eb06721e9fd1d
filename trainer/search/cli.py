"""`selfaugment search` and `selfaugment status`: the local, one-command way to run a search."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.metrics import create_metrics
from selfaugment.trainer.search.reuse import reuse_results
from selfaugment.trainer.search.runner import LocalRunner
from selfaugment.trainer.search.status import describe_skipped, summarise
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import POLICY_KEY, load_spec, prepare_run, read_progress
from selfaugment.trainer.store.lock import run_holder
from selfaugment.trainer.store.s3 import cache_root


def _gpus(spec: AugmentSearchSpec) -> list[int]:
    import torch

    if spec.resources.gpus <= 0 or not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))


def _run_location(
    spec: AugmentSearchSpec, output: str | Path | None, config_name: str
) -> tuple[str, Path]:
    """The store's URI and the local folder for worker logs, from `-o` and `storage.uri`.

    `-o` is a directory (logs go in it), or an s3:// URI (logs go in the local cache); the
    spec's `storage.uri`, when set, is the store and `-o` only places the logs.
    """
    text = str(output) if output is not None else str(Path("runs") / config_name)
    if text.startswith("s3://"):
        if spec.storage.uri and spec.storage.uri.rstrip("/") != text.rstrip("/"):
            raise ConfigError(
                f"-o {text} and storage.uri {spec.storage.uri} name different stores: give one"
            )
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return text, cache_root() / "logs" / digest
    if "://" in text:
        raise ConfigError(f"-o {text}: expected a directory or s3://bucket/prefix")
    return spec.storage.uri or text, Path(text) / "logs"


def run_search(
    spec: AugmentSearchSpec,
    *,
    output: str | Path | None,
    workers: int | None,
    metrics_port: int | None,
    progress: bool,
    config_name: str,
    reuse_from: str | None = None,
    reuse_workers: bool = True,
) -> int:
    """Run (or resume) a search; prints where the policy and the report are."""
    from selfaugment.trainer.search.preflight import preflight  # reads the dataset: torch

    count = preflight(spec)
    print(f"dataset {spec.dataset.uri}: {count} images", file=sys.stderr)
    store_uri, log_dir = _run_location(spec, output, config_name)
    store = open_store(store_uri, endpoint=spec.storage.endpoint, region=spec.storage.region)
    store_env = {"AWS_ENDPOINT_URL": spec.storage.endpoint} if spec.storage.endpoint else {}
    if reuse_from:
        prepare_run(store, spec)
        source = open_store(reuse_from, endpoint=spec.storage.endpoint, region=spec.storage.region)
        copied = reuse_results(source, store, spec)
        print(f"reused {len(copied)} finished tasks from {source.uri}", file=sys.stderr)
    metrics = create_metrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)
        print(f"metrics on http://127.0.0.1:{metrics_port}/metrics", file=sys.stderr)
    runner = LocalRunner(
        spec,
        store,
        workers=workers or spec.parallelism.max_workers,
        log_dir=log_dir,
        run_name=config_name,
        metrics=metrics,
        gpus=_gpus(spec),
        progress=progress,
        poll_seconds=0.5 if store.local_path("x") is not None else 2.0,
        store_env=store_env,
        reuse_workers=reuse_workers,
    )
    print(f"search {config_name}: artifacts in {store.uri}", file=sys.stderr)
    runner.run()
    summary = summarise(store, spec)
    print(f"done: policy {store.url(POLICY_KEY) if summary.policy_uri else '(none)'}")
    print(f"report: {store.url('report.md')}")
    if summary.skipped_images:
        print(f"warning: {describe_skipped(summary.skipped_images)}")
    for key, value in summary.final.items():
        print(f"  final {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def print_status(run: str, *, as_json: bool, endpoint: str | None) -> int:
    """Print a run's stage, progress per stage, running tasks and results so far."""
    store = open_store(run, endpoint=endpoint)
    spec = load_spec(store)
    summary = summarise(store, spec)
    state = summary.state
    holder = run_holder(store)
    if as_json:
        print(json.dumps({**summary.to_dict(), "runner": holder}, indent=2))
        return 0
    print(f"run {store.uri}")
    if holder:
        print(f"runner: {holder}")
    elif not state.finished:
        print("runner: none (stopped; run the same `selfaugment search` again to resume)")
    print(f"stage: {state.stage}   tasks {len(state.done)}/{state.total} ({state.percent:.0f}%)")
    stages: dict[str, list[int]] = {}
    for task in state.tasks:
        counts = stages.setdefault(task.stage, [0, 0])
        counts[1] += 1
        counts[0] += task.id in state.done
    for stage, (done, total) in stages.items():
        print(f"  {stage:<12} {done}/{total}")
    for task in state.ready:
        figures = read_progress(store, task.id)
        if figures:
            text = ", ".join(f"{key} {value}" for key, value in sorted(figures.items()))
            where = "running/pending" if holder else "stopped at"
            print(f"  {where} {task.id}: {text}")
    if summary.prepared:
        prepared = summary.prepared
        print(f"dataset: {prepared['uri']} ({prepared['count']} images prepared)")
    if summary.skipped_images:
        print(f"dataset: {describe_skipped(summary.skipped_images)}")
    if summary.base_policy:
        print(f"base policy: {summary.base_policy}")
    if summary.base_choice:
        print(f"  {summary.base_choice}")
    if summary.trials_done:
        print(f"trials done: {summary.trials_done}   best objective: {summary.best_objective}")
    if summary.policy_uri:
        print(f"policy: {summary.policy_uri}")
    for key, value in summary.final.items():
        print(f"final {key}: {value}")
    return 0
