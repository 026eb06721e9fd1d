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
    S3Store,
    StoreError,
    open_store,
)

#: post_event(body, type, reason, message): type is Normal or Warning.
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]


class StoreUnavailable(RuntimeError):
    """The artifact store could not be read; the reconciliation is retried later.

    `reason` (CamelCase) becomes the reason of the resource's StorageReady=False condition and
    of its Warning Event: BucketNotFound, EndpointUnreachable or, for any other failure,
    StoreUnavailable. The message names the bucket or object and the endpoint, never
    credentials.
    """

    def __init__(self, message: str, reason: str = "StoreUnavailable") -> None:
        super().__init__(message)
        self.reason = reason


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


def check_store(store: ArtifactStore) -> None:
    """Raise StoreUnavailable, with a reason, when the store's bucket does not exist
    (BucketNotFound) or its endpoint does not answer (EndpointUnreachable); S3 stores only.

    One HEAD of the bucket per reconciliation tells these apart (a HEAD of an object cannot
    tell a missing bucket from a missing object); the client retries transient failures first.
    Any other answer (a policy that denies HeadBucket but allows the run's prefix, a server
    without HeadBucket) is left to the reads that follow, whose errors name the object.
    """
    if not isinstance(store, S3Store):
        return
    from selfaugment.trainer.store.s3 import MissingCredentialsError, describe, is_unreachable

    bucket, endpoint = store.bucket, store.endpoint
    try:
        found = store.client.bucket_exists(bucket)
    except MissingCredentialsError:  # the reads that follow name it
        return
    except store.errors as error:
        if is_unreachable(error):
            raise StoreUnavailable(
                f"S3 endpoint {endpoint} is unreachable ({describe(error)}), so bucket "
                f"{bucket} cannot be read; the operator retries until it answers",
                "EndpointUnreachable",
            ) from None
        return  # e.g. AccessDenied on the bucket: the reads that follow name the object
    if not found:
        raise StoreUnavailable(
            f"bucket {bucket} does not exist at {endpoint} (storage.uri {store.uri}); "
            "the operator retries until it exists",
            "BucketNotFound",
        )


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
