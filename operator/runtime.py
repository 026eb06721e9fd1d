"""What reconcilers need from the outside world, bundled so tests can pass their own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfaugment.operator.kube import Kube
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.metrics import SearchMetrics
from selfaugment.trainer.spec import StorageConfig
from selfaugment.trainer.store import (
    ArtifactNotFoundError,
    ArtifactStore,
    StoreError,
    open_store,
)

#: post_event(body, type, reason, message): type is Normal or Warning.
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]


class StoreUnavailable(RuntimeError):
    """The artifact store could not be read; the reconciliation is retried later."""


@dataclass
class Deps:
    """The Kubernetes client, operator defaults, metrics and the event poster."""

    kube: Kube
    settings: OperatorSettings
    metrics: SearchMetrics
    post_event: EventPoster


def open_run_store(storage: StorageConfig, settings: OperatorSettings) -> ArtifactStore:
    """The run's store, read with the operator's own credentials (from its environment), at
    `storage.endpoint` or else the operator's default endpoint (SELFAUGMENT_S3_ENDPOINT)."""
    if not storage.uri:
        raise StoreUnavailable("storage.uri is not set")
    endpoint = settings.resolve_storage(storage).endpoint
    try:
        return open_store(storage.uri, endpoint=endpoint, region=storage.region)
    except StoreError as error:
        raise StoreUnavailable(str(error)) from None


def read_optional(store: ArtifactStore, key: str) -> Any:
    """The JSON object at `key`, or None when it does not exist (yet)."""
    try:
        if not store.exists(key):
            return None
        return store.read_json(key)
    except ArtifactNotFoundError:  # deleted between exists() and the read
        return None
    except StoreError as error:
        raise StoreUnavailable(str(error)) from None
