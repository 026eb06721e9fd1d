"""A search's state read from its store: stage, progress, base policy, best objective.

What `selfaugment status` prints, the runner's progress bars show and the operator writes into
the AugmentSearch status; the planner says which stage the finished tasks put the run in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from selfaugment.trainer.search.base_selection import (
    NoBaseResultsError,
    describe_separation,
    final_scores,
    separation,
)
from selfaugment.trainer.search.planner import PlanState, plan
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store.artifacts import ArtifactStore
from selfaugment.trainer.store.layout import (
    POLICY_KEY,
    done_task_ids,
    load_spec,
    read_progress,
    read_results,
)


@dataclass
class RunSummary:
    """What `selfaugment status` prints and the operator puts in status."""

    state: PlanState
    base_policy: str | None = None
    best_objective: float | None = None
    trials_done: int = 0
    policy_uri: str | None = None
    policy_summary: dict[str, float] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    #: unreadable images the dataset loads left out: {"count", "files": [{"file", "reason"}]}
    skipped_images: dict[str, Any] | None = None
    #: whether the base transform won beyond the scores' uncertainty, in one line
    base_choice: str | None = None
    #: the prepared dataset the tasks read (the `prepare` task's result), if any
    prepared: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.state.stage,
            "finished": self.state.finished,
            "done": len(self.state.done),
            "total": self.state.total,
            "percent": round(self.state.percent, 1),
            "base_policy": self.base_policy,
            "best_objective": self.best_objective,
            "trials_done": self.trials_done,
            "policy_uri": self.policy_uri,
            "policy_summary": self.policy_summary,
            "final": self.final,
            "skipped_images": self.skipped_images,
            "base_choice": self.base_choice,
            "prepared": self.prepared,
        }


def skipped_images(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The unreadable images a run's tasks left out (every task reads the same dataset)."""
    records = [
        result["skipped_images"] for result in results.values() if "skipped_images" in result
    ]
    return max(records, key=lambda record: int(record.get("count", 0)), default=None)


def describe_skipped(record: dict[str, Any] | None, shown: int = 5) -> str | None:
    """One line: how many images were left out and the first few by name, with the reason."""
    if not record:
        return None
    files = record.get("files", [])
    named = ", ".join(f"{item['file']} ({item['reason']})" for item in files[:shown])
    more = int(record["count"]) - min(len(files), shown)
    return f"{record['count']} unreadable image(s) left out of the dataset: {named}" + (
        f" and {more} more" if more > 0 else ""
    )


def summarise(store: ArtifactStore, spec: AugmentSearchSpec | None = None) -> RunSummary:
    """Summarise a run from its store: stage, progress, base policy, best objective."""
    spec = spec or load_spec(store)
    done = done_task_ids(store)
    state = plan(spec, done)
    summary = RunSummary(state=state)
    results = read_results(store, done)
    summary.skipped_images = skipped_images(results)
    if isinstance(results.get("prepare", {}).get("prepared"), dict):
        summary.prepared = results["prepare"]["prepared"]
    for task_id, result in results.items():
        if result.get("kind") == "fold" and result.get("base_policy"):
            summary.base_policy = result["base_policy"]
        if task_id.startswith("search-"):
            summary.trials_done += int(result.get("trials_done", 0))
            best = result.get("best_objective")
            if best is not None and (
                summary.best_objective is None or best < summary.best_objective
            ):
                summary.best_objective = float(best)
    if spec.search.base_policy != "auto":
        summary.base_policy = spec.search.base_policy
    elif all(task.id in done for task in state.tasks if task.kind == "base"):
        with contextlib.suppress(NoBaseResultsError):
            summary.base_choice = describe_separation(separation(final_scores(spec, results)))
    for task in state.tasks:
        if task.kind == "search" and task.id not in done:
            progress = read_progress(store, task.id) if task in state.ready else {}
            summary.trials_done += int(progress.get("trials_done", 0))
            best = progress.get("best_objective")
            if best is not None and (
                summary.best_objective is None or best < summary.best_objective
            ):
                summary.best_objective = float(best)
    merge = results.get("merge") or results.get("retrain")
    if merge and merge.get("policy_summary"):
        summary.policy_summary = merge["policy_summary"]
    if store.exists(POLICY_KEY):
        summary.policy_uri = store.url(POLICY_KEY)
    if "retrain" in results:
        summary.final = {
            key: value
            for key, value in results["retrain"].items()
            if key in ("rotation_accuracy", "rotation_loss", "linear_accuracy", "final_loss")
        }
    return summary
