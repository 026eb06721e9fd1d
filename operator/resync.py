"""The periodic resync and the leader-election loop: two daemon threads beside kopf.

The resync replaces kopf timers, which put a finalizer on every resource: with the operator
scaled to zero or uninstalled, deleting a resource, its namespace or the CRD would then hang
until someone removed the finalizer by hand. The operator needs no clean-up of its own on
deletion (children carry ownerReferences; results stay in the store), so nothing of it stays
on a resource. Every `interval` seconds the resync lists the AugmentSearches and Pretrains
(which also tells /healthz that the API answers and lets it compare the listing with what the
watch delivered), probes the default store endpoint, and on the leader reconciles every run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from selfaugment.operator import names
from selfaugment.operator.health import Health, probe_endpoint
from selfaugment.operator.kube import Kube, KubeError
from selfaugment.operator.search import retry_pending

_log = logging.getLogger("selfaugment.operator")
#: Reconciliations of one resync round that run at once (they wait on the store and the API).
RESYNC_THREADS = 8
Reconcile = Callable[[Mapping[str, Any]], None]


class Elector(Protocol):
    """What the loops need of leader.LeaderElector (or leader.AlwaysLeader)."""

    holder: str | None

    @property
    def leading(self) -> bool: ...

    @property
    def retry_period(self) -> float: ...

    def step(self) -> bool: ...

    def release(self) -> None: ...


def settled(body: Mapping[str, Any]) -> bool:
    """A run that ended, for this spec, with no retry asked for: nothing to reconcile."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    return (
        status.get("phase") in ("Succeeded", "Failed")
        and status.get("observedGeneration") == generation
        and not retry_pending(body)
    )


class Loops:
    """The leader-election loop (every `elector.retry_period`) and the resync loop."""

    def __init__(
        self,
        kube: Kube,
        elector: Elector,
        health: Health,
        interval: float,
        namespaces: Sequence[str],
        reconcilers: Mapping[str, Reconcile],
        store_endpoint: str | None,
    ) -> None:
        self.kube = kube
        self.elector = elector
        self.health = health
        self.interval = interval
        self.namespaces = list(namespaces)
        self.reconcilers = dict(reconcilers)  # plural -> reconcile(body)
        self.store_endpoint = store_endpoint
        self.stop = threading.Event()
        self.wake = threading.Event()  # resync now (leadership was just gained)
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.lead_once()
        for target, name in ((self._lead, "leader-election"), (self._resync, "resync")):
            self.threads.append(threading.Thread(target=target, name=name, daemon=True))
            self.threads[-1].start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop both loops, let a resync round in progress finish, then give the Lease up (so
        that the next leader never reconciles beside this one)."""
        self.stop.set()
        self.wake.set()
        for thread in self.threads:
            thread.join(timeout)
        self.elector.release()

    # -- leader election -------------------------------------------------------------------

    def lead_once(self) -> None:
        was = self.elector.leading
        leading = self.elector.step()
        self.health.leader = {"leading": leading, "holder": self.elector.holder}
        if leading and not was:
            self.wake.set()

    def _lead(self) -> None:
        while not self.stop.wait(self.elector.retry_period):
            self.lead_once()

    # -- resync ----------------------------------------------------------------------------

    def _resync(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            if self.stop.is_set():
                return
            self.resync_once()

    def resync_once(self) -> None:
        """List, check, and (on the leader) reconcile every run that has not ended."""
        for plural, reconcile in self.reconcilers.items():
            try:
                items = self._list(plural)
            except KubeError as error:
                self.health.list_failed(str(error))
                _log.warning("resync: listing %s failed: %s", plural, error)
                continue
            self.health.listed(plural, items)
            if not self.elector.leading:
                continue
            # Runs that ended return at once (their metrics are kept); the others in parallel.
            with ThreadPoolExecutor(RESYNC_THREADS, thread_name_prefix="resync") as pool:
                for body in items:
                    pool.submit(self._reconcile, reconcile, body)
        if self.store_endpoint:
            self.health.store = probe_endpoint(self.store_endpoint)

    @staticmethod
    def _reconcile(reconcile: Reconcile, body: Mapping[str, Any]) -> None:
        try:
            reconcile(body)
        except Exception as error:  # counted and logged by the reconcile wrapper
            _log.debug("resync of %s: %s", body["metadata"].get("name"), error)

    def _list(self, plural: str) -> list[dict[str, Any]]:
        if not self.namespaces:
            return self.kube.list(names.API_VERSION, plural, None, {})
        items = []
        for namespace in self.namespaces:
            items += self.kube.list(names.API_VERSION, plural, namespace, {})
        return items
