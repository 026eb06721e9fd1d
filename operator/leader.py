"""Leader election on a coordination.k8s.io/v1 Lease, so that two operator replicas can run: one
reconciles, the other stands by and takes over when the leader's Lease lapses.

Why a Lease rather than kopf's peering: kopf pauses *every* operator when it sees another of the
same priority (its peering keeps a developer's operator from fighting the deployed one; it is not
an election), it needs kopf's own peering CRDs in the cluster, and the operator's periodic resync
runs outside kopf's handlers, where kopf's pause is not visible. A Lease is what
kube-controller-manager and controller-runtime use; it needs no CRD and only `get`, `create` and
`patch` on one Lease in the operator's namespace. kopf itself runs standalone.

The algorithm is client-go's (tools/leaderelection):

- the holder renews `spec.renewTime` every `duration / 7.5` seconds (2 s of 15, client-go's
  retry period), so that a slow API answer or two cannot cost it the Lease;
- a candidate takes the Lease over when it has seen the same record unchanged for a whole
  `leaseDurationSeconds`, timed by its own monotonic clock (clocks of nodes need not agree);
- every write carries the resourceVersion it read (a merge-patch precondition), so of two
  candidates only one can win, the other gets 409;
- a leader that could not renew for `2/3 * duration` stops acting, before anyone else may start;
- on a clean shutdown the leader gives the Lease up, so a new pod (a rolling update, a second
  replica) takes over at once instead of after `duration`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from selfaugment.operator.kube import Kube, KubeError

LEASES = ("coordination.k8s.io/v1", "leases")
_log = logging.getLogger("selfaugment.operator")


def own_identity() -> str:
    """The pod's name (POD_NAME from the Downward API), else host and a random suffix."""
    pod = os.environ.get("POD_NAME")
    return pod or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _micro_time() -> str:
    """A metav1.MicroTime, as Leases store their times."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires, renews and releases one Lease; `step()` is called every `retry_period`."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.clock = clock
        #: The holder of the Lease as last read (None: nobody).
        self.holder: str | None = None
        self._record: tuple[Any, ...] | None = None
        self._record_seen_at = 0.0
        self._renewed_at: float | None = None

    @property
    def retry_period(self) -> float:
        return self.duration / 7.5

    @property
    def leading(self) -> bool:
        """True while this process renewed the Lease within the last 2/3 of its duration."""
        if self._renewed_at is None:
            return False
        return self.clock() - self._renewed_at < self.duration * 2 / 3

    def step(self) -> bool:
        """Acquire or renew the Lease once; whether this process leads afterwards."""
        now = self.clock()
        was_leading = self.leading
        try:
            lease = self.kube.get(*LEASES, self.namespace, self.name)
            if lease is None:
                if self.kube.create(self._new_lease()):
                    self._won(now)
            elif self._may_take(lease, now):
                self.kube.patch(*LEASES, self.namespace, self.name, self._renewal(lease))
                self._won(now)
        except KubeError as error:
            if error.status != 409:  # 409: another candidate wrote first
                _log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, error)
        leading = self.leading
        if leading != was_leading:
            _log.info(
                "leader election: %s %s the Lease %s/%s",
                self.identity,
                "holds" if leading else "lost",
                self.namespace,
                self.name,
            )
        return leading

    def release(self) -> None:
        """Give the Lease up (on shutdown) if this process holds it."""
        if not self.leading:
            return
        self._renewed_at = None
        try:
            lease = self.kube.get(*LEASES, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            patch = {
                "metadata": {"resourceVersion": lease["metadata"].get("resourceVersion")},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
            }
            self.kube.patch(*LEASES, self.namespace, self.name, patch)
        except KubeError as error:
            _log.warning("leader election: could not release the Lease: %s", error)

    # -- internals ---------------------------------------------------------------------------

    def _won(self, now: float) -> None:
        self._renewed_at = now
        self.holder = self.identity

    def _may_take(self, lease: Mapping[str, Any], now: float) -> bool:
        """Ours, free, or unchanged for a whole lease duration as seen from here."""
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        self.holder = holder
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._record:
            self._record, self._record_seen_at = record, now
        if holder is None or holder == self.identity:
            return True
        lapse = float(spec.get("leaseDurationSeconds") or self.duration)
        return now - self._record_seen_at >= lapse

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = _micro_time()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.duration)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _new_lease(self) -> dict[str, Any]:
        return {
            "apiVersion": LEASES[0],
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(0, None),
        }

    def _renewal(self, lease: Mapping[str, Any]) -> dict[str, Any]:
        spec = lease.get("spec") or {}
        ours = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        return {
            "metadata": {"resourceVersion": lease["metadata"].get("resourceVersion")},
            "spec": self._spec(transitions, spec.get("acquireTime") if ours else None),
        }


class AlwaysLeader:
    """Leader election switched off (SELFAUGMENT_LEADER_ELECTION=false): this process acts."""

    holder: str | None = None
    leading = True
    retry_period = 5.0

    def step(self) -> bool:
        return True

    def release(self) -> None:
        return None
