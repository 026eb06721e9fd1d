"""Reconciliation of one AugmentSearch: planner tasks -> Jobs (and the retrain Pretrain) -> status.

Level-triggered and idempotent: every call re-reads the truth (results in the store, Jobs in the
cluster), creates what is missing under deterministic names, and patches status only when it
changed. An operator restart therefore resumes with no duplicate Jobs and no lost results.

A failed search is retried by a new value of the selfaugment.io/retry annotation: the ended Jobs
of unfinished tasks are deleted (and created again by the same reconciliation's successors),
a failed retraining Pretrain gets the same annotation, and finished tasks stay finished because
their results are in the store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from selfaugment.operator import manifests, names
from selfaugment.operator.kube import KubeError
from selfaugment.operator.observe import SearchObservation
from selfaugment.operator.reconciler import INVALID_OBJECT, ResourceReconciler, refused
from selfaugment.operator.runtime import Deps, StoreUnavailable, read_optional
from selfaugment.operator.status import (
    JOB_ACTIVE,
    JOB_FAILED,
    JOB_SUCCEEDED,
    JOB_SUSPENDED,
    Eta,
    classify_job_failure,
    job_deleting,
    job_state,
    merge_patch,
    now_iso,
    number,
    parse_time,
)
from selfaugment.trainer.config import ConfigError, parse_config
from selfaugment.trainer.search.planner import PlanState, Task, plan, stages_between
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactStore, StoreError
from selfaugment.trainer.store.layout import (
    POLICY_KEY,
    SPEC_KEY,
    done_task_ids,
    progress_key,
    result_key,
)

#: Spec sections that may change while a search runs (they only affect Jobs created later).
MUTABLE_SECTIONS = frozenset({"resources", "parallelism"})
SEARCH_KINDS = frozenset({"search", "randaugment"})
#: Failure reasons a failed retraining Pretrain passes on to its search (else TaskFailed).
PASSED_ON_REASONS = frozenset({"DeadlineExceeded", "BadInput"})
#: (task, condition reason, message) of the task that failed a search.
Failure = tuple[Task, str, str]


def parse_search_spec(raw: Mapping[str, Any]) -> AugmentSearchSpec:
    """Validate an AugmentSearch spec; ConfigError names the field (spec.<path>)."""
    spec = parse_config(AugmentSearchSpec, dict(raw), source="spec")
    if not spec.storage.uri:
        raise ConfigError("spec: storage.uri: required on Kubernetes (an s3:// store)")
    return spec


def changed_sections(live: AugmentSearchSpec, started: AugmentSearchSpec) -> list[str]:
    """Immutable top-level sections (camelCase, as in the manifest) whose value differs from
    the spec the run started with."""
    now = live.model_dump(mode="json", by_alias=True)
    then = started.model_dump(mode="json", by_alias=True)
    return sorted(key for key in now if key not in MUTABLE_SECTIONS and now[key] != then.get(key))


def task_job_name(search: str, task: Task) -> str:
    if task.kind == "retrain":
        return names.pretrain_job_name(names.pretrain_name(search))
    return names.job_name(search, task.id)


def retry_pending(body: Mapping[str, Any]) -> bool:
    """A resource's retry annotation holds a value its status has not acted on yet."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    token = annotations.get(names.RETRY_ANNOTATION)
    return bool(token) and token != (body.get("status") or {}).get("retryToken")


def _trials(
    spec: AugmentSearchSpec, state: PlanState, store: ArtifactStore
) -> tuple[int, int, float | None]:
    """Trials done, trials in all, best objective so far (from results and progress files)."""
    total = 0
    done_trials = 0
    best: float | None = None
    for task in state.tasks:
        if task.kind not in SEARCH_KINDS:
            continue
        per_task = spec.search.trials if task.kind == "search" else 1
        total += per_task
        if task.id in state.done:
            data = read_optional(store, result_key(task.id))
            done_trials += per_task
        else:
            data = read_optional(store, progress_key(task.id))
            done_trials += int(data.get("trials_done") or 0) if data else 0
        value = data.get("best_objective") if data else None
        if isinstance(value, int | float) and (best is None or value < best):
            best = float(value)
    return done_trials, total, best


def _policies(spec: AugmentSearchSpec, store: ArtifactStore, state: PlanState) -> dict[str, Any]:
    base = spec.search.base_policy if spec.search.base_policy != "auto" else None
    if base is None and "fold-0" in state.done:
        fold = read_optional(store, result_key("fold-0")) or {}
        base = fold.get("base_policy") if isinstance(fold.get("base_policy"), str) else None
    best: dict[str, Any] = {}
    if store.exists(POLICY_KEY):
        policy = read_optional(store, POLICY_KEY)
        best["uri"] = store.url(POLICY_KEY)
        entries = (
            policy.get("sub_policies", policy.get("policies"))
            if isinstance(policy, dict)
            else policy
        )
        if isinstance(entries, list):
            best["summary"] = f"{len(entries)} sub-policies"
        elif isinstance(policy, dict) and isinstance(policy.get("name"), str):
            best["summary"] = policy["name"]
    return {"basePolicy": base, "bestPolicy": best}


class SearchReconciler(ResourceReconciler):
    """Reconciles one AugmentSearch body with the cluster and the store."""

    def __init__(self, body: Mapping[str, Any], deps: Deps) -> None:
        super().__init__(body, deps)
        #: Jobs and running tasks' figures for the metrics (None when nothing was looked at).
        self.observed: SearchObservation | None = None
        #: The retry token acted on in this reconciliation (the search had failed), if any.
        self.retrying: str | None = None
        #: Jobs deleted by this reconciliation (a real API server may still list them).
        self.deleted: set[str] = set()
        # Pretrains this reconciliation created: handlers.reconcile_search starts their Jobs
        # at once instead of waiting for the watch to deliver them
        self.created_pretrains: list[dict[str, Any]] = []
        self._pretrain: dict[str, Any] | bool | None = False  # False: not read yet

    # -- small helpers -------------------------------------------------------------------

    def _fail(self, reason: str, message: str, condition: str = "Failed") -> None:
        self.status["phase"] = "Failed"
        if condition != "Failed":
            self._condition(condition, False, reason, message)
        self._condition("Failed", True, reason, message)
        self._condition("Ready", False, reason, message)
        self._condition("Progressing", False, reason, message)
        self._terminal("Failed", reason, message)
        if (
            self.old.get("phase") != "Failed"
            or self.old.get("conditions") != self.status["conditions"]
        ):
            self._event("Warning", reason, message)

    def _patch(self) -> None:
        if merge_patch(self.old, self.status) != self.old:
            self.deps.kube.patch_status(
                names.API_VERSION, names.SEARCH_PLURAL, self.namespace, self.name, self.status
            )

    # -- the reconciliation ----------------------------------------------------------------
    def run(self) -> None:
        phase = self.old.get("phase")
        token = self._retry_token()
        if token is not None:  # acted on once, whatever the phase
            self.status["retryToken"] = token
            if phase == "Failed":
                self.retrying = token
            else:
                self._event(
                    "Normal",
                    "Retry",
                    f"{names.RETRY_ANNOTATION}={token}: the search has not failed, nothing to retry",
                )
        if phase == "Succeeded" or (
            phase == "Failed"
            and self.retrying is None
            and self.old.get("observedGeneration") == self.generation
        ):
            if token is not None:
                self._patch()
            return
        try:
            spec = parse_search_spec(self.body.get("spec") or {})
        except ConfigError as error:
            self._fail("InvalidSpec", str(error), condition="SpecValid")
            self._patch()
            return
        self._condition("SpecValid", True, "Valid", "spec is valid")
        try:
            store = self._open_store(spec.storage)
            spec = self._started_spec(spec, store)
            startable = self._check_secret(spec.storage, store)
            self._advance(spec, store, startable)
        except (StoreUnavailable, StoreError) as error:
            # Said in status and an Event, then raised: counted, logged and retried later.
            self._storage_failed(error)
            self._block_progress()
            self.status.pop("retryToken", None)  # a retry not made yet: next time
            self._patch()
            raise
        self._patch()

    def _block_progress(self) -> None:
        """Progressing=False (and Ready=False) saying why, while a StorageReady or
        WorkersHealthy condition is False on a search that has not ended."""
        blocked = self.blocked()
        if blocked is None or self.status.get("phase", self.old.get("phase")) in (
            "Succeeded",
            "Failed",
        ):
            return
        self._condition("Progressing", False, *blocked)
        self._condition("Ready", False, *blocked)

    def _started_spec(self, live: AugmentSearchSpec, store: ArtifactStore) -> AugmentSearchSpec:
        """The spec the run started with (live resources/parallelism); written on first run."""
        stored = read_optional(store, SPEC_KEY)
        if stored is None:
            store.write_json(SPEC_KEY, live.model_dump(mode="json"))
            self._condition("SpecImmutable", False, "Unchanged", "")
            return live
        try:
            started = parse_config(AugmentSearchSpec, stored, source=store.url(SPEC_KEY))
        except ConfigError as error:
            raise StoreUnavailable(str(error)) from None
        changed = changed_sections(live, started)
        if changed:
            message = (
                f"spec fields {', '.join(f'spec.{key}' for key in changed)} cannot change once a "
                "search started; the run continues with its original values"
            )
            was = next(
                (c for c in self.old.get("conditions") or [] if c["type"] == "SpecImmutable"), None
            )
            self._condition("SpecImmutable", True, "ImmutableFieldChanged", message)
            if was is None or was.get("status") != "True" or was.get("message") != message:
                self._event("Warning", "ImmutableFieldChanged", message)
        else:
            self._condition("SpecImmutable", False, "Unchanged", "")
        return started.model_copy(
            update={"resources": live.resources, "parallelism": live.parallelism}
        )

    def _advance(self, spec: AugmentSearchSpec, store: ArtifactStore, startable: bool) -> None:
        """Jobs for ready tasks (none while `startable` is False: the credentials Secret is
        missing), then progress, WorkersHealthy from the pods of active Jobs, and status."""
        kube = self.deps.kube
        state = plan(spec, done_task_ids(store))
        jobs = {
            job["metadata"]["name"]: job
            for job in kube.list(
                "batch/v1",
                "jobs",
                self.namespace,
                {names.LABEL_SEARCH: manifests.label_value(self.name)},
            )
        }
        if self.retrying is not None:
            self._retry(state, jobs)
        running = 0
        failure: Failure | None = None
        self.observed = SearchObservation(jobs=list(jobs.values()))
        for task in state.tasks:
            if task.id in state.done:
                continue
            if task.kind == "retrain":  # the Pretrain decides whether its training failed
                pretrain = self._retrain_pretrain()
                ended = self._retrain_failure(task, pretrain) if pretrain is not None else None
                if ended is not None:
                    failure = ended
                elif pretrain is not None:
                    running += 1
                continue
            job = jobs.get(task_job_name(self.name, task))
            if job is None or job["metadata"]["name"] in self.deleted or job_deleting(job):
                continue
            current = job_state(job)
            if current == JOB_FAILED:
                failure = (task, *classify_job_failure(job))
            elif current == JOB_SUCCEEDED:
                name = job["metadata"]["name"]
                message = f"Job {name} succeeded but wrote no {result_key(task.id)}"
                failure = (task, "TaskFailed", message)
            else:
                running += 1
                if current == JOB_ACTIVE:
                    self._observe_training(store, task)
        if failure is None and startable:
            for task in state.ready:
                if running >= spec.parallelism.max_workers:
                    break
                if task_job_name(self.name, task) in jobs or (
                    task.kind == "retrain" and self._retrain_pretrain() is not None
                ):
                    continue
                try:
                    created = self._start(task, spec)
                except KubeError as error:
                    if not refused(error):
                        raise
                    # The same spec makes the same object: failed until the spec changes (or
                    # a retry), instead of retried every few seconds for ever.
                    failure = (task, INVALID_OBJECT, f"the API server refused its object: {error}")
                    break
                if created["kind"] == "Job":  # as created (suspended for Kueue, say)
                    jobs[created["metadata"]["name"]] = created
                running += 1
        active = any(job_state(job) == JOB_ACTIVE for job in jobs.values())
        self._check_workers({names.LABEL_SEARCH: manifests.label_value(self.name)}, active)
        self._write_progress(spec, store, state, running, jobs, failure)
        self._block_progress()

    def _observe_training(self, store: ArtifactStore, task: Task) -> None:
        """Epoch and loss of a running task from its `tasks/<id>/progress.json`, if any."""
        figures = read_optional(store, progress_key(task.id))
        epoch, loss = number(figures, "epoch"), number(figures, "loss")
        if self.observed is not None and epoch is not None:
            values = {"epoch": epoch} if loss is None else {"epoch": epoch, "loss": loss}
            self.observed.training[task.id] = values

    def _retrain_pretrain(self) -> dict[str, Any] | None:
        """The search's retraining Pretrain (read once per reconciliation), or None."""
        if self._pretrain is False:
            self._pretrain = self.deps.kube.get(
                names.API_VERSION,
                names.PRETRAIN_PLURAL,
                self.namespace,
                names.pretrain_name(self.name),
            )
        return self._pretrain if isinstance(self._pretrain, dict) else None

    def _retrain_failure(self, task: Task, pretrain: Mapping[str, Any]) -> Failure | None:
        """The retrain task's failure: its Pretrain failed for good (no retry under way; a
        multi-node Pretrain restarts its ranks itself before it fails)."""
        status = pretrain.get("status") or {}
        if status.get("phase") != "Failed" or retry_pending(pretrain) or self.retrying:
            return None
        condition: Mapping[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {}
        )
        reason = condition.get("reason")
        name = pretrain["metadata"]["name"]
        message = f"Pretrain {name} failed: {condition.get('message') or reason}"
        return task, reason if reason in PASSED_ON_REASONS else "TaskFailed", message

    def _retry(self, state: PlanState, jobs: Mapping[str, Any]) -> None:
        """Start the unfinished tasks whose Job ended again: delete those Jobs (they are created
        again once gone) and pass the retry on to a failed retraining Pretrain."""
        kube, again = self.deps.kube, []
        for task in state.tasks:
            if task.id in state.done:
                continue
            if task.kind == "retrain":
                pretrain = self._retrain_pretrain()
                if pretrain is not None and (pretrain.get("status") or {}).get("phase") == "Failed":
                    annotations = {names.RETRY_ANNOTATION: self.retrying}
                    kube.patch(
                        names.API_VERSION,
                        names.PRETRAIN_PLURAL,
                        self.namespace,
                        pretrain["metadata"]["name"],
                        {"metadata": {"annotations": annotations}},
                    )
                    again.append(task.id)
                continue
            job = jobs.get(task_job_name(self.name, task))
            if job is not None and job_state(job) in (JOB_FAILED, JOB_SUCCEEDED):
                kube.delete("batch/v1", "jobs", self.namespace, job["metadata"]["name"])
                self.deleted.add(job["metadata"]["name"])
                again.append(task.id)
        self.status["failedTask"] = None
        self._event(
            "Normal",
            "Retry",
            f"{names.RETRY_ANNOTATION}={self.retrying}: tasks {', '.join(again) or '(none)'} "
            f"start again; the {len(state.done)} finished tasks are kept",
        )

    def _start(self, task: Task, spec: AugmentSearchSpec) -> dict[str, Any]:
        """Create the task's Job (or the retraining Pretrain); the object as sent."""
        kube, settings = self.deps.kube, self.deps.settings
        if task.kind == "retrain":
            manifest = manifests.retrain_pretrain(self.body, spec)
            what = f"Pretrain {manifest['metadata']['name']}"
        else:
            manifest = manifests.task_job(self.body, spec, task, settings)
            what = f"Job {manifest['metadata']['name']}"
        if kube.create(manifest):
            self._event("Normal", "TaskStarted", f"task {task.id} ({task.stage}): created {what}")
            if task.kind == "retrain":
                self.created_pretrains.append(manifest)
        if not self.status.get("startTime") and not self.old.get("startTime"):
            self.status["startTime"] = now_iso()
        return manifest

    def _write_progress(
        self,
        spec: AugmentSearchSpec,
        store: ArtifactStore,
        state: PlanState,
        running: int,
        jobs: Mapping[str, Any],
        failure: Failure | None,
    ) -> None:
        status = self.status
        start = self.old.get("startTime") or status.get("startTime")
        if start is None and state.done:
            start = status["startTime"] = now_iso()
        trials_done, trials_total, best = _trials(spec, state, store)
        old_progress = self.old.get("progress") or {}
        eta = old_progress.get("eta")
        if old_progress.get("done") != len(state.done):  # only re-estimated when a task ends
            started = parse_time(start) or dt.datetime.now(dt.timezone.utc)
            eta = Eta(started, len(state.done), state.total).at(dt.datetime.now(dt.timezone.utc))
        status["progress"] = {
            "done": len(state.done),
            "total": state.total,
            "running": running,
            "percent": int(state.percent),
            "eta": eta,
            "trialsDone": trials_done,
            "trialsTotal": trials_total,
        }
        status["stage"] = state.stage
        status["bestObjective"] = best
        status["results"] = store.uri
        status.update(_policies(spec, store, state))
        if "retrain" in {task.id for task in state.ready} or "retrain" in state.done:
            status["pretrainRef"] = names.pretrain_name(self.name)
        waiting = [
            name
            for task in state.tasks
            if task.id not in state.done
            and (job := jobs.get(name := task_job_name(self.name, task))) is not None
            and name not in self.deleted
            and job_state(job) == JOB_SUSPENDED
        ]
        self._queued(sorted(waiting), spec.resources.queue)
        if failure is not None:
            task, reason, detail = failure
            status["failedTask"] = task.id
            self._fail(reason, f"task {task.id} ({task.stage}) failed: {detail}")
            return
        self._condition("Failed", False, "NoFailure", "")
        if self.old.get("failedTask"):  # a fixed spec (or a retry) runs it again
            status["failedTask"] = None
        if state.finished:
            status["phase"] = "Succeeded"
            self._condition(
                "Ready", True, "Succeeded", f"policy at {status['bestPolicy'].get('uri')}"
            )
            self._condition("Progressing", False, "Succeeded", "all tasks done")
            self._terminal("Succeeded", "Succeeded", f"results in {store.uri}")
            if self.old.get("phase") != "Succeeded":
                self._event("Normal", "Succeeded", f"search finished; results in {store.uri}")
            return
        suspended = jobs and all(job_state(job) == JOB_SUSPENDED for job in jobs.values())
        status["phase"] = "Running" if start and not (suspended and not state.done) else "Pending"
        message = f"stage {state.stage}: {len(state.done)}/{state.total} tasks done"
        self._condition("Ready", False, "InProgress", message)
        self._condition("Progressing", True, f"Stage{state.stage.capitalize()}", message)
        self._terminal(status["phase"], "InProgress", message)
        if self.old.get("stage") != state.stage:
            # A short stage (merge) can start and end between two reconciles: say so too.
            for skipped in stages_between(spec, self.old.get("stage"), state.stage):
                self._event("Normal", "StageStarted", f"stage {skipped}: started and finished")
            self._event("Normal", "StageStarted", message)
