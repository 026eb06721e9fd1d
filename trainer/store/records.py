"""The result records of a search's tasks, as written to `tasks/<task-id>/result.json`.

Each stage returns its record (trainer/search/stages.py); `run_task` adds the TaskFields. The
report, `selfaugment status` and the operator read these keys (readers use `.get` for fields a
record of an older run may lack; RESULT_SCHEMA_VERSION changes when a field changes meaning).
"""

from __future__ import annotations

from typing import Any, TypedDict

from typing_extensions import NotRequired


class TaskFields(TypedDict):
    """Added to every record by run_task."""

    schema_version: int
    task: str
    kind: str
    stage: str
    seconds: float


class BaseResult(TypedDict):
    """A base-policy candidate: one short MoCo run with a single transform."""

    transform: str
    rotation_accuracy: float
    rotation_loss: float
    final_loss: float | None
    loss_history: list[float]
    rung: int  # successive halving: the rung (0 when exhaustive)
    epochs: int  # the epoch of the base_epochs schedule this training reached
    continued_from: str | None  # the earlier rung's task this one went on from
    seed: int  # the training (and probe) seed
    heldout_images: int  # images the rotation score was measured on


class FoldResult(TypedDict):
    """MoCo with the base policy on a fold's training part, and its heads."""

    fold: int
    base_policy: str
    rotation_accuracy: float
    rotation_loss: float
    final_loss: float | None
    loss_history: list[float]
    base_losses: dict[str, float]
    checkpoint: str
    linear_accuracy: NotRequired[float]  # the supervised objective's oracle head


class SearchResult(TypedDict):
    """One (fold, repeat) of the TPE search."""

    fold: int
    repeat: int
    objective: str
    normalisers: dict[str, float]
    trials_done: int
    best_objective: float | None
    objective_history: list[float]
    top: list[dict[str, Any]]  # TrialRecord.to_dict() of the best trials
    racing: dict[str, Any]  # enabled, stopped_early, images_scored, images_in_full


class MergeResult(TypedDict):
    """The union of the top policies, written to policy.json."""

    candidates: int
    sub_policies: int
    policy_uri: str
    policy_summary: dict[str, float]


class RandAugmentResult(TypedDict):
    """One (N, M) cell of SelfRandAugment's grid."""

    n: int
    m: int
    rotation_accuracy: float
    rotation_loss: float
    final_loss: float | None


class RetrainResult(TypedDict):
    """MoCo from scratch on all data with the found policy, and its evaluation."""

    policy: str
    augment: dict[str, Any]
    final_loss: float | None
    loss_history: list[float]
    checkpoint: str
    rotation_accuracy: NotRequired[float]
    rotation_loss: NotRequired[float]
    linear_accuracy: NotRequired[float]  # only where the dataset has labels
    linear_loss: NotRequired[float]
