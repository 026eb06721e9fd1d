"""API names, labels and deterministic object names shared by builders, handlers and tests."""

from __future__ import annotations

import hashlib
import re

GROUP = "selfaugment.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SEARCH_KIND = "AugmentSearch"
SEARCH_PLURAL = "augmentsearches"
PRETRAIN_KIND = "Pretrain"
PRETRAIN_PLURAL = "pretrains"
CATEGORY = "selfaugment"

LABEL_SEARCH = f"{GROUP}/search"
LABEL_PRETRAIN = f"{GROUP}/pretrain"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_TASK = f"{GROUP}/task"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGER = "selfaugment-operator"
#: The other recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/
#: common-labels) on Jobs, pods and Services: name, instance (the resource), component (the
#: stage, or `pretrain`), part-of.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
WORKER_APP = "selfaugment-worker"
PART_OF = "selfaugment"
#: Set by users on an AugmentSearch or Pretrain to retry it once it failed; every new value
#: is acted on once (docs/operator.md, "Failures and retries").
RETRY_ANNOTATION = f"{GROUP}/retry"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

_MAX_NAME = 63
_INVALID = re.compile(r"[^a-z0-9-]+")


def dns_name(*parts: str, limit: int = _MAX_NAME) -> str:
    """A DNS-1123 label from `parts` joined by '-'; over `limit`, truncated with a hash suffix.

    Deterministic: the same parts always give the same name, and two different long inputs
    differ in their 8-character hash, so names never collide by truncation.
    """
    raw = "-".join(parts).lower()
    name = _INVALID.sub("-", raw).strip("-")
    if len(name) <= limit and name == raw:
        return name
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    head = name[: limit - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def job_name(search: str, task_id: str) -> str:
    """Job name of one search task: `<search>-<task-id>`, at most 63 characters."""
    return dns_name(search, task_id)


def pretrain_name(search: str) -> str:
    """Name of the Pretrain that retrains a search's final model."""
    return dns_name(search, "retrain")


def pretrain_job_name(pretrain: str) -> str:
    """Name of the Job (and headless Service) of a Pretrain."""
    # 52 leaves room for the 11-character index suffix pods of an indexed Job get as hostnames.
    return dns_name(pretrain, "train", limit=52)
