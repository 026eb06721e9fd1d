"""kopf handlers: thin adapters from watch events and timers to the reconcilers.

Handlers are synchronous (kopf runs them in a thread pool: the store and Kubernetes clients
block). A per-object lock serialises the reconciliations of one resource that a watch event,
a Job event and a timer may start at the same moment.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf

from selfaugment.operator import names
from selfaugment.operator.kube import Kube, KubeError
from selfaugment.operator.observe import SearchGauges, serve
from selfaugment.operator.pretrain import PretrainReconciler
from selfaugment.operator.runtime import Deps, StoreUnavailable
from selfaugment.operator.search import SearchReconciler
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.metrics import create_metrics
from selfaugment.trainer.store import StoreError

G, V = names.GROUP, names.VERSION
TIMER_INTERVAL = OperatorSettings.from_env().timer_interval
_log = logging.getLogger("selfaugment.operator")


class _Runtime:
    """Process-wide state created at startup."""

    deps: Deps
    gauges: SearchGauges
    locks: dict[tuple[str, str, str], threading.Lock]
    locks_guard = threading.Lock()

    def lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self.locks_guard:
            return self.locks.setdefault((kind, namespace, name), threading.Lock())


RUNTIME = _Runtime()


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    raw = cast(kopf.RawBody, copy.deepcopy(dict(body)))
    kopf.event(kopf.Body(raw), type=kind, reason=reason, message=message[:1000])


@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Persistence under our own prefix, watch timeouts, clients, metrics endpoint."""
    settings.persistence.finalizer = f"{G}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=G)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=G)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.INFO
    options = OperatorSettings.from_env()
    metrics = create_metrics()
    RUNTIME.deps = Deps(Kube(), options, metrics, _post_event)
    RUNTIME.gauges = SearchGauges(metrics)
    RUNTIME.locks = {}
    serve(metrics, options.metrics_port)
    _log.info("metrics and /healthz on port %d", options.metrics_port)


def _guarded(kind: str, key: tuple[str, str], work: Callable[[], None]) -> None:
    """Run one reconciliation: serialised per object, timed, errors counted and retried later."""
    metrics = RUNTIME.deps.metrics
    started = time.perf_counter()
    try:
        with RUNTIME.lock(kind, *key):
            work()
    except (StoreUnavailable, StoreError, KubeError) as error:
        metrics.reconcile_errors.labels(kind).inc()
        raise kopf.TemporaryError(f"{kind} {key[0]}/{key[1]}: {error}", delay=10) from None
    except Exception:
        metrics.reconcile_errors.labels(kind).inc()
        raise
    finally:
        metrics.reconcile_duration.labels(kind).observe(time.perf_counter() - started)


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def reconcile_search(body: Mapping[str, Any]) -> None:
    raw = _plain(body)
    meta = raw["metadata"]
    if meta.get("deletionTimestamp"):
        return
    key = (meta["namespace"], meta["name"])

    def work() -> None:
        # Re-read under the lock: the body of a queued event may be stale by now.
        fresh = RUNTIME.deps.kube.get(names.API_VERSION, names.SEARCH_PLURAL, *key) or raw
        reconciler = SearchReconciler(fresh, RUNTIME.deps)
        reconciler.run()
        RUNTIME.gauges.record(*key, {**reconciler.old, **reconciler.status}, reconciler.observed)

    _guarded("AugmentSearch", key, work)


def reconcile_pretrain(body: Mapping[str, Any]) -> None:
    raw = _plain(body)
    meta = raw["metadata"]
    if meta.get("deletionTimestamp"):
        return
    key = (meta["namespace"], meta["name"])

    def work() -> None:
        fresh = RUNTIME.deps.kube.get(names.API_VERSION, names.PRETRAIN_PLURAL, *key) or raw
        PretrainReconciler(fresh, RUNTIME.deps).run()

    _guarded("Pretrain", key, work)
    search = (raw.get("spec") or {}).get("search_ref")
    if search:  # the owning search moves on as soon as its retraining changes
        owner = RUNTIME.deps.kube.get(names.API_VERSION, names.SEARCH_PLURAL, key[0], search)
        if owner is not None:
            reconcile_search(owner)


def _needs_reconcile(body: kopf.Body, event: str | None) -> bool:
    """New objects, the first listing after a (re)start, and spec changes; not our own status
    patches (Job events and the timer cover progress)."""
    status = body.get("status") or {}
    return event in (None, "ADDED") or status.get("observedGeneration") != body.metadata.get(
        "generation"
    )


@kopf.on.event(G, V, names.SEARCH_PLURAL)
def augmentsearch_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if type == "DELETED":
        RUNTIME.gauges.forget(body.metadata.namespace or "", body.metadata.name or "")
    elif _needs_reconcile(body, type):
        reconcile_search(body)


@kopf.on.timer(G, V, names.SEARCH_PLURAL, interval=TIMER_INTERVAL, initial_delay=TIMER_INTERVAL)
def augmentsearch_timer(body: kopf.Body, **_: Any) -> None:
    reconcile_search(body)


@kopf.on.event(G, V, names.PRETRAIN_PLURAL)
def pretrain_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if type != "DELETED" and _needs_reconcile(body, type):
        reconcile_pretrain(body)


@kopf.on.timer(G, V, names.PRETRAIN_PLURAL, interval=TIMER_INTERVAL, initial_delay=TIMER_INTERVAL)
def pretrain_timer(body: kopf.Body, **_: Any) -> None:
    reconcile_pretrain(body)


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_MANAGED: names.MANAGER})
def job_event(body: kopf.Body, **_: Any) -> None:
    """A Job of ours changed: reconcile the resource that owns it."""
    namespace = body.metadata.namespace or ""
    for owner in body.metadata.get("ownerReferences") or []:
        plural = {
            names.SEARCH_KIND: names.SEARCH_PLURAL,
            names.PRETRAIN_KIND: names.PRETRAIN_PLURAL,
        }.get(owner.get("kind"))
        if plural is None:
            continue
        parent = RUNTIME.deps.kube.get(names.API_VERSION, plural, namespace, owner["name"])
        if parent is None:
            continue
        if plural == names.SEARCH_PLURAL:
            reconcile_search(parent)
        else:
            reconcile_pretrain(parent)
