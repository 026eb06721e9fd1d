"""Prometheus metrics of the operator and an HTTP endpoint serving /metrics and /healthz."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from selfaugment.operator.status import parse_time
from selfaugment.trainer.metrics import PHASES, TASK_STATES, SearchMetrics

STAGES = ("base", "folds", "search", "merge", "retrain", "report", "randaugment", "done")


class SearchGauges:
    """Keeps the per-search series in step with the searches' statuses."""

    def __init__(self, metrics: SearchMetrics) -> None:
        self.metrics = metrics
        self.phases: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()

    def record(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
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

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted search's series."""
        labels = (namespace, name)
        with self.lock:
            self.phases.pop(labels, None)
            self._count_phases()
            for gauge in (
                self.metrics.search_progress,
                self.metrics.trials_done,
                self.metrics.best_objective,
                self.metrics.search_eta,
            ):
                _remove(gauge, labels)
            for state in TASK_STATES:
                _remove(self.metrics.tasks, (*labels, state))
            for stage in STAGES:
                _remove(self.metrics.search_stage, (*labels, stage))

    def _count_phases(self) -> None:
        for phase in PHASES:
            count = sum(1 for value in self.phases.values() if value == phase)
            self.metrics.searches.labels(phase).set(count)


def _now() -> float:
    import time

    return time.time()


def _remove(metric: Any, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def serve(metrics: SearchMetrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text format) and /healthz (liveness) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, kind = generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] in ("/healthz", "/livez"):
                body, kind = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: scraped every few s
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
