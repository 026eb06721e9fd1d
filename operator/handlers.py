"""kopf handlers: thin adapters from watch events to the reconcilers, and the operator's
start and stop.

Handlers are synchronous (kopf runs them in a thread pool: the store and Kubernetes clients
block). The reconciliations of one resource that watch events, Job events and the periodic
resync ask for run one at a time, and are coalesced: while one waits for its turn, further
requests are dropped, because the waiting one reads the state afresh when it starts. A burst
of Job events therefore costs at most one running and one waiting reconciliation per resource,
and never holds the thread pool's threads waiting on one resource's lock.

No handler needs a finalizer: the periodic reconciliation is the resync thread of
operator/resync.py rather than a kopf timer (kopf puts a finalizer on every resource that has a
timer, so deleting a resource, its namespace or the CRD hung while the operator was not
running). kopf still knows the finalizer name that earlier versions used, and removes it from
resources that carry it. Only the leader (operator/leader.py) reconciles; every replica watches,
so that a standby can take over at once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from selfaugment.operator import names
from selfaugment.operator.events import EventPoster
from selfaugment.operator.health import Health
from selfaugment.operator.kube import Kube, KubeError
from selfaugment.operator.leader import AlwaysLeader, LeaderElector, own_identity
from selfaugment.operator.observe import SearchGauges, serve
from selfaugment.operator.pretrain import PretrainReconciler
from selfaugment.operator.resync import Loops, settled
from selfaugment.operator.runtime import Deps, StoreUnavailable
from selfaugment.operator.search import SearchReconciler, retry_pending
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.metrics import create_metrics
from selfaugment.trainer.store import StoreError

G, V = names.GROUP, names.VERSION
#: Threads of kopf's executor, which runs the synchronous handlers.
EXECUTOR_THREADS = 16
_log = logging.getLogger("selfaugment.operator")


class _Turn:
    """One resource's reconciliations: one runs (`lock`), at most one waits (`waiting`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.guard = threading.Lock()
        self.waiting = False


class _Runtime:
    """Process-wide state created at startup."""

    deps: Deps
    gauges: SearchGauges
    health: Health
    loops: Loops
    #: Namespaces the operator watches (empty: all), set by __main__ from --namespace.
    namespaces: tuple[str, ...] = ()
    turns: dict[tuple[str, str, str], _Turn]
    turns_guard = threading.Lock()

    def turn(self, kind: str, namespace: str, name: str) -> _Turn:
        with self.turns_guard:
            return self.turns.setdefault((kind, namespace, name), _Turn())

    @property
    def leading(self) -> bool:
        return self.loops.elector.leading


RUNTIME = _Runtime()


@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's settings (persistence under our prefix, watch timeouts, Events under our name),
    clients, leader election, the resync, the metrics and health endpoint."""
    options = OperatorSettings.from_env()
    identity = own_identity()
    # Earlier versions' timers put this finalizer on resources; kopf removes it now.
    settings.persistence.finalizer = f"{G}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=G)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=G)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = names.MANAGER
    settings.posting.reporting_instance = identity
    settings.posting.event_name_prefix = f"{names.MANAGER}-"
    kube = Kube()
    metrics = create_metrics()
    RUNTIME.deps = Deps(kube, options, metrics, EventPoster(kube, identity))
    RUNTIME.gauges = SearchGauges(metrics)
    RUNTIME.turns = {}
    # Reconciliations block on the store and the API, not on the CPU: more than Python's
    # default of (cores + 4) threads, so that 100 searches do not queue behind each other.
    settings.execution.max_workers = EXECUTOR_THREADS
    RUNTIME.health = Health(grace=max(3 * options.timer_interval, 30.0))
    elector = (
        LeaderElector(
            kube, options.lease_namespace, options.lease_name, identity, options.lease_duration
        )
        if options.leader_election
        else AlwaysLeader()
    )
    RUNTIME.loops = Loops(
        kube,
        elector,
        RUNTIME.health,
        options.timer_interval,
        RUNTIME.namespaces,
        {names.SEARCH_PLURAL: reconcile_search, names.PRETRAIN_PLURAL: reconcile_pretrain},
        options.s3_endpoint,
    )
    RUNTIME.loops.start()  # one election round first: the initial listing is acted on
    serve(metrics, options.metrics_port, RUNTIME.health.report)
    _log.info(
        "metrics, /livez and /healthz on port %d; %s",
        options.metrics_port,
        f"leader election on Lease {options.lease_namespace}/{options.lease_name} as {identity}"
        if options.leader_election
        else "leader election off",
    )


@kopf.on.cleanup()
def operator_cleanup(**_: Any) -> None:
    """Stop the loops and give the Lease up, so that another replica takes over at once."""
    RUNTIME.loops.close()


def _guarded(kind: str, key: tuple[str, str], work: Callable[[], None]) -> None:
    """Run one reconciliation: one at a time per object and coalesced (a request is dropped
    while another waits: that one reads fresh state), timed, errors counted."""
    turn = RUNTIME.turn(kind, *key)
    with turn.guard:
        if turn.waiting:
            return
        turn.waiting = True
    metrics = RUNTIME.deps.metrics
    started = time.perf_counter()
    try:
        with turn.lock:
            with turn.guard:
                turn.waiting = False  # from here on, a new request waits for the next turn
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
    if settled(raw):  # ended: nothing to do but export its series (a new leader has none)
        RUNTIME.gauges.record(*key, raw.get("status") or {})
        return

    created: list[dict[str, Any]] = []

    def work() -> None:
        # Re-read under the lock: the body of a queued event may be stale by now.
        fresh = RUNTIME.deps.kube.get(names.API_VERSION, names.SEARCH_PLURAL, *key) or raw
        reconciler = SearchReconciler(fresh, RUNTIME.deps)
        try:
            reconciler.run()
        finally:
            created.extend(reconciler.created_pretrains)
        RUNTIME.gauges.record(*key, {**reconciler.old, **reconciler.status}, reconciler.observed)

    _guarded("AugmentSearch", key, work)
    # The retraining Pretrain's Job is created now, not when the watch delivers the new
    # Pretrain: a slow or reconnecting watch delayed it until the resync (up to a whole
    # interval; benchmarks/bench_operator.py measured the retrain Job as the slowest to start).
    # (reconcile_pretrain reads the Pretrain afresh under its lock: the body as sent will do)
    for pretrain in created:
        reconcile_pretrain(pretrain, notify_owner=False)


def reconcile_pretrain(body: Mapping[str, Any], notify_owner: bool = True) -> None:
    """Reconcile a Pretrain, then (`notify_owner`) the search that owns it, if any."""
    raw = _plain(body)
    meta = raw["metadata"]
    if meta.get("deletionTimestamp") or settled(raw):
        return
    key = (meta["namespace"], meta["name"])

    def work() -> None:
        fresh = RUNTIME.deps.kube.get(names.API_VERSION, names.PRETRAIN_PLURAL, *key) or raw
        PretrainReconciler(fresh, RUNTIME.deps).run()

    _guarded("Pretrain", key, work)
    raw_spec = raw.get("spec") or {}
    search = raw_spec.get("searchRef") or raw_spec.get("search_ref")
    if search and notify_owner:  # the owning search moves on as soon as its retraining changes
        owner = RUNTIME.deps.kube.get(names.API_VERSION, names.SEARCH_PLURAL, key[0], search)
        if owner is not None:
            reconcile_search(owner)


def _needs_reconcile(body: kopf.Body, event: str | None) -> bool:
    """New objects, the first listing after a (re)start, spec changes and a new retry token;
    not our own status patches (Job events and the resync cover progress)."""
    status = body.get("status") or {}
    return (
        event in (None, "ADDED")
        or status.get("observedGeneration") != body.metadata.get("generation")
        or retry_pending(body)
    )


def _delivered(plural: str, body: kopf.Body, event: str | None) -> None:
    key = (plural, body.metadata.namespace or "", body.metadata.name or "")
    RUNTIME.health.delivered(key, body.metadata.get("resourceVersion"), event == "DELETED")


@kopf.on.event(G, V, names.SEARCH_PLURAL)
def augmentsearch_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _delivered(names.SEARCH_PLURAL, body, type)
    if type == "DELETED":
        RUNTIME.gauges.forget(body.metadata.namespace or "", body.metadata.name or "")
    elif RUNTIME.leading and _needs_reconcile(body, type):
        reconcile_search(body)


@kopf.on.event(G, V, names.PRETRAIN_PLURAL)
def pretrain_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _delivered(names.PRETRAIN_PLURAL, body, type)
    if type != "DELETED" and RUNTIME.leading and _needs_reconcile(body, type):
        reconcile_pretrain(body)


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_MANAGED: names.MANAGER})
def job_event(body: kopf.Body, **_: Any) -> None:
    """A Job of ours changed: reconcile the resource that owns it (on the leader)."""
    if not RUNTIME.leading:
        return
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
