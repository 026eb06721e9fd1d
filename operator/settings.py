"""Operator-wide defaults, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults that a resource's spec overrides."""

    worker_image: str = "ghcr.io/selfaugment/worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    timer_interval: float = 30.0
    metrics_port: int = 8080
    job_ttl_seconds: int | None = None

    @classmethod
    def from_env(cls) -> OperatorSettings:
        """SELFAUGMENT_WORKER_IMAGE, _IMAGE_PULL_POLICY, _SERVICE_ACCOUNT, _TIMER_INTERVAL,
        _METRICS_PORT, _JOB_TTL_SECONDS."""
        ttl = os.environ.get("SELFAUGMENT_JOB_TTL_SECONDS")
        return cls(
            worker_image=os.environ.get("SELFAUGMENT_WORKER_IMAGE", cls.worker_image),
            image_pull_policy=os.environ.get(
                "SELFAUGMENT_IMAGE_PULL_POLICY", cls.image_pull_policy
            ),
            service_account=os.environ.get("SELFAUGMENT_SERVICE_ACCOUNT") or None,
            timer_interval=_env_float("SELFAUGMENT_TIMER_INTERVAL", cls.timer_interval),
            metrics_port=_env_int("SELFAUGMENT_METRICS_PORT", cls.metrics_port),
            job_ttl_seconds=_env_int("SELFAUGMENT_JOB_TTL_SECONDS", 0) if ttl else None,
        )
