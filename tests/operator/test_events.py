"""Events are posted under the operator's own name (operator/events.py)."""

from __future__ import annotations

from selfaugment.operator import names
from selfaugment.operator.events import EventPoster, event_body
from selfaugment.operator.kube import KubeError

SEARCH = {
    "apiVersion": names.API_VERSION,
    "kind": names.SEARCH_KIND,
    "metadata": {"name": "cifar", "namespace": "ml", "uid": "uid-1"},
}


def test_an_event_names_the_operator_the_replica_and_the_object() -> None:
    event = event_body(SEARCH, "Warning", "DeadlineExceeded", "x" * 5000, "operator-pod-1")
    assert event["source"] == {"component": "selfaugment-operator"}  # kubectl describe: From
    assert event["reportingComponent"] == "selfaugment-operator"
    assert event["reportingInstance"] == "operator-pod-1"
    assert event["involvedObject"] == {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "name": "cifar",
        "namespace": "ml",
        "uid": "uid-1",
    }
    assert event["metadata"] == {"generateName": "cifar.", "namespace": "ml"}
    assert len(event["message"]) == 1024 and event["type"] == "Warning"


def test_a_failed_post_never_fails_the_reconciliation() -> None:
    class Refusing:
        def create(self, body: object) -> bool:
            raise KubeError("POST events: 403 Forbidden", 403)

    EventPoster(Refusing(), "pod")(SEARCH, "Normal", "Retry", "m")  # type: ignore[arg-type]
