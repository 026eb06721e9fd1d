"""Reading a search's state from its artifact store (shared by `status`, the runner, the operator).

Layout of a run in the store:

    spec.json                     the resolved AugmentSearchSpec (written once, checked on resume)
    tasks/<task-id>/result.json   a task's result: its existence means the task is done
    tasks/<task-id>/progress.json a running task's latest epoch / trial figures
    tasks/<task-id>/...           a task's artifacts (checkpoint.pt, heads.pt, trials.json, ...)
    policy.json                   the found policy (after merge)
    report.json, report.md, plots/*.png   the final report
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from selfaugment.trainer.search.planner import PlanState, plan
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store.artifacts import ArtifactStore, StoreError

SPEC_KEY = "spec.json"
POLICY_KEY = "policy.json"
RESULT_SCHEMA_VERSION = 1


class RunMismatchError(RuntimeError):
    """The store already holds a run with a different spec."""


def result_key(task_id: str) -> str:
    return f"tasks/{task_id}/result.json"


def progress_key(task_id: str) -> str:
    return f"tasks/{task_id}/progress.json"


def task_key(task_id: str, name: str) -> str:
    return f"tasks/{task_id}/{name}"


def _digest(spec: AugmentSearchSpec, exclude: Any, **extra: object) -> str:
    """sha256 of the spec without `exclude` and without runtime settings that change no result."""
    data = spec.model_dump(mode="json", exclude=exclude)
    data["runtime"].pop("progress", None)
    data["runtime"].pop("num_workers", None)
    data.update(extra)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def spec_digest(spec: AugmentSearchSpec) -> str:
    """A digest of the parts of the spec that change results (not resources or parallelism)."""
    return _digest(spec, {"resources", "parallelism", "storage"})


def prepare_run(store: ArtifactStore, spec: AugmentSearchSpec) -> None:
    """Write spec.json, or check that the stored run has the same spec (resume)."""
    if store.exists(SPEC_KEY):
        stored = AugmentSearchSpec.model_validate(store.read_json(SPEC_KEY))
        if spec_digest(stored) != spec_digest(spec):
            raise RunMismatchError(
                f"{store.url(SPEC_KEY)} holds a run with a different spec; use another output "
                "directory or storage prefix, or rerun with the stored spec to resume"
            )
    store.write_json(SPEC_KEY, spec.model_dump(mode="json"))


def load_spec(store: ArtifactStore) -> AugmentSearchSpec:
    try:
        return AugmentSearchSpec.model_validate(store.read_json(SPEC_KEY))
    except StoreError as error:
        raise StoreError(f"{error}; is this a SelfAugment run directory?") from None


def done_task_ids(store: ArtifactStore) -> set[str]:
    """Ids of the tasks whose result.json exists (one listing of the store)."""
    done = set()
    for key in store.list("tasks/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "result.json":
            done.add(parts[1])
    return done


def read_results(store: ArtifactStore, task_ids: set[str] | None = None) -> dict[str, Any]:
    ids = done_task_ids(store) if task_ids is None else task_ids
    return {task_id: store.read_json(result_key(task_id)) for task_id in sorted(ids)}


def read_progress(store: ArtifactStore, task_id: str) -> dict[str, Any]:
    try:
        value = store.read_json(progress_key(task_id))
    except StoreError:
        return {}
    return value if isinstance(value, dict) else {}


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
        }


def summarise(store: ArtifactStore, spec: AugmentSearchSpec | None = None) -> RunSummary:
    """Summarise a run from its store: stage, progress, base policy, best objective."""
    spec = spec or load_spec(store)
    done = done_task_ids(store)
    state = plan(spec, done)
    summary = RunSummary(state=state)
    results = read_results(store, done)
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


#: Search settings that only the search, merge, retrain and report stages read.
_SEARCH_ONLY_FIELDS = {
    "objective",
    "weights",
    "repeats",
    "trials",
    "sub_policies",
    "ops_per_sub_policy",
    "top_policies",
    "startup_trials",
    "score_batch_size",
    "score_images",
    "randaugment",
}


_TRAINING_EXCLUDE: dict[str, Any] = {
    "resources": True,
    "parallelism": True,
    "storage": True,
    "retrain": True,
    "search": _SEARCH_ONLY_FIELDS,
}


def base_digest(spec: AugmentSearchSpec) -> str:
    """A digest of what the base-candidate tasks depend on (not the search's objective)."""
    return _digest(spec, _TRAINING_EXCLUDE)


def training_digest(spec: AugmentSearchSpec) -> str:
    """A digest of what the base and fold tasks depend on (not the search's objective).

    Two runs with equal digests train identical base-candidate and fold models, so their
    results can be shared. The supervised objective also trains a linear head per fold, so
    with another objective only the base tasks can be shared.
    """
    return _digest(spec, _TRAINING_EXCLUDE, fold_linear_head=spec.search.objective == "supervised")


def reuse_results(
    source: ArtifactStore, target: ArtifactStore, spec: AugmentSearchSpec
) -> list[str]:
    """Copy finished base and fold tasks from another run that trained them the same way.

    Used to compare objectives without retraining the shared stages: the base tasks when the
    base digests match, the fold tasks too when the training digests match. Returns the copied
    ids; raises RunMismatchError when nothing can be shared.
    """
    source_spec = load_spec(source)
    if base_digest(source_spec) != base_digest(spec):
        raise RunMismatchError(
            f"{source.uri} trained its base and fold models with different settings; "
            "only the search settings (objective, trials, ...) may differ to reuse them"
        )
    stages: tuple[str, ...] = ("base-",)
    if training_digest(source_spec) == training_digest(spec):
        stages = ("base-", "fold-")
    done = done_task_ids(target)
    copied = []
    for task_id in sorted(done_task_ids(source)):
        if not task_id.startswith(stages) or task_id in done:
            continue
        prefix = f"tasks/{task_id}/"
        keys = [key for key in source.list(prefix) if "/work/" not in key]
        keys.sort(key=lambda key: key.endswith("result.json"))  # the result goes last
        for key in keys:
            target.write_bytes(key, source.read_bytes(key))
        copied.append(task_id)
    return copied
