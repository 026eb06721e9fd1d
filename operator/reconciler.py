"""What the AugmentSearch and Pretrain reconcilers share: identity, old status, conditions, and
the checks of what a run needs from outside (the store, the credentials Secret, startable pods).

Two conditions report those checks (see docs/operator.md):

- `StorageReady`: False while the store's bucket is missing (`BucketNotFound`), its endpoint does
  not answer (`EndpointUnreachable`), another store error persists (`StoreUnavailable`: access
  denied, say) or the workers' credentials Secret does not exist (`SecretNotFound`; no Job is
  created until it does).
- `WorkersHealthy`: False while a pod of the resource's Jobs cannot start; the reason is the
  kubelet's (`CreateContainerConfigError`, `ImagePullBackOff`, ...), the message names each pod.

A third, `Queued`, is True while Jobs of the resource are suspended (Kueue has not admitted
them: `resources.queue`), with the Jobs and the LocalQueue; it does not block progress.

A Warning Event is posted when such a condition turns False or names a new cause, not on every
reconciliation; the condition clears on the first reconciliation after the cause is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from selfaugment.operator import names
from selfaugment.operator.kube import KubeError
from selfaugment.operator.runtime import Deps, StoreUnavailable, check_store, open_run_store
from selfaugment.operator.status import reported_faults, set_condition, stuck_pods
from selfaugment.trainer.spec import StorageConfig
from selfaugment.trainer.store import ArtifactStore, StoreError

#: HTTP statuses of an object the API server refuses as invalid (422 Invalid: a field fails
#: validation; 400 BadRequest: it cannot be decoded): creating it again would fail the same way.
REFUSED_STATUSES = frozenset({400, 422})
#: Condition reason of a run whose Job (or retraining Pretrain) the API server refused.
INVALID_OBJECT = "InvalidJob"
QUEUED = "Queued"
STORAGE_READY = "StorageReady"
WORKERS_HEALTHY = "WorkersHealthy"
#: Stuck pods named in a WorkersHealthy condition (and given an Event each); the rest are counted.
MAX_STUCK_LISTED = 5
_log = logging.getLogger("selfaugment.operator")
_warned: set[tuple[str, int]] = set()


def refused(error: KubeError) -> bool:
    """The API server refused the object itself (fix the spec), not a passing failure."""
    return error.status in REFUSED_STATUSES


def _warn_once(what: str, error: KubeError) -> None:
    """Log a check that cannot run (RBAC without the right, an API without the resource) once
    per process and HTTP status, instead of on every reconciliation."""
    if (what, error.status) not in _warned:
        _warned.add((what, error.status))
        _log.warning("%s: %s; this check is skipped", what, error)


class ResourceReconciler:
    """Base of a reconciler for one custom-resource body (status is written whole)."""

    def __init__(self, body: Mapping[str, Any], deps: Deps) -> None:
        self.body = body
        self.deps = deps
        self.name: str = body["metadata"]["name"]
        self.namespace: str = body["metadata"]["namespace"]
        self.generation: int | None = body["metadata"].get("generation")
        self.old: dict[str, Any] = dict(body.get("status") or {})
        self.status: dict[str, Any] = {
            "conditions": list(self.old.get("conditions") or []),
            "observedGeneration": self.generation,
        }

    def _condition(self, kind: str, status: bool, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status["conditions"], kind, status, reason, message, self.generation
        )

    def _event(self, kind: str, reason: str, message: str) -> None:
        self.deps.post_event(self.body, kind, reason, message)

    def _was(self, kind: str) -> dict[str, Any] | None:
        """The condition `kind` as the resource's status had it before this reconciliation."""
        return next((c for c in self.old.get("conditions") or [] if c.get("type") == kind), None)

    def _retry_token(self) -> str | None:
        """A value of the selfaugment.io/retry annotation not acted on yet, else None."""
        annotations = self.body["metadata"].get("annotations") or {}
        token = annotations.get(names.RETRY_ANNOTATION)
        if isinstance(token, str) and token and token != self.old.get("retryToken"):
            return token
        return None

    def _terminal(self, phase: str, reason: str, message: str = "") -> None:
        """The conditions generic tools wait on: `Finished` is True once the run ended either
        way (so `kubectl wait --for=condition=Finished` returns on failure too), `Succeeded`
        says whether it succeeded; `Failed` is set beside them."""
        ended = phase in ("Succeeded", "Failed")
        self._condition("Finished", ended, phase if ended else "InProgress", message)
        self._condition("Succeeded", phase == "Succeeded", reason, message)

    def _queued(self, suspended: list[str], queue: str | None) -> None:
        """`Queued` from the resource's suspended Jobs: True while any waits (for Kueue to
        admit it, with `resources.queue`), False once none does; a Normal Event when a wait
        starts."""
        if not suspended:
            reason = "Admitted" if queue else "NotQueued"
            self._condition(QUEUED, False, reason, "no Job waits for admission")
            return
        listed = ", ".join(suspended[:MAX_STUCK_LISTED])
        if len(suspended) > MAX_STUCK_LISTED:
            listed += f" and {len(suspended) - MAX_STUCK_LISTED} more"
        if queue:
            reason = "WaitingForAdmission"
            message = f"Jobs {listed} are suspended until Kueue admits them (LocalQueue {queue})"
        else:
            reason, message = "Suspended", f"Jobs {listed} are suspended"
        was = self._was(QUEUED)
        self._condition(QUEUED, True, reason, message)
        if was is None or was.get("status") != "True":
            self._event("Normal", QUEUED, message)

    def blocked(self) -> tuple[str, str] | None:
        """(reason, message) of the first False StorageReady or WorkersHealthy condition set."""
        for kind in (STORAGE_READY, WORKERS_HEALTHY):
            condition = next((c for c in self.status["conditions"] if c["type"] == kind), None)
            if condition is not None and condition["status"] == "False":
                return condition["reason"], condition["message"]
        return None

    # -- the store and the credentials Secret ---------------------------------------------

    def _open_store(self, storage: StorageConfig) -> ArtifactStore:
        """The run's store (opened with the run's own credentials Secret), once its bucket
        answered; StoreUnavailable (with a reason) if not."""
        store = open_run_store(storage, self.deps.settings, self.deps.kube, self.namespace)
        check_store(store)
        return store

    def _storage_failed(self, error: StoreUnavailable | StoreError) -> None:
        """StorageReady=False for a store that failed; a Warning Event when that is news."""
        reason = error.reason if isinstance(error, StoreUnavailable) else "StoreUnavailable"
        self._storage_blocked(reason, str(error))
        if not self.old.get("phase"):
            self.status["phase"] = "Pending"

    def _storage_blocked(self, reason: str, message: str) -> None:
        was = self._was(STORAGE_READY)
        self._condition(STORAGE_READY, False, reason, message)
        if (
            was is None
            or was.get("status") != "False"
            or (was.get("reason"), was.get("message")) != (reason, message)
        ):
            self._event("Warning", reason, message)

    def _check_secret(self, storage: StorageConfig, store: ArtifactStore) -> bool:
        """StorageReady from the store (it answered) and the workers' credentials Secret:
        False, with condition and Event naming the Secret, while the Secret does not exist."""
        resolved = self.deps.settings.resolve_storage(storage)
        secret = resolved.secret_ref
        message = f"store {store.uri} is reachable"
        if secret:
            try:
                found = self.deps.kube.get_metadata("v1", "secrets", self.namespace, secret)
            except KubeError as error:
                if error.status not in (401, 403):
                    raise
                _warn_once("checking that credentials Secrets exist", error)
            else:
                field = (
                    "spec.storage.secretRef"
                    if storage.secret_ref
                    else "the operator's SELFAUGMENT_S3_SECRET"
                )
                if found is None:
                    self._storage_blocked(
                        "SecretNotFound",
                        f"Secret {secret} ({field}) not found in namespace {self.namespace}: "
                        "workers would not start without their store credentials; Jobs are "
                        "created once it exists",
                    )
                    return False
                message += f"; Secret {secret} exists"
        was = self._was(STORAGE_READY)
        self._condition(STORAGE_READY, True, "Available", message)
        if was is not None and was.get("status") == "False":
            self._event("Normal", STORAGE_READY, message)
        return True

    # -- pods that cannot start --------------------------------------------------------------

    def _check_workers(self, labels: Mapping[str, str], active: bool) -> None:
        """WorkersHealthy from the pods with `labels` (read only while a Job is `active`)."""
        stuck = []
        if active:
            try:
                pods = self.deps.kube.list("v1", "pods", self.namespace, labels)
            except KubeError as error:
                if error.status not in (401, 403, 404):
                    raise
                _warn_once("reading the pods of Jobs", error)
                return
            stuck = stuck_pods(pods)
        if not stuck:
            self._condition(WORKERS_HEALTHY, True, "NoStuckPods", "")
            return
        listed = stuck[:MAX_STUCK_LISTED]
        message = "; ".join(pod.line() for pod in listed)
        if len(stuck) > len(listed):
            message += f"; and {len(stuck) - len(listed)} more pods"
        was = self._was(WORKERS_HEALTHY)
        self._condition(WORKERS_HEALTHY, False, listed[0].reason, message)
        reported = (
            reported_faults(was.get("message") or "")
            if was is not None and was.get("status") == "False"
            else set()
        )
        for pod in listed:
            if pod.fault not in reported:
                self._event("Warning", pod.reason, pod.line())
