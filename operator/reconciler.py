"""What the AugmentSearch and Pretrain reconcilers share: identity, old status, conditions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from selfaugment.operator.runtime import Deps
from selfaugment.operator.status import set_condition


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
