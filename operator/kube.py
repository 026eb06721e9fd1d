"""A small synchronous Kubernetes API client on top of the `kubernetes` package, returning dicts.

Handlers are synchronous (kopf runs them in a thread pool), so blocking calls here never stall
the operator's event loop. Credentials come from the same kubeconfig or in-cluster service
account that kopf logs in with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

MERGE_PATCH = "application/merge-patch+json"
CONNECTIONS = 32
#: Ask for an object's metadata only (PartialObjectMetadata): the values of a Secret never
#: reach the operator. The trailing plain JSON is the fallback for servers that cannot.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class KubeError(RuntimeError):
    """An API call failed; `status` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path; namespace None gives the cluster-wide collection."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    """Create, read, patch and delete namespaced objects as plain dicts."""

    def __init__(self, api_client: Any | None = None) -> None:
        if api_client is None:
            import kubernetes

            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
            # Connections kept open: as many as threads may call at once (kopf's executor and
            # the resync's); urllib3's default (5 per core) would open and drop them all along.
            configuration.connection_pool_maxsize = CONNECTIONS
            api_client = kubernetes.client.ApiClient(configuration)
        self.api = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        if query:
            path = f"{path}?{urlencode(query)}"
        try:
            response = self.api.call_api(
                path,
                method,
                header_params={"Accept": accept, "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=30,
            )
        except ApiException as error:
            detail = _status_message(error.body)
            raise KubeError(
                f"{method} {path}: {error.status} {error.reason}"
                + (f": {detail}" if detail else ""),
                error.status,
            ) from None
        except Exception as error:  # connection errors: urllib3 raises many kinds
            raise KubeError(f"{method} {path}: {type(error).__name__}: {error}") from None
        response = response[0] if isinstance(response, tuple) else response
        data = response.data
        return json.loads(data) if data else {}

    def get(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", _path(api_version, plural, namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def get_metadata(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """The object's metadata only, or None when it does not exist. Used for Secrets: only
        metadata is asked for, and anything else a server sends anyway is dropped here."""
        try:
            found = self._call(
                "GET", _path(api_version, plural, namespace, name), accept=METADATA_ONLY
            )
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return dict(found.get("metadata") or {})

    def list(
        self, api_version: str, plural: str, namespace: str | None, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """Objects whose labels include `labels` (also filtered here, whatever the server did);
        namespace None lists every namespace."""
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        query = {"labelSelector": selector} if selector else None
        items = self._call("GET", _path(api_version, plural, namespace), query=query).get("items")
        result = []
        for item in items or []:
            item_labels = item.get("metadata", {}).get("labels") or {}
            if all(item_labels.get(key) == value for key, value in labels.items()):
                result.append(item)
        return result

    def create(self, body: Mapping[str, Any]) -> bool:
        """Create `body`; False when an object of that name already exists (idempotent)."""
        metadata = body["metadata"]
        path = _path(body["apiVersion"], _plural(body["kind"]), metadata["namespace"])
        try:
            self._call("POST", path, body=dict(body))
        except KubeError as error:
            if error.status == 409:
                return False
            raise
        return True

    def patch(
        self, api_version: str, plural: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch of the object (e.g. an annotation). With metadata.resourceVersion
        in `body`, the server refuses (409) to patch a newer version: optimistic concurrency."""
        path = _path(api_version, plural, namespace, name)
        return self._call("PATCH", path, body=dict(body), content_type=MERGE_PATCH)

    def patch_status(
        self, api_version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        path = _path(api_version, plural, namespace, name) + "/status"
        self._call("PATCH", path, body={"status": dict(status)}, content_type=MERGE_PATCH)

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        propagation: str = "Background",
    ) -> None:
        """Delete; a missing object is not an error. Foreground keeps the object (and its
        name) until its dependents are gone: a Job's pods, before the Job is created again."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            self._call("DELETE", _path(api_version, plural, namespace, name), body=body)
        except KubeError as error:
            if error.status != 404:
                raise


def _status_message(body: Any) -> str:
    """The message of the API server's Status object in an error response (a 422 says which
    field of the object is invalid), or ''."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return " ".join(str(message).split())[:1000] if message else ""


_PLURALS = {
    "Job": "jobs",
    "Service": "services",
    "Pretrain": "pretrains",
    "Event": "events",
    "Lease": "leases",
}


def _plural(kind: str) -> str:
    try:
        return _PLURALS[kind]
    except KeyError:
        raise KubeError(f"no plural known for kind {kind!r}") from None
