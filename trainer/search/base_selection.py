"""Choosing the base transform from the base-candidate results, with each score's uncertainty.

The paper's criterion is held-out rotation accuracy after a short MoCo run per single transform
(selfaugment-paper.txt, "Select the base policy"). A score from one training run is noisy: in
docs/results/rotation-noise, the training seed moves rotation accuracy by 9-23 points, the
probe's seed by 0.4. So the candidates of the last rung can be trained with several seeds
(`search.base_selection.seeds`); a candidate's score is then the mean over its seeds and its
uncertainty the standard error over them. With one seed, the only uncertainty that can be
measured is the held-out images' (binomial, over 4 rotations per image), which leaves the
training seed out: the report and `selfaugment status` say so.

A winner is *separated* from the runner-up when their difference exceeds twice the standard
error of that difference; otherwise the choice is within the noise, and the user is told.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from selfaugment.trainer.search.planner import base_rungs
from selfaugment.trainer.spec import AugmentSearchSpec

#: Rotation prediction classifies each held-out image under 4 rotations.
ROTATIONS = 4
_SCORED = frozenset({"transform", "rotation_accuracy", "rotation_loss"})


class NoBaseResultsError(ValueError):
    """The base stage has produced no result to choose from."""


@dataclass(frozen=True)
class CandidateScore:
    """A base candidate's score at the last rung: mean over its seeds, and its uncertainty."""

    transform: str
    accuracy: float
    loss: float
    standard_error: float
    seeds: int

    @property
    def uncertainty_source(self) -> str:
        return "training seeds" if self.seeds > 1 else "held-out images only"

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "rotation_accuracy": self.accuracy,
            "rotation_loss": self.loss,
            "standard_error": self.standard_error,
            "seeds": self.seeds,
            "uncertainty": self.uncertainty_source,
        }


def rank_candidates(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Base-candidate results best first: held-out rotation accuracy, then the lower rotation
    loss, then the transform's name (so ties rank alike in every process)."""
    return sorted(
        results, key=lambda r: (-r["rotation_accuracy"], r["rotation_loss"], r["transform"])
    )


def _image_error(result: dict[str, Any]) -> float:
    images = int(result.get("heldout_images", 0))
    if images <= 0:
        return 0.0
    accuracy = float(result["rotation_accuracy"])
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / (ROTATIONS * images))


def final_scores(
    spec: AugmentSearchSpec, results: dict[str, dict[str, Any]]
) -> list[CandidateScore]:
    """The last rung's candidates, best first, each averaged over its seeds."""
    last = len(base_rungs(spec)) - 1
    by_transform: dict[str, list[dict[str, Any]]] = {}
    for task_id, result in results.items():
        if not task_id.startswith("base-") or not _SCORED.issubset(result):
            continue  # not a base-candidate result this version can read
        if int(result.get("rung", 0)) == last:
            by_transform.setdefault(str(result["transform"]), []).append(result)
    if not by_transform:
        raise NoBaseResultsError("no base-candidate results: the base stage has not run")
    scores = []
    for transform, runs in by_transform.items():
        accuracies = [float(run["rotation_accuracy"]) for run in runs]
        mean = sum(accuracies) / len(accuracies)
        if len(runs) > 1:
            spread = sum((value - mean) ** 2 for value in accuracies) / (len(runs) - 1)
            error = math.sqrt(spread / len(runs))
        else:
            error = _image_error(runs[0])
        loss = sum(float(run["rotation_loss"]) for run in runs) / len(runs)
        scores.append(CandidateScore(transform, mean, loss, error, len(runs)))
    return sorted(scores, key=lambda s: (-s.accuracy, s.loss, s.transform))


def separation(scores: list[CandidateScore]) -> dict[str, Any] | None:
    """Whether the winner is ahead of the runner-up by more than twice the standard error of
    their difference; None with a single candidate."""
    if len(scores) < 2:
        return None
    winner, runner_up = scores[0], scores[1]
    difference = winner.accuracy - runner_up.accuracy
    threshold = 2 * math.sqrt(winner.standard_error**2 + runner_up.standard_error**2)
    return {
        "winner": winner.transform,
        "runner_up": runner_up.transform,
        "difference": difference,
        "threshold": threshold,
        "separated": difference > threshold,
        "uncertainty": winner.uncertainty_source,
    }


def describe_separation(verdict: dict[str, Any] | None) -> str | None:
    """One line for the report and `selfaugment status`; None when there is nothing to say."""
    if verdict is None:
        return None
    head = (
        f"{verdict['winner']} leads {verdict['runner_up']} by "
        f"{100 * verdict['difference']:.1f} points of rotation accuracy "
        f"(2 standard errors: {100 * verdict['threshold']:.1f}, from {verdict['uncertainty']})"
    )
    if verdict["separated"]:
        return head + ": separated"
    return head + (
        ": NOT separated, the choice between them is within the noise"
        + (
            "; train the last rung with more seeds (search.base_selection.seeds)"
            if verdict["uncertainty"] == "held-out images only"
            else ""
        )
    )


def select_base(spec: AugmentSearchSpec, results: dict[str, dict[str, Any]]) -> str:
    """The base transform: given in the spec, or the best of the last rung (mean over seeds)."""
    if spec.search.base_policy != "auto":
        return spec.search.base_policy
    return final_scores(spec, results)[0].transform
