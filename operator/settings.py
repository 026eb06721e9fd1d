"""Operator-wide defaults, read once from the environment (the Helm chart sets them).

A resource's spec overrides them: see `resolve_storage`, `gpu_resource`, `node_selector`,
`tolerations` and `deadline`, which the manifest builders and the store access use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from selfaugment.environ import env_int
from selfaugment.trainer.spec import ResourcesConfig, StorageConfig

#: The user of docker/Dockerfile.worker.
WORKER_UID = 10001
#: The spec's default of `resources.gpu_resource` (the CRD fills it in when a spec omits it).
SPEC_GPU_RESOURCE = "nvidia.com/gpu"
_TOLERATION_KEYS = {
    "key": str,
    "operator": str,
    "value": str,
    "effect": str,
    "tolerationSeconds": int,
}
_OPERATORS = ("Exists", "Equal")
_HOUR = 3600
#: activeDeadlineSeconds of a task's Job per stage (`pretrain`: a standalone Pretrain) when
#: neither the spec nor SELFAUGMENT_ACTIVE_DEADLINES sets one. Generous caps, far above a
#: paper-scale run on one GPU, so that a hung worker cannot hold its GPUs forever.
DEFAULT_DEADLINES: dict[str, int] = {
    "prepare": 48 * _HOUR,  # reading and sharding the dataset once
    "base": 72 * _HOUR,
    "folds": 72 * _HOUR,
    "randaugment": 72 * _HOUR,
    "search": 24 * _HOUR,
    "merge": 1 * _HOUR,
    "report": 12 * _HOUR,
    "retrain": 14 * 24 * _HOUR,
    "pretrain": 14 * 24 * _HOUR,
}
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def _env_optional_int(name: str, default: int) -> int | None:
    """An integer; unset gives `default`, empty or "none" gives None."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in ("", "none", "null"):
        return None
    return env_int(name, default)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


def _env_json(name: str) -> Any:
    """The JSON value of variable `name`, or None when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() in ("", "null"):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"environment variable {name}={raw!r}: invalid JSON ({error})") from None


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected true or false")


def parse_deadlines(name: str, value: Any) -> dict[str, int]:
    """Per-stage deadlines (JSON object of positive integers) over DEFAULT_DEADLINES;
    ValueError names the variable and the entry."""
    result = dict(DEFAULT_DEADLINES)
    if value is None:
        return result
    if not isinstance(value, dict):
        raise ValueError(
            f"environment variable {name}: expected a JSON object, got {type(value).__name__}"
        )
    for key, seconds in value.items():
        if key not in DEFAULT_DEADLINES:
            allowed = ", ".join(DEFAULT_DEADLINES)
            raise ValueError(f"environment variable {name}: unknown stage {key!r} ({allowed})")
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
            raise ValueError(
                f"environment variable {name}: entry {key!r}: expected a positive integer "
                f"(seconds), got {seconds!r}"
            )
        result[key] = seconds
    return result


def parse_node_selector(name: str, value: Any) -> dict[str, str]:
    """A nodeSelector (JSON object of strings); ValueError names the variable and the entry."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"environment variable {name}: expected a JSON object, got {type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(
                f"environment variable {name}: entry {key!r}: expected a string, "
                f"got {type(item).__name__}"
            )
    return dict(value)


def parse_tolerations(name: str, value: Any) -> tuple[dict[str, Any], ...]:
    """Tolerations (JSON list of core/v1 Toleration objects); ValueError names the entry."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(
            f"environment variable {name}: expected a JSON list, got {type(value).__name__}"
        )
    result = []
    for index, item in enumerate(value):
        where = f"environment variable {name}: entry [{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        for key, entry in item.items():
            kind = _TOLERATION_KEYS.get(key)
            if kind is None:
                allowed = ", ".join(_TOLERATION_KEYS)
                raise ValueError(f"{where}: unknown field {key!r} (allowed: {allowed})")
            if not isinstance(entry, kind) or isinstance(entry, bool):
                raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {entry!r}")
        if item.get("operator", "Equal") not in _OPERATORS:
            raise ValueError(f"{where}.operator: expected one of {_OPERATORS}")
        if item.get("effect", "") not in _EFFECTS:
            raise ValueError(f"{where}.effect: expected one of {_EFFECTS[1:]} or ''")
        result.append(dict(item))
    return tuple(result)


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults that a resource's spec overrides."""

    worker_image: str = "ghcr.io/selfaugment/worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    timer_interval: float = 30.0
    metrics_port: int = 8080
    job_ttl_seconds: int | None = None
    gpu_resource: str = SPEC_GPU_RESOURCE
    worker_node_selector: dict[str, str] = field(default_factory=dict)
    worker_tolerations: tuple[dict[str, Any], ...] = ()
    s3_endpoint: str | None = None
    s3_secret: str | None = None
    #: UID (and GID) of worker pods: the worker image's user; None lets the platform assign
    #: one (OpenShift's restricted SCC), pods still must run as non-root.
    worker_run_as_user: int | None = WORKER_UID
    #: activeDeadlineSeconds per stage when the spec sets none (DEFAULT_DEADLINES by default).
    active_deadlines: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DEADLINES))
    #: Leader election (a coordination.k8s.io Lease) so that several replicas may run: only
    #: the holder reconciles. Off, every process acts (one replica only).
    leader_election: bool = True
    lease_name: str = "selfaugment-operator"
    #: Namespace of the Lease: the operator's own (POD_NAMESPACE, from the Downward API).
    lease_namespace: str = "default"
    #: Seconds a leader holds the Lease without renewing it; a standby takes over after that.
    lease_duration: float = 15.0

    @classmethod
    def from_env(cls) -> OperatorSettings:
        """SELFAUGMENT_WORKER_IMAGE, _IMAGE_PULL_POLICY, _SERVICE_ACCOUNT, _TIMER_INTERVAL,
        _METRICS_PORT, _JOB_TTL_SECONDS, _GPU_RESOURCE, _WORKER_NODE_SELECTOR (JSON object),
        _WORKER_TOLERATIONS (JSON list), _S3_ENDPOINT, _S3_SECRET, _WORKER_RUN_AS_USER (empty:
        the platform assigns the UID), _ACTIVE_DEADLINES (JSON object), _LEADER_ELECTION,
        _LEASE_NAME, _LEASE_NAMESPACE (else POD_NAMESPACE), _LEASE_DURATION_SECONDS."""
        ttl = os.environ.get("SELFAUGMENT_JOB_TTL_SECONDS")
        selector = "SELFAUGMENT_WORKER_NODE_SELECTOR"
        tolerations = "SELFAUGMENT_WORKER_TOLERATIONS"
        deadlines = "SELFAUGMENT_ACTIVE_DEADLINES"
        return cls(
            worker_image=os.environ.get("SELFAUGMENT_WORKER_IMAGE", cls.worker_image),
            image_pull_policy=os.environ.get(
                "SELFAUGMENT_IMAGE_PULL_POLICY", cls.image_pull_policy
            ),
            service_account=os.environ.get("SELFAUGMENT_SERVICE_ACCOUNT") or None,
            timer_interval=_env_float("SELFAUGMENT_TIMER_INTERVAL", cls.timer_interval),
            metrics_port=env_int("SELFAUGMENT_METRICS_PORT", cls.metrics_port),
            job_ttl_seconds=env_int("SELFAUGMENT_JOB_TTL_SECONDS", 0) if ttl else None,
            gpu_resource=os.environ.get("SELFAUGMENT_GPU_RESOURCE") or cls.gpu_resource,
            worker_node_selector=parse_node_selector(selector, _env_json(selector)),
            worker_tolerations=parse_tolerations(tolerations, _env_json(tolerations)),
            s3_endpoint=os.environ.get("SELFAUGMENT_S3_ENDPOINT") or None,
            s3_secret=os.environ.get("SELFAUGMENT_S3_SECRET") or None,
            worker_run_as_user=_env_optional_int("SELFAUGMENT_WORKER_RUN_AS_USER", WORKER_UID),
            active_deadlines=parse_deadlines(deadlines, _env_json(deadlines)),
            leader_election=_env_bool("SELFAUGMENT_LEADER_ELECTION", cls.leader_election),
            lease_name=os.environ.get("SELFAUGMENT_LEASE_NAME") or cls.lease_name,
            lease_namespace=os.environ.get("SELFAUGMENT_LEASE_NAMESPACE")
            or os.environ.get("POD_NAMESPACE")
            or cls.lease_namespace,
            lease_duration=_env_float("SELFAUGMENT_LEASE_DURATION_SECONDS", cls.lease_duration),
        )

    # -- a resource's spec over these defaults ---------------------------------------------
    def resolve_storage(self, storage: StorageConfig) -> StorageConfig:
        """`storage` with an unset endpoint and secret_ref taken from the operator's defaults."""
        return storage.model_copy(
            update={
                "endpoint": storage.endpoint or self.s3_endpoint,
                "secret_ref": storage.secret_ref or self.s3_secret,
            }
        )

    def resolve_gpu_resource(self, resources: ResourcesConfig) -> str:
        """The spec's GPU resource name when it differs from the spec default, else ours.

        The CRD defaults `gpu_resource` to nvidia.com/gpu, so an omitted field and an explicit
        nvidia.com/gpu look the same: both get the operator's default.
        """
        if resources.gpu_resource != SPEC_GPU_RESOURCE:
            return resources.gpu_resource
        return self.gpu_resource

    def resolve_node_selector(self, resources: ResourcesConfig) -> dict[str, str]:
        """The operator's default nodeSelector with the spec's entries over it."""
        return {**self.worker_node_selector, **resources.node_selector}

    def deadline(self, resources: ResourcesConfig, stage: str) -> int:
        """activeDeadlineSeconds of a Job of `stage`: the spec's entry, else the operator's."""
        chosen = resources.active_deadline_seconds.items()
        spec = next((seconds for key, seconds in chosen if key == stage), None)
        return spec if spec is not None else self.active_deadlines[stage]

    def resolve_tolerations(self, resources: ResourcesConfig) -> list[dict[str, Any]]:
        """The spec's tolerations, then the operator's defaults not already among them."""
        result = [item.model_dump(exclude_none=True) for item in resources.tolerations]
        for default in self.worker_tolerations:
            if default not in result:
                result.append(dict(default))
        return result
