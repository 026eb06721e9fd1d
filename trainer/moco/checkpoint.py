"""Checkpoints: atomic writes, loading, and rebuilding a backbone from a pretrain checkpoint.

A checkpoint is a plain dict (loadable with ``weights_only=True``): schema_version, kind,
config (the PretrainConfig as JSON data), in_channels, epoch (epochs finished), global_step, model (MoCo
state_dict: encoders, queue, queue_ptr), optimizer, rng (python, numpy, torch, CUDA and the
augmentation generator), loss_history (mean loss per epoch) and metrics (per-epoch records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.config import PretrainConfig, parse_config
from selfaugment.trainer.moco.models import ResNetBackbone, build_backbone
from selfaugment.trainer.store.artifacts import atomic_write

CHECKPOINT_SCHEMA_VERSION = 1
CHECKPOINT_KIND = "moco-pretrain"
BACKBONE_PREFIX = "encoder_q.backbone."


class CheckpointError(SelfAugmentError):
    """A checkpoint file is missing, unreadable or not a pretrain checkpoint; names the file."""


def save_checkpoint(path: str | Path, payload: Any) -> None:
    """Write `payload` (tensors and plain data) to `path` atomically; a full disk raises
    DiskFullError naming the folder, not torch's "unexpected pos"."""
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a pretrain checkpoint, checking its kind and schema version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise CheckpointError(f"{path}: {_unreadable(error)}") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a SelfAugment pretrain checkpoint")
    version = payload.get("schema_version")
    if version != CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint schema_version {version!r} is not supported "
            f"(expected {CHECKPOINT_SCHEMA_VERSION})"
        )
    return payload


def _unreadable(error: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused a file, never torch's advice to
    retry unsafely: a checkpoint of ours holds only tensors and plain data."""
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        return (
            "not a SelfAugment checkpoint: it is not a plain tensor file (refused, because "
            "loading its Python objects could run code)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"cannot read checkpoint: {first[:200]}"


def checkpoint_config(payload: dict[str, Any], source: str) -> PretrainConfig:
    """The validated PretrainConfig stored in a checkpoint."""
    return parse_config(PretrainConfig, payload["config"], f"{source}: config")


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query backbone's entries of a MoCo state_dict, without their prefix."""
    return {
        key[len(BACKBONE_PREFIX) :]: value
        for key, value in model_state.items()
        if key.startswith(BACKBONE_PREFIX)
    }


def load_backbone(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ResNetBackbone, PretrainConfig]:
    """Rebuild the trained query backbone of a pretrain checkpoint, with its config."""
    payload = load_checkpoint(path, map_location)
    cfg = checkpoint_config(payload, str(path))
    in_channels = int(payload.get("in_channels", cfg.dataset.channels))
    backbone = build_backbone(cfg.model, in_channels=in_channels)
    state = backbone_state(payload["model"])
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: backbone weights do not match its config: {error}"
        ) from None
    return backbone, cfg
