"""Prometheus metrics shared by the local runner and the operator (one set of names).

Names follow Prometheus conventions: a `selfaugment_` prefix, base units in the name
(`_seconds`, `_ratio`), `_total` only on counters. Every per-search series carries the labels
`namespace` and `search` (the local runner uses namespace "local" and the run's name), so the
Grafana dashboard and the alerting rules work the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SEARCH_LABELS = ("namespace", "search")
PHASES = ("Pending", "Running", "Succeeded", "Failed")
TASK_STATES = ("pending", "running", "succeeded", "failed")
#: Values of the `stage` label of selfaugment_search_stage (every planner stage, and "done").
STAGES = ("prepare", "base", "folds", "search", "merge", "retrain", "report", "randaugment", "done")


@dataclass
class SearchMetrics:
    """The metric objects, registered in one registry."""

    registry: CollectorRegistry
    searches: Gauge
    search_stage: Gauge
    search_progress: Gauge
    search_eta: Gauge
    tasks: Gauge
    trials_done: Gauge
    best_objective: Gauge
    train_epoch: Gauge
    train_loss: Gauge
    task_failures: Counter
    task_retries: Counter
    reconcile_errors: Counter
    reconcile_duration: Histogram
    last_progress: Gauge


def create_metrics(registry: CollectorRegistry | None = None) -> SearchMetrics:
    """Create and register every metric (a fresh registry unless one is given)."""
    registry = registry if registry is not None else CollectorRegistry()
    return SearchMetrics(
        registry=registry,
        searches=Gauge(
            "selfaugment_searches",
            "AugmentSearches by phase.",
            ["phase"],
            registry=registry,
        ),
        search_stage=Gauge(
            "selfaugment_search_stage",
            "1 for the stage a search is in (base, folds, search, merge, retrain, report, done).",
            [*SEARCH_LABELS, "stage"],
            registry=registry,
        ),
        search_progress=Gauge(
            "selfaugment_search_progress_ratio",
            "Fraction of a search's tasks that are done (0 to 1).",
            SEARCH_LABELS,
            registry=registry,
        ),
        search_eta=Gauge(
            "selfaugment_search_eta_seconds",
            "Estimated seconds until a search finishes (from the mean task time so far).",
            SEARCH_LABELS,
            registry=registry,
        ),
        tasks=Gauge(
            "selfaugment_tasks",
            "Tasks of a search by state (pending, running, succeeded, failed).",
            [*SEARCH_LABELS, "state"],
            registry=registry,
        ),
        trials_done=Gauge(
            "selfaugment_trials_done",
            "Candidate policies scored so far in a search.",
            SEARCH_LABELS,
            registry=registry,
        ),
        best_objective=Gauge(
            "selfaugment_best_objective",
            "Best (lowest) objective value found so far in a search.",
            SEARCH_LABELS,
            registry=registry,
        ),
        train_epoch=Gauge(
            "selfaugment_train_epoch",
            "Current epoch of a running training task.",
            [*SEARCH_LABELS, "task"],
            registry=registry,
        ),
        train_loss=Gauge(
            "selfaugment_train_loss",
            "Latest epoch-mean InfoNCE loss of a running training task.",
            [*SEARCH_LABELS, "task"],
            registry=registry,
        ),
        task_failures=Counter(
            "selfaugment_task_failures",
            "Task attempts that failed.",
            SEARCH_LABELS,
            registry=registry,
        ),
        task_retries=Counter(
            "selfaugment_task_retries",
            "Failed tasks started again.",
            SEARCH_LABELS,
            registry=registry,
        ),
        reconcile_errors=Counter(
            "selfaugment_reconcile_errors",
            "Operator reconciliations that raised an error.",
            ["kind"],
            registry=registry,
        ),
        reconcile_duration=Histogram(
            "selfaugment_reconcile_duration_seconds",
            "Time spent in one operator reconciliation.",
            ["kind"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ),
        last_progress=Gauge(
            "selfaugment_search_last_progress_timestamp_seconds",
            "Unix time at which a search last finished a task or trial (for stall alerts).",
            SEARCH_LABELS,
            registry=registry,
        ),
    )


#: Every metric family name exported (counters add `_total`, histograms `_bucket/_sum/_count`).
def exported_names(metrics: SearchMetrics) -> set[str]:
    names: set[str] = set()
    for collector in metrics.registry.collect():
        for sample in collector.samples:
            names.add(sample.name)
        names.add(collector.name)
    return names
