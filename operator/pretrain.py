"""Reconciliation of one Pretrain: config in the store -> one Job (indexed for torchrun) -> status.

Multi-node training uses a batch/v1 indexed Job with a headless Service for rendezvous rather
than Kubeflow's PyTorchJob: it needs no extra operator on the cluster, Kueue admits batch/v1 Jobs
natively, and `torchrun --node-rank=$(JOB_COMPLETION_INDEX)` gets a stable rank from the index.

A torchrun group cannot go on without one of its ranks, and the Job controller would replace
only the failed pod. So the Job's podFailurePolicy fails the whole Job on any rank's failure,
and this reconciler starts it again, all ranks together: it counts the restart in
`status.restarts` (with the failed Job's uid, so it is counted once), then deletes the Job with
foreground propagation (its pods go before the name is free) and creates it again, up to
`spec.max_retries` times. A deadline or bad input is final, as for one pod.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from selfaugment.operator import manifests, names
from selfaugment.operator.kube import KubeError
from selfaugment.operator.reconciler import INVALID_OBJECT, ResourceReconciler, refused
from selfaugment.operator.runtime import Deps, StoreUnavailable, read_optional
from selfaugment.operator.status import (
    JOB_ACTIVE,
    JOB_FAILED,
    JOB_SUCCEEDED,
    JOB_SUSPENDED,
    classify_job_failure,
    job_deleting,
    job_state,
    merge_patch,
    number,
)
from selfaugment.trainer.config import ConfigError, parse_config
from selfaugment.trainer.pretrain_spec import PretrainSpec
from selfaugment.trainer.store import ArtifactStore, StoreError
from selfaugment.trainer.store.layout import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    PROGRESS_NAME,
    RESULT_NAME,
    prefixed_key,
)


def run_prefix(name: str, spec: PretrainSpec) -> str:
    """Where the worker writes result/progress/checkpoint: the search's retrain task or prefix."""
    return "tasks/retrain" if spec.search_ref else manifests.pretrain_prefix(name, spec)


class PretrainReconciler(ResourceReconciler):
    """Reconciles one Pretrain body with the cluster and the store."""

    def __init__(self, body: Mapping[str, Any], deps: Deps) -> None:
        super().__init__(body, deps)
        #: The retry token acted on in this reconciliation (the Pretrain had failed), if any.
        self.retrying: str | None = None
        #: Deletions to make once status is written (a restart is counted before its Job goes).
        self.after_patch: list[Callable[[], None]] = []

    def _fail(self, reason: str, message: str) -> None:
        self.status["phase"] = "Failed"
        self._condition("Failed", True, reason, message)
        self._condition("Ready", False, reason, message)
        self._terminal("Failed", reason, message)
        if self.old.get("phase") != "Failed":
            self.deps.post_event(self.body, "Warning", reason, message)

    def run(self) -> None:
        phase = self.old.get("phase")
        token = self._retry_token()
        if token is not None:  # acted on once, whatever the phase
            self.status["retryToken"] = token
            if phase == "Failed":
                self.retrying = token
            else:
                message = f"{names.RETRY_ANNOTATION}={token}: not failed, nothing to retry"
                self.deps.post_event(self.body, "Normal", "Retry", message)
        if phase == "Succeeded" or (
            phase == "Failed"
            and self.retrying is None
            and self.old.get("observedGeneration") == self.generation
        ):
            if token is not None:
                self._patch()
            return
        try:
            spec = parse_config(PretrainSpec, dict(self.body.get("spec") or {}), source="spec")
        except ConfigError as error:
            self._condition("SpecValid", False, "InvalidSpec", str(error))
            self._fail("InvalidSpec", str(error))
            self._patch()
            return
        self._condition("SpecValid", True, "Valid", "spec is valid")
        try:
            store = self._open_store(spec.storage)
            prefix = run_prefix(self.name, spec)
            if not spec.search_ref and not store.exists(prefixed_key(prefix, CONFIG_NAME)):
                store.write_json(
                    prefixed_key(prefix, CONFIG_NAME), spec.to_config().model_dump(mode="json")
                )
            startable = self._check_secret(spec.storage, store)
            self._advance(spec, store, prefix, startable)
        except (StoreUnavailable, StoreError) as error:
            # Said in status and an Event, then raised: counted, logged and retried later.
            self._storage_failed(error)
            self._block_ready()
            self.status.pop("retryToken", None)  # a retry not made yet: next time
            self._patch()
            raise
        self._patch()
        for action in self.after_patch:
            action()

    def _block_ready(self) -> None:
        """Ready=False saying why, while StorageReady or WorkersHealthy is False."""
        blocked = self.blocked()
        if blocked is not None and self.status.get("phase", self.old.get("phase")) not in (
            "Succeeded",
            "Failed",
        ):
            self._condition("Ready", False, *blocked)

    def _advance(
        self, spec: PretrainSpec, store: ArtifactStore, prefix: str, startable: bool
    ) -> None:
        """The Job (not while `startable` is False: the credentials Secret is missing),
        WorkersHealthy from its pods while it runs, and status from the store."""
        kube, settings = self.deps.kube, self.deps.settings
        job_name = names.pretrain_job_name(self.name)
        self.status["jobName"] = job_name
        group = spec.distributed.nodes > 1
        result = read_optional(store, prefixed_key(prefix, RESULT_NAME))
        job = kube.get("batch/v1", "jobs", self.namespace, job_name)
        if self.retrying is not None and job is not None and result is None:
            self._delete_job(group)
            self.status.update(restarts=0, restartedJobUid=None)
            message = f"{names.RETRY_ANNOTATION}={self.retrying}: Job {job_name} starts again"
            self.deps.post_event(self.body, "Normal", "Retry", message)
        if result is None and job is not None and (job_deleting(job) or self.after_patch):
            job = None  # on its way out; created again once gone
            self.status["phase"] = "Running" if self.old.get("phase") == "Running" else "Pending"
            self._condition("Ready", False, "Restarting", f"Job {job_name} is being replaced")
            self._condition("Failed", False, "NoFailure")
            self._terminal(self.status["phase"], "InProgress")
            return
        state = job_state(job) if job is not None else None
        self._check_workers(
            {names.LABEL_PRETRAIN: manifests.label_value(self.name)}, state == JOB_ACTIVE
        )
        if result is None and job is None and startable:
            try:
                if spec.distributed.nodes > 1:
                    kube.create(manifests.pretrain_service(self.body, spec))
                created = manifests.pretrain_job(self.body, spec, settings)
                if kube.create(created):
                    message = f"created Job {job_name}"
                    self.deps.post_event(self.body, "Normal", "JobCreated", message)
                if job_state(created) == JOB_SUSPENDED:  # created suspended, for Kueue
                    state = JOB_SUSPENDED
            except KubeError as error:
                if not refused(error):
                    raise
                self._fail(INVALID_OBJECT, f"the API server refused Job {job_name}: {error}")
                return
        progress = read_optional(store, prefixed_key(prefix, PROGRESS_NAME))
        epoch, epochs = number(progress, "epoch"), number(progress, "epochs")
        self.status["epoch"] = int(epoch) if epoch is not None else None
        self.status["epochs"] = int(epochs) if epochs is not None else spec.optim.epochs
        self.status["loss"] = number(progress, "loss")
        waiting = result is None and state == JOB_SUSPENDED
        self._queued([job_name] if waiting else [], spec.resources.queue)
        if result is not None:
            self.status["phase"] = "Succeeded"
            self.status["loss"] = number(result, "loss", "final_loss") or self.status["loss"]
            self.status["rotationAccuracy"] = number(result, "rotation_accuracy")
            checkpoint = result.get("checkpoint") if isinstance(result, dict) else None
            self.status["checkpoint"] = (
                checkpoint
                if isinstance(checkpoint, str) and "://" in checkpoint
                else store.url(prefixed_key(prefix, CHECKPOINT_NAME))
            )
            self._condition(
                "Ready", True, "Succeeded", f"checkpoint at {self.status['checkpoint']}"
            )
            self._condition("Failed", False, "NoFailure")
            self._terminal("Succeeded", "Succeeded", f"checkpoint at {self.status['checkpoint']}")
            if self.old.get("phase") != "Succeeded":
                self.deps.post_event(self.body, "Normal", "Succeeded", "training finished")
            return
        if state == JOB_FAILED and job is not None:
            reason, message = classify_job_failure(job)
            if reason != "TaskFailed":  # a deadline, bad input: the same again would fail too
                self._fail(reason, message)
            elif group and self._restarts_before(job) < spec.max_retries:
                self._restart(job, message, spec)
            else:
                if group:
                    message += f", after {self._restarts_before(job)} restarts of all ranks"
                self._fail("JobFailed", message)
        elif state == JOB_SUCCEEDED:
            self._fail(
                "NoResult",
                f"Job {job_name} succeeded but wrote no {prefixed_key(prefix, RESULT_NAME)}",
            )
        else:
            self.status["phase"] = "Pending" if state in (None, JOB_SUSPENDED) else "Running"
            self._condition("Ready", False, "Training", f"Job {job_name} {state or 'starting'}")
            self._condition("Failed", False, "NoFailure")
            self._terminal(self.status["phase"], "InProgress")
            self._block_ready()

    def _restarts_before(self, job: Mapping[str, Any]) -> int:
        """Restarts before `job` failed (its own restart excluded when already counted)."""
        restarts = int(self.old.get("restarts") or 0)
        counted = job["metadata"].get("uid") == self.old.get("restartedJobUid")
        return restarts - 1 if counted else restarts

    def _restart(self, job: Mapping[str, Any], why: str, spec: PretrainSpec) -> None:
        """Start all ranks again: count the restart (once per failed Job), then delete the Job
        (after status is written) so that the next reconciliation creates it again."""
        uid = job["metadata"].get("uid")
        restarts = int(self.old.get("restarts") or 0)
        if uid != self.old.get("restartedJobUid"):
            restarts += 1
            self.status.update(restarts=restarts, restartedJobUid=uid)
            self.deps.post_event(
                self.body,
                "Warning",
                "RanksRestarted",
                f"{why}; all {spec.distributed.nodes} ranks start again "
                f"(restart {restarts} of at most {spec.max_retries})",
            )
        self._delete_job(group=True)
        self.status["phase"] = "Running"
        message = f"a rank failed; all ranks start again (restart {restarts})"
        self._condition("Ready", False, "Restarting", message)
        self._condition("Failed", False, "NoFailure")
        self._terminal("Running", "InProgress", message)

    def _delete_job(self, group: bool) -> None:
        """Delete the Job once status is written; foreground for a group, so that no rank of
        the old Job still runs when the new one starts."""
        name = names.pretrain_job_name(self.name)
        propagation = "Foreground" if group else "Background"

        def delete() -> None:
            self.deps.kube.delete("batch/v1", "jobs", self.namespace, name, propagation)

        self.after_patch.append(delete)

    def _patch(self) -> None:
        if merge_patch(self.old, self.status) != self.old:
            self.deps.kube.patch_status(
                names.API_VERSION, names.PRETRAIN_PLURAL, self.namespace, self.name, self.status
            )
