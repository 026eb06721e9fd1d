"""Leader election on a Lease (operator/leader.py) with an in-memory API that enforces the
resourceVersion precondition as the API server does, and a clock the test moves."""

from __future__ import annotations

import itertools
from typing import Any

from selfaugment.operator.kube import KubeError
from selfaugment.operator.leader import LeaderElector
from selfaugment.operator.status import merge_patch


class LeaseApi:
    """get / create / merge-patch of Leases, 409 on a stale resourceVersion or a second create."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.versions = itertools.count(1)

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        lease = self.leases.get(name)
        return merge_patch({}, lease) if lease is not None else None

    def create(self, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        if name in self.leases:
            return False
        self.leases[name] = merge_patch(body, {"metadata": {"resourceVersion": "0"}})
        return True

    def patch(
        self, api_version: str, plural: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        current = self.leases[name]
        expected = body.get("metadata", {}).get("resourceVersion")
        if expected is not None and expected != current["metadata"]["resourceVersion"]:
            raise KubeError("PATCH lease: 409 Conflict", 409)
        version = {"metadata": {"resourceVersion": str(next(self.versions))}}
        self.leases[name] = merge_patch(merge_patch(current, body), version)
        return self.leases[name]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(api: LeaseApi, clock: Clock, identity: str) -> LeaderElector:
    return LeaderElector(api, "ops", "sa", identity, duration=15, clock=clock)  # type: ignore[arg-type]


def test_the_first_candidate_leads_and_the_second_stands_by() -> None:
    api, clock = LeaseApi(), Clock()
    first, second = elector(api, clock, "pod-a"), elector(api, clock, "pod-b")
    assert first.step() and not second.step()
    assert second.holder == "pod-a"
    lease = api.leases["sa"]["spec"]
    assert lease["holderIdentity"] == "pod-a" and lease["leaseDurationSeconds"] == 15
    assert first.retry_period == 2


def test_the_leader_renews_and_keeps_the_lease() -> None:
    api, clock = LeaseApi(), Clock()
    first, second = elector(api, clock, "pod-a"), elector(api, clock, "pod-b")
    first.step()
    for _ in range(10):  # a live leader renews every retry period: never taken over
        clock.now += first.retry_period
        second.step()
        assert first.step() and not second.leading
    assert api.leases["sa"]["spec"]["leaseTransitions"] == 0


def test_a_standby_takes_over_once_the_lease_lapses_by_its_own_clock() -> None:
    api, clock = LeaseApi(), Clock()
    first, second = elector(api, clock, "pod-a"), elector(api, clock, "pod-b")
    first.step()
    second.step()  # sees the record now: its own clock starts here
    clock.now += 14
    assert not second.step()
    assert not first.leading  # it could not renew for 2/3 of the duration: it stops acting
    clock.now += 1
    assert second.step() and second.holder == "pod-b"
    assert api.leases["sa"]["spec"]["leaseTransitions"] == 1
    assert not first.step()  # the old leader, back, finds another holder


def test_of_two_candidates_for_a_lapsed_lease_only_one_wins() -> None:
    api, clock = LeaseApi(), Clock()
    old, b, c = (elector(api, clock, name) for name in ("pod-a", "pod-b", "pod-c"))
    old.step()
    b.step()
    c.step()
    clock.now += 16
    lease = api.get("", "", "ops", "sa")  # both read the same version ...
    b.kube = c.kube = _Frozen(api, lease)  # type: ignore[assignment]
    assert b.step()
    assert not c.step()  # ... and the second write is refused (409)
    assert api.leases["sa"]["spec"]["holderIdentity"] == "pod-b"


class _Frozen:
    """Answers `get` with a version read earlier; writes go to the real API."""

    def __init__(self, api: LeaseApi, lease: dict[str, Any]) -> None:
        self.api, self.lease = api, lease

    def get(self, *_: Any) -> dict[str, Any]:
        return self.lease

    def create(self, body: dict[str, Any]) -> bool:
        return self.api.create(body)

    def patch(self, *args: Any) -> dict[str, Any]:
        return self.api.patch(*args)


def test_a_released_lease_is_taken_at_once() -> None:
    """A clean shutdown (a rolling update) hands over without waiting for the lease to lapse."""
    api, clock = LeaseApi(), Clock()
    first, second = elector(api, clock, "pod-a"), elector(api, clock, "pod-b")
    first.step()
    second.step()
    first.release()
    assert not first.leading
    assert "holderIdentity" not in api.leases["sa"]["spec"]
    assert second.step() and second.holder == "pod-b"


def test_a_leader_that_cannot_reach_the_api_steps_down() -> None:
    api, clock = LeaseApi(), Clock()
    first = elector(api, clock, "pod-a")
    first.step()

    def unreachable(*_: Any) -> None:
        raise KubeError("GET lease: ConnectionRefusedError")

    first.kube.get = unreachable  # type: ignore[method-assign]
    clock.now += 9
    assert first.step()  # still within 2/3 of the duration since the last renewal
    clock.now += 2
    assert not first.step()
