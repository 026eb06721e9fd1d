"""Logging set-up shared by the CLI, the workers and the operator."""

from __future__ import annotations

import logging

#: Libraries that log request headers (signed Authorization, access key IDs, bearer tokens) or
#: bodies at DEBUG: never below INFO, whatever -v says, so credentials never reach a log.
CLIENT_LIBRARIES = ("minio", "urllib3", "kubernetes", "aiohttp")


def quiet_client_libraries() -> None:
    for name in CLIENT_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO)
