"""The one S3 client factory and the one local cache directory of the product.

Endpoint: the `endpoint` argument (a spec's `storage.endpoint`), else AWS_ENDPOINT_URL (boto3's
own variable), else S3_ENDPOINT_URL; none means AWS itself. A custom endpoint (MinIO, moto) is
addressed path-style. Credentials are resolved by boto3 (environment variables, shared
credentials file, instance roles) and never logged, stored or put in messages.

Transient failures (refused or dropped connections, timeouts, throttling, 5xx) are retried with
exponential backoff, up to $SELFAUGMENT_S3_MAX_ATTEMPTS attempts (5) per request, each waiting
at most CONNECT_TIMEOUT / READ_TIMEOUT seconds, and every retry is logged as a warning that names
the endpoint and the cause; then the store raises one StoreError naming both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from selfaugment.environ import env_int

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
CACHE_VARIABLE = "SELFAUGMENT_CACHE"
DEFAULT_REGION = "us-east-1"
MAX_ATTEMPTS_VARIABLE = "SELFAUGMENT_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


def endpoint_url(endpoint: str | None = None) -> str | None:
    """The S3 endpoint to use: `endpoint`, else the first variable of ENDPOINT_VARIABLES set."""
    if endpoint:
        return endpoint
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def s3_client(endpoint: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client for `endpoint` (see endpoint_url) and `region`."""
    import boto3  # imported here: local runs need no S3 client set-up
    from botocore.config import Config

    resolved = endpoint_url(endpoint)
    attempts_total = max(1, env_int(MAX_ATTEMPTS_VARIABLE, DEFAULT_MAX_ATTEMPTS))
    config = Config(
        retries={"total_max_attempts": attempts_total, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        s3={"addressing_style": "path"} if resolved else None,
    )
    client = boto3.client(
        "s3",
        endpoint_url=resolved,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        config=config,
    )
    where = resolved or "AWS S3"

    def say_retry(attempts: int, caught_exception: Exception | None = None, **kwargs: Any) -> None:
        response = kwargs.get("response")
        status = response[1]["ResponseMetadata"]["HTTPStatusCode"] if response else None
        if caught_exception is None and (status is None or status < 500) and status != 429:
            return  # a success or an error that is not retried
        cause = caught_exception or f"HTTP {status}"
        if attempts < attempts_total:
            log.warning(
                "S3 at %s: %s; retrying (attempt %d of %d)",
                where,
                cause,
                attempts + 1,
                attempts_total,
            )

    client.meta.events.register("needs-retry.s3", say_retry)
    return client


def cache_root() -> Path:
    """$SELFAUGMENT_CACHE, or ~/.cache/selfaugment: downloaded inputs and S3 runs' work files."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "selfaugment"
