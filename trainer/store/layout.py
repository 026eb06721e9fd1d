"""The layout of a search run in its artifact store: keys, records, the spec (one definition,
used by the workers, the runner, the report, `selfaugment status` and the operator).

Layout of a run in the store:

    spec.json                     the resolved AugmentSearchSpec (written once, checked on resume)
    tasks/<task-id>/result.json   a task's result: its existence means the task is done
    tasks/<task-id>/progress.json a running task's latest epoch / trial figures
    tasks/<task-id>/...           a task's artifacts (checkpoint.pt, heads.pt, trials.json, ...)
    policy.json                   the found policy (after merge)
    report.json, report.md, plots/*.png   the final report

Prepared datasets live outside every run, in one store shared by all runs on the same storage
(`datasets_store`): `s3://<bucket>/datasets/<key>/` beside the runs' prefixes, and locally
`$SELFAUGMENT_CACHE/datasets/<key>/` (~/.cache/selfaugment/datasets). A search or Pretrain on a
source already prepared there with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.config import field_differences, parse_config
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store.artifacts import ArtifactStore, StoreError, open_store
from selfaugment.trainer.store.s3 import cache_root

SPEC_KEY = "spec.json"
POLICY_KEY = "policy.json"
REPORT_JSON_KEY = "report.json"
REPORT_MD_KEY = "report.md"


class RunMismatchError(SelfAugmentError):
    """The store already holds a run with a different spec."""


# The files of one unit of work under its prefix: a search task (tasks/<task-id>/) or a
# standalone Pretrain (its own prefix). The result's existence means the work is done.
RESULT_NAME = "result.json"
PROGRESS_NAME = "progress.json"
CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"


#: The folder (a bucket's top-level prefix, or under the local cache) of prepared datasets.
DATASETS_PREFIX = "datasets"


def datasets_uri(store_uri: str) -> str:
    """Where prepared datasets go for runs stored at `store_uri`: `s3://<bucket>/datasets` for
    an S3 store (shared by every prefix in the bucket), else `<cache>/datasets` on this machine."""
    if store_uri.startswith("s3://"):
        bucket = store_uri.removeprefix("s3://").split("/", 1)[0]
        return f"s3://{bucket}/{DATASETS_PREFIX}"
    return str(cache_root() / DATASETS_PREFIX)


def store_endpoint(store: ArtifactStore) -> str | None:
    """The endpoint URL `store` was opened with (None: a local store, or AWS's default)."""
    endpoint = getattr(store, "endpoint", None)  # S3Store names AWS's default "AWS S3"
    return endpoint if isinstance(endpoint, str) and "://" in endpoint else None


def datasets_store(store: ArtifactStore) -> ArtifactStore:
    """The store of prepared datasets beside `store` (same endpoint), see `datasets_uri`."""
    uri = datasets_uri(str(getattr(store, "uri", "")))
    return open_store(uri, endpoint=store_endpoint(store) if uri.startswith("s3://") else None)


def task_key(task_id: str, name: str) -> str:
    return f"tasks/{task_id}/{name}"


def result_key(task_id: str) -> str:
    return task_key(task_id, RESULT_NAME)


def progress_key(task_id: str) -> str:
    return task_key(task_id, PROGRESS_NAME)


def prefixed_key(prefix: str, name: str) -> str:
    """`name` under a standalone Pretrain's prefix, e.g. prefixed_key(p, RESULT_NAME)."""
    return f"{prefix.strip('/')}/{name}"


#: Spec sections and settings (section, field) that change no result: a run may resume with
#: others. The memory budget only chooses between two paths that give the same images.
RESULT_NEUTRAL_SECTIONS = frozenset({"resources", "parallelism", "storage"})
RESULT_NEUTRAL_SETTINGS = (
    ("runtime", "progress"),
    ("runtime", "num_workers"),
    ("runtime", "checkpoint_steps"),
    ("dataset", "memory_budget"),
    ("evaluation_dataset", "memory_budget"),
)


def digest(spec: AugmentSearchSpec, exclude: Any, **extra: object) -> str:
    """sha256 of the spec without `exclude` and without runtime settings that change no result."""
    data = spec.model_dump(mode="json", exclude=exclude)
    for section, setting in RESULT_NEUTRAL_SETTINGS:
        if isinstance(data.get(section), dict):
            data[section].pop(setting, None)
    data.update(extra)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def spec_digest(spec: AugmentSearchSpec) -> str:
    """A digest of the parts of the spec that change results (not resources or parallelism)."""
    return digest(spec, set(RESULT_NEUTRAL_SECTIONS))


def prepare_run(store: ArtifactStore, spec: AugmentSearchSpec) -> None:
    """Write spec.json, or check that the stored run has the same spec (resume)."""
    if store.exists(SPEC_KEY):
        stored = load_spec(store)
        if spec_digest(stored) != spec_digest(spec):
            differences = spec_differences(stored, spec)
            raise RunMismatchError(
                f"{store.url(SPEC_KEY)} holds a run with a different spec "
                f"({'; '.join(differences)}); use another output directory or storage prefix, "
                "or rerun with the stored spec to resume"
            )
    store.write_json(SPEC_KEY, spec.model_dump(mode="json"))


def spec_differences(stored: AugmentSearchSpec, given: AugmentSearchSpec) -> list[str]:
    """`field: stored X, given Y` for each field that changes results (spec_digest's fields)."""
    return [
        f"{name}: stored {before!r}, given {after!r}"
        for name, before, after in field_differences(
            stored.model_dump(mode="json", exclude=set(RESULT_NEUTRAL_SECTIONS)),
            given.model_dump(mode="json", exclude=set(RESULT_NEUTRAL_SECTIONS)),
            ignored={f"{section}.{setting}" for section, setting in RESULT_NEUTRAL_SETTINGS},
        )
    ]


def load_spec(store: ArtifactStore) -> AugmentSearchSpec:
    """The run's spec.json, validated (ConfigError naming the file when it no longer is)."""
    try:
        data = store.read_json(SPEC_KEY)
    except StoreError as error:
        raise StoreError(f"{error}; is this a SelfAugment run directory?") from None
    return parse_config(AugmentSearchSpec, data, store.url(SPEC_KEY))


def done_task_ids(store: ArtifactStore) -> set[str]:
    """Ids of the tasks whose result.json exists (one listing of the store)."""
    done = set()
    for key in store.list("tasks/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "result.json":
            done.add(parts[1])
    return done


def read_results(store: ArtifactStore, task_ids: set[str] | None = None) -> dict[str, Any]:
    ids = done_task_ids(store) if task_ids is None else task_ids
    return {task_id: store.read_json(result_key(task_id)) for task_id in sorted(ids)}


def read_progress(store: ArtifactStore, task_id: str) -> dict[str, Any]:
    try:
        value = store.read_json(progress_key(task_id))
    except StoreError:
        return {}
    return value if isinstance(value, dict) else {}
