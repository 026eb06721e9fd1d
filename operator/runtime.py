"""What reconcilers need from the outside world, bundled so tests can pass their own."""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfaugment.operator.kube import Kube, KubeError
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
from selfaugment.trainer.store.s3 import Credentials

#: post_event(body, type, reason, message): type is Normal or Warning.
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]


class StoreUnavailable(RuntimeError):
    """The artifact store could not be read; the reconciliation is retried later.

    `reason` (CamelCase) becomes the reason of the resource's StorageReady=False condition and
    of its Warning Event: NoCredentials, SecretNotFound, SecretForbidden, SecretInvalid (the
    run's credentials Secret), BucketNotFound, EndpointUnreachable or, for any other failure,
    StoreUnavailable. The message names the Secret, bucket or object and the endpoint, never
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


#: Stores opened for runs, by (uri, endpoint, region, credentials): their connections are kept.
_STORES: OrderedDict[tuple[Any, ...], ArtifactStore] = OrderedDict()
_STORES_LOCK = threading.Lock()
MAX_OPEN_STORES = 128


def run_secret(storage: StorageConfig, settings: OperatorSettings) -> tuple[str | None, str]:
    """The run's credentials Secret (spec, else the operator's default) and how to name its
    origin in messages."""
    field = (
        "spec.storage.secretRef" if storage.secret_ref else "the operator's SELFAUGMENT_S3_SECRET"
    )
    return settings.resolve_storage(storage).secret_ref, field


def run_credentials(
    kube: Kube, namespace: str, storage: StorageConfig, settings: OperatorSettings
) -> Credentials:
    """The run's own store credentials: the keys the workers get (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY) from its Secret in its namespace. StoreUnavailable, naming the
    Secret and key but never a value: NoCredentials (no Secret named), SecretNotFound,
    SecretForbidden (RBAC lets the operator not read it) or SecretInvalid."""
    from selfaugment.operator.manifests import SECRET_KEYS

    secret, field = run_secret(storage, settings)
    if not secret:
        raise StoreUnavailable(
            f"no credentials Secret for {storage.uri}: set spec.storage.secretRef (or the "
            "operator's default, the chart's storage.credentialsSecret); the operator reads and "
            "writes a run's store only with the run's own credentials",
            "NoCredentials",
        )
    try:
        found = kube.get("v1", "secrets", namespace, secret)
    except KubeError as error:
        if error.status not in (401, 403):
            raise
        raise StoreUnavailable(
            f"the operator may not read Secret {secret} ({field}) in namespace {namespace} "
            f"(HTTP {error.status}): allow it with the chart's rbac.secretNames",
            "SecretForbidden",
        ) from None
    if found is None:
        raise StoreUnavailable(
            f"Secret {secret} ({field}) not found in namespace {namespace}: workers would not "
            "start without their store credentials; Jobs are created once it exists",
            "SecretNotFound",
        )
    data = found.get("data") or {}
    values = {}
    for key in SECRET_KEYS:
        try:
            values[key] = base64.b64decode(data.get(key) or "", validate=True).decode()
        except (ValueError, TypeError):
            values[key] = ""
        if not values[key]:
            raise StoreUnavailable(
                f"Secret {secret} ({field}) in namespace {namespace}: key {key} is missing, "
                "empty or not base64 text (it needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                "SecretInvalid",
            )
    return Credentials(values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])


def open_run_store(
    storage: StorageConfig,
    settings: OperatorSettings,
    kube: Kube | None = None,
    namespace: str | None = None,
) -> ArtifactStore:
    """The run's store at `storage.endpoint` or else the operator's default endpoint
    (SELFAUGMENT_S3_ENDPOINT). An S3 store is read and written only with the run's own
    credentials (run_credentials: its Secret in `namespace`), never with the operator's
    environment, so a run reaches no more than its own Secret allows."""
    if not storage.uri:
        raise StoreUnavailable("storage.uri is not set")
    endpoint = settings.resolve_storage(storage).endpoint
    credentials = None
    if str(storage.uri).startswith("s3://"):
        if kube is None or namespace is None:
            raise StoreUnavailable(f"{storage.uri}: no credentials to open it with")
        credentials = run_credentials(kube, namespace, storage, settings)
    key = (storage.uri, endpoint, storage.region, credentials)
    with _STORES_LOCK:
        if key in _STORES:
            _STORES.move_to_end(key)
            return _STORES[key]
    try:
        store = open_store(
            storage.uri, endpoint=endpoint, region=storage.region, credentials=credentials
        )
    except StoreError as error:
        raise StoreUnavailable(str(error)) from None
    with _STORES_LOCK:
        _STORES[key] = store
        while len(_STORES) > MAX_OPEN_STORES:
            _STORES.popitem(last=False)
    return store


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
