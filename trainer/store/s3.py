"""The one S3 client factory and the one local cache directory of the product.

Endpoint: the `endpoint` argument (a spec's `storage.endpoint`), else AWS_ENDPOINT_URL (boto3's
own variable), else S3_ENDPOINT_URL; none means AWS itself. A custom endpoint (MinIO, moto) is
addressed path-style. Credentials are resolved by boto3 (environment variables, shared
credentials file, instance roles) and never logged, stored or put in messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
CACHE_VARIABLE = "SELFAUGMENT_CACHE"
DEFAULT_REGION = "us-east-1"


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
    config = Config(s3={"addressing_style": "path"}) if resolved else None
    return boto3.client(
        "s3",
        endpoint_url=resolved,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        config=config,
    )


def cache_root() -> Path:
    """$SELFAUGMENT_CACHE, or ~/.cache/selfaugment: downloaded inputs and S3 runs' work files."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "selfaugment"
