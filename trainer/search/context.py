"""What every task of a search runs with: its spec, store, local work directory and progress.

The result's existence in the store is what marks a task done; workers write it last.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.data import (
    Images,
    ImageSet,
    StreamedImages,
    kfold_splits,
    load_dataset,
    open_images,
    open_prepared_uri,
    resident,
)
from selfaugment.trainer.search.planner import PREPARE_TASK, Task, reads_prepared
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactStore, StoreError
from selfaugment.trainer.store.layout import (
    read_results,
    result_key,
    store_endpoint,
    task_key,
)
from selfaugment.trainer.store.s3 import cache_root


class TaskInputError(SelfAugmentError):
    """A task cannot start: a dependency's result is missing or unusable."""


def work_directory(store: ArtifactStore, name: str, run_key: str = "") -> Path:
    """Local directory for a task's files: inside a local store, else a cache directory.

    The cache directory is keyed by the store URI and `run_key` (the spec's digest), so a
    different run under the same URI never resumes from another run's scratch checkpoint.
    """
    local = store.local_path(name + "/.keep")
    if local is not None:
        path = local.parent
    else:
        digest = hashlib.sha256(f"{store.uri}\n{run_key}".encode()).hexdigest()[:12]
        path = cache_root() / "work" / digest / name
    path.mkdir(parents=True, exist_ok=True)
    return path


#: How many skipped files a result, status and report name (the count is always whole).
SKIPPED_NAMED = 20


def skipped_record(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """Unreadable images a task's dataset load left out: the count and the first few by name."""
    return {
        "count": len(skipped),
        "files": [{"file": name, "reason": reason} for name, reason in skipped[:SKIPPED_NAMED]],
    }


@dataclass
class ProgressWriter:
    """Writes a task's latest figures to the store, at most every `interval` seconds."""

    store: ArtifactStore
    key: str
    interval: float = 2.0
    figures: dict[str, Any] = field(default_factory=dict)
    _last: float = 0.0

    def update(self, force: bool = False, **figures: Any) -> None:
        self.figures.update(figures)
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.store.write_json(self.key, self.figures)


@dataclass
class TaskContext:
    """Everything a task runner needs."""

    spec: AugmentSearchSpec
    store: ArtifactStore
    task: Task
    workdir: Path
    progress: ProgressWriter

    loaded_data: ImageSet | StreamedImages | None = None

    @property
    def data(self) -> ImageSet | StreamedImages:
        """The search's dataset, opened on first use: from the shards the `prepare` task
        made (decoded into memory when it fits `dataset.memory_budget`, else streamed), or
        loaded directly for a built-in source."""
        if self.loaded_data is None:
            dataset, seed = self.spec.dataset, self.spec.search.seed
            if reads_prepared(dataset):
                prepared = open_prepared_uri(self.prepared_uri, endpoint=self._endpoint)
                self.loaded_data = open_images(
                    prepared, dataset, seed, memory_budget=dataset.memory_budget_bytes
                )
            else:
                self.loaded_data = load_dataset(dataset, seed=seed)
        return self.loaded_data

    @property
    def prepared_uri(self) -> str:
        """The prepared dataset's URI, from the `prepare` task's result."""
        try:
            result = self.store.read_json(result_key(PREPARE_TASK))
            return str(result["prepared"]["uri"])
        except (StoreError, KeyError, TypeError) as error:
            raise TaskInputError(
                f"{self.store.url(result_key(PREPARE_TASK))}: no prepared dataset "
                f"({type(error).__name__}: {error}); rerun task {PREPARE_TASK}"
            ) from None

    @property
    def _endpoint(self) -> str | None:
        return store_endpoint(self.store)

    def resident(self, images: ImageSet | StreamedImages, share: float = 1.0) -> Images:
        """`images` in memory, for a probe or the scorer that reads them many times: all of
        them when `share` of the memory budget holds them, else a seeded sample that fits."""
        budget = int(self.spec.dataset.memory_budget_bytes * share)
        return resident(images, budget, self.seed)

    @cached_property
    def splits(self) -> list[tuple[Any, Any]]:
        folds = self.spec.search.folds if self.spec.search.algorithm == "selfaugment" else 1
        return kfold_splits(len(self.data), folds, self.spec.search.seed)

    def fold_data(self, fold: int) -> tuple[Any, Any]:
        train_index, heldout_index = self.splits[fold]
        return self.data.subset(train_index), self.data.subset(heldout_index)

    def scoring_images(self, heldout: ImageSet | StreamedImages) -> Images:
        """The held-out images candidates are scored on (`search.score_images` caps them),
        in memory (a seeded sample when they do not fit the memory budget)."""
        limit = self.spec.search.score_images
        if limit is not None and limit < len(heldout):
            chosen = np.random.default_rng(self.seed).choice(len(heldout), limit, replace=False)
            heldout = heldout.subset(np.sort(chosen))
        return self.resident(heldout)

    @property
    def seed(self) -> int:
        return self.spec.search.seed

    def upload(self, local: Path, name: str) -> str:
        key = task_key(self.task.id, name)
        self.store.upload_file(local, key)
        return self.store.url(key)

    def fetch(self, task_id: str, name: str) -> Path:
        """A dependency's artifact as a local file (downloaded unless the store is local)."""
        key = task_key(task_id, name)
        local = self.store.local_path(key)
        if local is not None:
            if not local.exists():
                raise TaskInputError(f"{self.store.url(key)} is missing: rerun task {task_id}")
            return local
        return self.store.download_file(key, self.workdir / "inputs" / task_id / name)

    def results(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {
            task_id: result
            for task_id, result in read_results(self.store).items()
            if task_id.startswith(prefix)
        }
