"""The resync and leader-election loops (operator/resync.py), one round at a time."""

from __future__ import annotations

from typing import Any

from selfaugment.operator import names
from selfaugment.operator.health import Health
from selfaugment.operator.kube import KubeError
from selfaugment.operator.resync import Loops, settled


def run(name: str, phase: str | None = None, **meta: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "ml", "generation": 1, "resourceVersion": "3", **meta}
    status = {"phase": phase, "observedGeneration": 1} if phase else {}
    return {"metadata": metadata, "status": status}


def test_a_run_is_settled_once_it_ended_for_its_spec_and_no_retry_waits() -> None:
    assert settled(run("a", "Succeeded")) and settled(run("a", "Failed"))
    assert not settled(run("a", "Running")) and not settled(run("a"))
    assert not settled(run("a", "Failed", generation=2))  # the spec changed since
    retry = run("a", "Failed", annotations={names.RETRY_ANNOTATION: "1"})
    assert not settled(retry)
    retry["status"]["retryToken"] = "1"
    assert settled(retry)


class Lister:
    def __init__(self, items: dict[str, list[dict[str, Any]]]) -> None:
        self.items = items
        self.calls: list[tuple[str, str | None]] = []

    def list(self, api_version: str, plural: str, namespace: str | None, labels: Any) -> Any:
        self.calls.append((plural, namespace))
        if plural not in self.items:
            raise KubeError(f"GET {plural}: 503 Service Unavailable", 503)
        return [i for i in self.items[plural] if namespace in (None, i["metadata"]["namespace"])]


class Elector:
    holder: str | None = "me"
    retry_period = 5.0

    def __init__(self, leading: bool) -> None:
        self.leading = self.wins = leading

    def step(self) -> bool:
        self.leading = self.wins  # the outcome of this election round
        return self.leading

    def release(self) -> None:
        return None


def loops(kube: Lister, leading: bool, namespaces: tuple[str, ...] = ()) -> tuple[Loops, list[str]]:
    seen: list[str] = []
    reconcilers = {
        names.SEARCH_PLURAL: lambda body: seen.append(body["metadata"]["name"]),
        names.PRETRAIN_PLURAL: lambda body: seen.append(body["metadata"]["name"]),
    }
    health = Health(grace=90)
    made = Loops(kube, Elector(leading), health, 30, namespaces, reconcilers, None)  # type: ignore[arg-type]
    return made, seen


def test_the_leader_reconciles_every_listed_run_and_a_standby_only_lists() -> None:
    kube = Lister({names.SEARCH_PLURAL: [run("s")], names.PRETRAIN_PLURAL: [run("p")]})
    leader, reconciled = loops(kube, leading=True)
    leader.resync_once()
    assert reconciled == ["s", "p"]
    assert kube.calls == [(names.SEARCH_PLURAL, None), (names.PRETRAIN_PLURAL, None)]
    standby, nothing = loops(kube, leading=False)
    standby.resync_once()
    assert nothing == [] and standby.health.listed_at is not None


def test_namespaced_mode_lists_each_namespace_and_a_failed_list_reaches_health() -> None:
    kube = Lister({names.SEARCH_PLURAL: [run("s")]})  # pretrains: the API refuses
    made, reconciled = loops(kube, leading=True, namespaces=("ml", "other"))
    made.resync_once()
    assert (names.SEARCH_PLURAL, "ml") in kube.calls and (
        names.SEARCH_PLURAL,
        "other",
    ) in kube.calls
    assert reconciled == ["s"]
    assert "503 Service Unavailable" in str(made.health.list_error)


def test_gaining_leadership_wakes_the_resync() -> None:
    made, _ = loops(Lister({}), leading=False)
    made.lead_once()
    assert not made.wake.is_set() and made.health.leader["leading"] is False
    made.elector.wins = True  # type: ignore[attr-defined]
    made.lead_once()
    assert made.wake.is_set() and made.health.leader == {"leading": True, "holder": "me"}
