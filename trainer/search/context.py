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
from selfaugment.trainer.data import ImageSet, kfold_splits, load_dataset
from selfaugment.trainer.search.planner import Task
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactStore
from selfaugment.trainer.store.layout import (
    read_results,
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

    loaded_data: ImageSet | None = None

    @property
    def data(self) -> ImageSet:
        """The search's dataset, decoded on first use."""
        if self.loaded_data is None:
            self.loaded_data = load_dataset(self.spec.dataset, seed=self.spec.search.seed)
        return self.loaded_data

    @cached_property
    def splits(self) -> list[tuple[Any, Any]]:
        folds = self.spec.search.folds if self.spec.search.algorithm == "selfaugment" else 1
        return kfold_splits(len(self.data), folds, self.spec.search.seed)

    def fold_data(self, fold: int) -> tuple[ImageSet, ImageSet]:
        train_index, heldout_index = self.splits[fold]
        return self.data.subset(train_index), self.data.subset(heldout_index)

    def scoring_images(self, heldout: ImageSet) -> ImageSet:
        """The held-out images candidates are scored on (`search.score_images` caps them)."""
        limit = self.spec.search.score_images
        if limit is None or limit >= len(heldout):
            return heldout
        chosen = np.random.default_rng(self.seed).choice(len(heldout), limit, replace=False)
        return heldout.subset(np.sort(chosen))

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
