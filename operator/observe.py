"""Prometheus metrics of the operator and an HTTP endpoint serving /metrics, /livez, /healthz."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from selfaugment.operator.status import JOB_FAILED, job_state, parse_time
from selfaugment.trainer.metrics import PHASES, STAGES, TASK_STATES, SearchMetrics

Labels = tuple[str, str]


@dataclass
class SearchObservation:
    """What one reconciliation saw besides status: the search's Jobs (retrain Job included)
    and the latest figures of its running tasks (`epoch`, `loss` from progress.json)."""

    jobs: Sequence[Mapping[str, Any]] = ()
    training: dict[str, dict[str, float]] = field(default_factory=dict)


def job_attempts(job: Mapping[str, Any]) -> tuple[int, int]:
    """(failed pods, retries) of a Job as its controller reports them.

    Every failed pod is retried until the Job fails for good (`failed > backoffLimit`), so
    retries = min(failed, backoffLimit), and one less than `failed` once the Job has failed.
    """
    failed = int((job.get("status") or {}).get("failed") or 0)
    limit = (job.get("spec") or {}).get("backoffLimit")
    retries = min(failed, int(limit)) if isinstance(limit, int) else failed
    if job_state(job) == JOB_FAILED:
        retries = min(retries, failed - 1)
    return failed, max(0, retries)


class SearchGauges:
    """Keeps the per-search series in step with the searches' statuses and Jobs.

    Per search it remembers the last (tasks done, trials done) to stamp
    `selfaugment_search_last_progress_timestamp_seconds` when either grows (and when the
    search is first seen by this process), the failed pods and retries already counted per
    Job (by uid, so a re-created Job counts afresh), and which tasks have training series.
    """

    def __init__(self, metrics: SearchMetrics) -> None:
        self.metrics = metrics
        self.phases: dict[Labels, str] = {}
        self.progress_seen: dict[Labels, tuple[int, int]] = {}
        self.attempts_seen: dict[Labels, dict[str, tuple[int, int]]] = {}
        self.training_tasks: dict[Labels, set[str]] = {}
        self.lock = threading.Lock()

    def record(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        observed: SearchObservation | None = None,
    ) -> None:
        """Update the series of one search; `observed` None leaves Job-derived series as is."""
        metrics, labels = self.metrics, (namespace, name)
        progress = status.get("progress") or {}
        with self.lock:
            self.phases[labels] = status.get("phase") or "Pending"
            self._count_phases()
            total, done = progress.get("total") or 0, progress.get("done") or 0
            running = progress.get("running") or 0
            failed = 1 if status.get("failedTask") else 0
            counts = {
                "succeeded": done,
                "running": running,
                "failed": failed,
                "pending": max(0, total - done - running - failed),
            }
            for state in TASK_STATES:
                metrics.tasks.labels(*labels, state).set(counts[state])
            for stage in STAGES:
                metrics.search_stage.labels(*labels, stage).set(status.get("stage") == stage)
            metrics.search_progress.labels(*labels).set(done / total if total else 0.0)
            metrics.trials_done.labels(*labels).set(progress.get("trialsDone") or 0)
            if status.get("bestObjective") is not None:
                metrics.best_objective.labels(*labels).set(status["bestObjective"])
            eta = parse_time(progress.get("eta"))
            if eta is not None:
                metrics.search_eta.labels(*labels).set(max(0.0, eta.timestamp() - _now()))
            self._stamp_progress(labels, done, progress.get("trialsDone") or 0)
            metrics.task_failures.labels(*labels)  # exported as 0 until the first failure
            metrics.task_retries.labels(*labels)
            if observed is not None:
                self._count_attempts(labels, observed.jobs)
                self._training(labels, observed.training)

    def _stamp_progress(self, labels: Labels, done: int, trials: int) -> None:
        seen = self.progress_seen.get(labels)
        if seen is None or done > seen[0] or trials > seen[1]:
            self.metrics.last_progress.labels(*labels).set(_now())
        if seen is not None:
            done, trials = max(done, seen[0]), max(trials, seen[1])
        self.progress_seen[labels] = (done, trials)

    def _count_attempts(self, labels: Labels, jobs: Sequence[Mapping[str, Any]]) -> None:
        """Increment failures/retries by what each Job reports beyond what was counted."""
        seen = self.attempts_seen.get(labels, {})
        current: dict[str, tuple[int, int]] = {}
        for job in jobs:
            meta = job.get("metadata") or {}
            key = str(meta.get("uid") or meta.get("name") or "")
            failed, retries = job_attempts(job)
            old_failed, old_retries = seen.get(key, (0, 0))
            if failed > old_failed:
                self.metrics.task_failures.labels(*labels).inc(failed - old_failed)
            if retries > old_retries:
                self.metrics.task_retries.labels(*labels).inc(retries - old_retries)
            current[key] = (max(failed, old_failed), max(retries, old_retries))
        self.attempts_seen[labels] = current  # Jobs gone (TTL, deleted) are forgotten

    def _training(self, labels: Labels, training: Mapping[str, Mapping[str, float]]) -> None:
        """Epoch and loss of running tasks; the series of tasks no longer running go."""
        for task, figures in training.items():
            if figures.get("epoch") is not None:
                self.metrics.train_epoch.labels(*labels, task).set(figures["epoch"])
            if figures.get("loss") is not None:
                self.metrics.train_loss.labels(*labels, task).set(figures["loss"])
        for task in self.training_tasks.get(labels, set()) - set(training):
            _remove(self.metrics.train_epoch, (*labels, task))
            _remove(self.metrics.train_loss, (*labels, task))
        self.training_tasks[labels] = set(training)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted search's series."""
        labels = (namespace, name)
        with self.lock:
            self.phases.pop(labels, None)
            self._count_phases()
            for metric in (
                self.metrics.search_progress,
                self.metrics.trials_done,
                self.metrics.best_objective,
                self.metrics.search_eta,
                self.metrics.last_progress,
                self.metrics.task_failures,
                self.metrics.task_retries,
            ):
                _remove(metric, labels)
            for task in self.training_tasks.pop(labels, set()):
                _remove(self.metrics.train_epoch, (*labels, task))
                _remove(self.metrics.train_loss, (*labels, task))
            self.progress_seen.pop(labels, None)
            self.attempts_seen.pop(labels, None)
            for state in TASK_STATES:
                _remove(self.metrics.tasks, (*labels, state))
            for stage in STAGES:
                _remove(self.metrics.search_stage, (*labels, stage))

    def _count_phases(self) -> None:
        for phase in PHASES:
            count = sum(1 for value in self.phases.values() if value == phase)
            self.metrics.searches.labels(phase).set(count)


def _now() -> float:
    return time.time()


def _remove(metric: Any, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def serve(
    metrics: SearchMetrics,
    port: int,
    health: Callable[[], Mapping[str, Any]] | None = None,
    host: str = "0.0.0.0",
) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text format), /livez and /healthz in a daemon thread.

    /livez and /healthz answer 200 or 503 with the JSON of `health()` (operator/health.py):
    /livez fails only on what a restart can fix (the API, the watch), /healthz on any check.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, code = self.path.split("?")[0], 200
            if path == "/metrics":
                body, kind = generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/livez", "/readyz"):
                report = dict(health()) if health is not None else {"live": True, "healthy": True}
                passed = report["live"] if path == "/livez" else report["healthy"]
                code = 200 if passed else 503
                body, kind = (json.dumps(report, indent=1) + "\n").encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: scraped every few s
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
