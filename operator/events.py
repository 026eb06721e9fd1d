"""Kubernetes Events of the operator, posted under its own name.

Through kopf, Events show in `kubectl describe` as coming from `kopf`; these carry
`source.component` and `reportingComponent` = selfaugment-operator, and the replica's pod name
as `reportingInstance`. They are posted synchronously from the reconciler's thread (kopf runs
handlers in a thread pool), so an Event is not dropped when the operator stops right after
queueing it. Posting is best effort: a failed post is logged and never fails a reconciliation.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from selfaugment.operator import names
from selfaugment.operator.kube import Kube, KubeError

COMPONENT = names.MANAGER
#: The API server refuses longer messages.
MAX_MESSAGE = 1024
_log = logging.getLogger("selfaugment.operator")


def event_body(
    body: Mapping[str, Any], kind: str, reason: str, message: str, instance: str
) -> dict[str, Any]:
    """A core/v1 Event about the object `body` (kind: Normal or Warning)."""
    meta = body.get("metadata") or {}
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    now = now.replace("+00:00", "Z")
    involved = {
        "apiVersion": body.get("apiVersion", names.API_VERSION),
        "kind": body.get("kind", ""),
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
    }
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{meta.get('name', 'selfaugment')}.",
            "namespace": meta["namespace"],
        },
        "involvedObject": involved,
        "type": kind,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "action": reason,
        "source": {"component": COMPONENT},  # the From column of `kubectl describe`
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    """post_event(body, type, reason, message) for the reconcilers (runtime.EventPoster)."""

    def __init__(self, kube: Kube, instance: str) -> None:
        self.kube = kube
        self.instance = instance

    def __call__(self, body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        try:
            self.kube.create(event_body(body, kind, reason, message, self.instance))
        except KubeError as error:
            _log.warning("could not post Event %s (%s): %s", reason, message, error)
