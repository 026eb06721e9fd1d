"""Reconciliation of one Pretrain: config in the store -> one Job (indexed for torchrun) -> status.

Multi-node training uses a batch/v1 indexed Job with a headless Service for rendezvous rather
than Kubeflow's PyTorchJob: it needs no extra operator on the cluster, Kueue admits batch/v1 Jobs
natively, and `torchrun --node-rank=$(JOB_COMPLETION_INDEX)` gets a stable rank from the index.
"""

from __future__ import annotations

from selfaugment.operator import manifests, names
from selfaugment.operator.reconciler import ResourceReconciler
from selfaugment.operator.runtime import StoreUnavailable, read_optional
from selfaugment.operator.status import (
    JOB_ACTIVE,
    JOB_FAILED,
    JOB_SUCCEEDED,
    JOB_SUSPENDED,
    job_failure,
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

    def _fail(self, reason: str, message: str) -> None:
        self.status["phase"] = "Failed"
        self._condition("Failed", True, reason, message)
        self._condition("Ready", False, reason, message)
        if self.old.get("phase") != "Failed":
            self.deps.post_event(self.body, "Warning", reason, message)

    def run(self) -> None:
        phase = self.old.get("phase")
        if phase == "Succeeded" or (
            phase == "Failed" and self.old.get("observedGeneration") == self.generation
        ):
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
            self._patch()
            raise
        self._patch()

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
        result = read_optional(store, prefixed_key(prefix, RESULT_NAME))
        job = kube.get("batch/v1", "jobs", self.namespace, job_name)
        state = job_state(job) if job is not None else None
        self._check_workers(
            {names.LABEL_PRETRAIN: manifests.label_value(self.name)}, state == JOB_ACTIVE
        )
        if result is None and job is None and startable:
            if spec.distributed.nodes > 1:
                kube.create(manifests.pretrain_service(self.body, spec))
            if kube.create(manifests.pretrain_job(self.body, spec, settings)):
                self.deps.post_event(self.body, "Normal", "JobCreated", f"created Job {job_name}")
        progress = read_optional(store, prefixed_key(prefix, PROGRESS_NAME))
        epoch, epochs = number(progress, "epoch"), number(progress, "epochs")
        self.status["epoch"] = int(epoch) if epoch is not None else None
        self.status["epochs"] = int(epochs) if epochs is not None else spec.optim.epochs
        self.status["loss"] = number(progress, "loss")
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
            if self.old.get("phase") != "Succeeded":
                self.deps.post_event(self.body, "Normal", "Succeeded", "training finished")
            return
        if state == JOB_FAILED and job is not None:
            self._fail("JobFailed", f"Job {job_name} failed: {job_failure(job)}")
        elif state == JOB_SUCCEEDED:
            self._fail(
                "NoResult",
                f"Job {job_name} succeeded but wrote no {prefixed_key(prefix, RESULT_NAME)}",
            )
        else:
            self.status["phase"] = "Pending" if state in (None, JOB_SUSPENDED) else "Running"
            self._condition("Ready", False, "Training", f"Job {job_name} {state or 'starting'}")
            self._condition("Failed", False, "NoFailure")
            self._block_ready()

    def _patch(self) -> None:
        if merge_patch(self.old, self.status) != self.old:
            self.deps.kube.patch_status(
                names.API_VERSION, names.PRETRAIN_PLURAL, self.namespace, self.name, self.status
            )
