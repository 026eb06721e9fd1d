"""Training checkpoints that outlive a pod: a preempted task resumes from its last epoch.

A worker trains in a local work directory. With a local store that directory is inside the
store, so a rerun finds its checkpoint. With S3 it is in the pod's cache, which a preempted
pod (spot reclaim, node drain) takes with it; so the checkpoint is mirrored to the store as it
is written (`<key>`, every `runtime.checkpoint_every` epochs), fetched back by the next attempt
before it trains, and deleted once the task's result is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfaugment.trainer.store import ArtifactStore

log = logging.getLogger(__name__)

#: Where a task's mirrored checkpoint lives, relative to its own prefix in the store.
SCRATCH_CHECKPOINT = "scratch/checkpoint.pt"


@dataclass
class CheckpointMirror:
    """Mirrors `local` (a training run's checkpoint file) to `key` in a remote store."""

    store: ArtifactStore
    key: str
    local: Path
    every: int = 1

    @property
    def active(self) -> bool:
        """Only remote stores need a mirror: a local store already holds the work directory."""
        return self.store.local_path(self.key) is None

    def restore(self) -> bool:
        """Fetch the mirrored checkpoint unless this attempt already has one; True if fetched."""
        if not self.active or self.local.exists() or not self.store.exists(self.key):
            return False
        self.store.download_file(self.key, self.local)
        log.info("resuming from %s, left by an earlier attempt", self.store.url(self.key))
        return True

    def after_epoch(self, epoch: int) -> None:
        """Upload the checkpoint the trainer has just written (every `every` epochs)."""
        if self.active and epoch % self.every == 0 and self.local.exists():
            self.store.upload_file(self.local, self.key)

    def upload(self) -> None:
        """Upload the checkpoint the trainer has just written (a mid-epoch one, too)."""
        if self.active and self.local.exists():
            self.store.upload_file(self.local, self.key)

    def discard(self) -> None:
        if self.active:
            self.store.delete(self.key)

    def wrap(self, on_epoch: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """An epoch callback that mirrors the checkpoint, then calls `on_epoch`."""

        def mirrored(figures: dict[str, Any]) -> None:
            self.after_epoch(int(figures.get("epoch", 0)))
            on_epoch(figures)

        return mirrored
