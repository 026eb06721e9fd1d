"""`--reuse-from`: share finished base and fold tasks between runs that trained them alike."""

from __future__ import annotations

from typing import Any

from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store.artifacts import ArtifactStore
from selfaugment.trainer.store.layout import RunMismatchError, digest, done_task_ids, load_spec

#: Search settings that only the search, merge, retrain and report stages read.
_SEARCH_ONLY_FIELDS = {
    "objective",
    "weights",
    "repeats",
    "trials",
    "sub_policies",
    "ops_per_sub_policy",
    "top_policies",
    "startup_trials",
    "score_batch_size",
    "score_images",
    "racing",
    "randaugment",
}


_TRAINING_EXCLUDE: dict[str, Any] = {
    "resources": True,
    "parallelism": True,
    "storage": True,
    "retrain": True,
    "search": _SEARCH_ONLY_FIELDS,
}


def base_digest(spec: AugmentSearchSpec) -> str:
    """A digest of what the base-candidate tasks depend on (not the search's objective)."""
    return digest(spec, _TRAINING_EXCLUDE)


def training_digest(spec: AugmentSearchSpec) -> str:
    """A digest of what the base and fold tasks depend on (not the search's objective).

    Two runs with equal digests train identical base-candidate and fold models, so their
    results can be shared. The supervised objective also trains a linear head per fold, so
    with another objective only the base tasks can be shared.
    """
    return digest(spec, _TRAINING_EXCLUDE, fold_linear_head=spec.search.objective == "supervised")


def reuse_results(
    source: ArtifactStore, target: ArtifactStore, spec: AugmentSearchSpec
) -> list[str]:
    """Copy finished base and fold tasks from another run that trained them the same way.

    Used to compare objectives without retraining the shared stages: the base tasks when the
    base digests match, the fold tasks too when the training digests match. Returns the copied
    ids; raises RunMismatchError when nothing can be shared.
    """
    source_spec = load_spec(source)
    if base_digest(source_spec) != base_digest(spec):
        raise RunMismatchError(
            f"{source.uri} trained its base and fold models with different settings; "
            "only the search settings (objective, trials, ...) may differ to reuse them"
        )
    stages: tuple[str, ...] = ("base-",)
    if training_digest(source_spec) == training_digest(spec):
        stages = ("base-", "fold-")
    done = done_task_ids(target)
    copied = []
    for task_id in sorted(done_task_ids(source)):
        if not task_id.startswith(stages) or task_id in done:
            continue
        prefix = f"tasks/{task_id}/"
        keys = [key for key in source.list(prefix) if "/work/" not in key]
        keys.sort(key=lambda key: key.endswith("result.json"))  # the result goes last
        for key in keys:
            target.write_bytes(key, source.read_bytes(key))
        copied.append(task_id)
    return copied
