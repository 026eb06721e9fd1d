"""What /livez and /healthz report (operator/health.py), with a clock the test moves."""

from __future__ import annotations

import socket
from typing import Any

from selfaugment.operator.health import Health, probe_endpoint

SEARCHES = "augmentsearches"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def item(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ml", "name": name, "resourceVersion": version}}


def test_the_api_check_fails_only_after_the_grace_period_without_a_listing() -> None:
    clock = Clock()
    health = Health(grace=90, clock=clock)
    assert health.kubernetes().ok and health.kubernetes().detail == "starting"
    clock.now += 91
    assert not health.kubernetes().ok
    health.listed(SEARCHES, [])
    assert health.kubernetes().ok
    clock.now += 60
    health.list_failed("GET /apis/...: 503 Service Unavailable")
    assert health.kubernetes().ok  # one failure is not an outage
    clock.now += 31
    check = health.kubernetes()
    assert not check.ok and "503 Service Unavailable" in check.detail


def test_the_watch_check_fails_when_a_listed_change_is_not_delivered() -> None:
    clock = Clock()
    health = Health(grace=90, clock=clock)
    key = (SEARCHES, "ml", "a")
    health.delivered(key, "5")
    health.listed(SEARCHES, [item("a", "5")])
    assert health.watch().ok
    health.listed(SEARCHES, [item("a", "7")])  # a change the watch has not shown yet
    clock.now += 60
    assert health.watch().ok  # in flight, within the grace period
    clock.now += 31
    check = health.watch()
    assert not check.ok and "augmentsearches ml/a" in check.detail
    health.delivered(key, "7")  # delivered after all
    assert health.watch().ok


def test_a_listing_behind_the_watch_and_deletions_are_no_lag() -> None:
    clock = Clock()
    health = Health(grace=90, clock=clock)
    health.delivered((SEARCHES, "ml", "a"), "5")
    health.delivered((SEARCHES, "ml", "a"), "6")
    health.listed(SEARCHES, [item("a", "5"), item("b", "1")])  # an older snapshot of a
    health.delivered((SEARCHES, "ml", "b"), None, deleted=True)
    clock.now += 200
    health.listed(SEARCHES, [item("a", "6")])  # b is gone from the listing too
    assert health.watch().ok


def test_the_store_fails_readiness_but_not_liveness() -> None:
    health = Health(grace=90, clock=Clock())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # bound, not listening: connections are refused
        health.store = probe_endpoint(f"http://127.0.0.1:{closed}", timeout=2)
    report = health.report()
    assert report["live"] is True and report["healthy"] is False
    assert report["checks"]["store"]["ok"] is False
    assert "is unreachable" in report["checks"]["store"]["detail"]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe_endpoint(f"http://127.0.0.1:{port}").ok
    assert not probe_endpoint("minio:9000").ok  # no scheme: no host to reach
