"""TPE search over candidate policies (Fast AutoAugment's search, SelfAugment's objectives).

A candidate policy is N_T sub-policies of N_tau ops, each op = (name, p, magnitude). hyperopt's
TPE proposes candidates; each is scored by forward passes only (see trainer/evaluation/scoring.py) and
turned into one objective value, lower is better:

    min_rotation   L_rot
    min_infonce    L_nce
    max_infonce    -L_nce
    minimax        w_rot * L_rot / E[L_rot] - w_nce * L_nce / E[L_nce]
    supervised     L_sup (cross-entropy of a supervised linear head; an oracle needing labels)

E[.] is the mean over the folds of the loss under the base policy (paper, Section 3.2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from selfaugment.trainer.spec import Objective, ObjectiveWeights


@dataclass(frozen=True)
class Normalisers:
    """Mean losses over the folds under the base policy (the E[.] of the minimax objective)."""

    rotation_loss: float
    infonce: float


@dataclass(frozen=True)
class TrialRecord:
    """One scored candidate."""

    index: int
    policy: dict[str, Any]
    losses: dict[str, float]
    objective: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "policy": self.policy,
            "losses": self.losses,
            "objective": self.objective,
        }


def objective_value(
    objective: Objective,
    losses: dict[str, float],
    normalisers: Normalisers,
    weights: ObjectiveWeights,
) -> float:
    """The objective (lower is better) of one candidate from its losses."""
    if objective == "min_rotation":
        return losses["rotation_loss"]
    if objective == "min_infonce":
        return losses["infonce"]
    if objective == "max_infonce":
        return -losses["infonce"]
    if objective == "minimax":
        rotation = losses["rotation_loss"] / max(normalisers.rotation_loss, 1e-12)
        infonce = losses["infonce"] / max(normalisers.infonce, 1e-12)
        return weights.rotation * rotation - weights.infonce * infonce
    if objective == "supervised":
        if "supervised_loss" not in losses:
            raise ValueError("objective 'supervised' needs labels: no supervised loss was computed")
        return losses["supervised_loss"]
    raise ValueError(f"unknown objective {objective!r}")


def search_space(op_names: Sequence[str], sub_policies: int, ops_per_sub_policy: int) -> dict:
    """hyperopt space: an op choice, a probability and a magnitude per slot."""
    from hyperopt import hp

    space: dict[str, Any] = {}
    for sub in range(sub_policies):
        for slot in range(ops_per_sub_policy):
            prefix = f"s{sub}_o{slot}"
            space[f"{prefix}_op"] = hp.choice(f"{prefix}_op", list(op_names))
            space[f"{prefix}_p"] = hp.uniform(f"{prefix}_p", 0.0, 1.0)
            space[f"{prefix}_m"] = hp.uniform(f"{prefix}_m", 0.0, 1.0)
    return space


def policy_from_sample(
    sample: dict[str, Any], sub_policies: int, ops_per_sub_policy: int, name: str
) -> dict[str, Any]:
    """A policy JSON document (schema of trainer/policy/augmenter.py) from one hyperopt sample."""
    subs = []
    for sub in range(sub_policies):
        ops = []
        for slot in range(ops_per_sub_policy):
            prefix = f"s{sub}_o{slot}"
            ops.append(
                {
                    "op": sample[f"{prefix}_op"],
                    "p": round(float(sample[f"{prefix}_p"]), 4),
                    "magnitude": round(float(sample[f"{prefix}_m"]), 4),
                }
            )
        subs.append(ops)
    return {"schema_version": 1, "name": name, "sub_policies": subs}


def run_tpe(
    score: Callable[[dict[str, Any]], dict[str, float]],
    *,
    op_names: Sequence[str],
    sub_policies: int,
    ops_per_sub_policy: int,
    trials: int,
    startup_trials: int,
    objective: Objective,
    normalisers: Normalisers,
    weights: ObjectiveWeights,
    seed: int,
    name_prefix: str,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> list[TrialRecord]:
    """Run `trials` TPE evaluations; `score(policy_json) -> losses`. Returns every trial."""
    from hyperopt import STATUS_OK, Trials, fmin, tpe

    records: list[TrialRecord] = []

    def evaluate(sample: dict[str, Any]) -> dict[str, Any]:
        index = len(records)
        policy = policy_from_sample(
            sample, sub_policies, ops_per_sub_policy, f"{name_prefix}-t{index}"
        )
        losses = score(policy)
        value = objective_value(objective, losses, normalisers, weights)
        record = TrialRecord(index=index, policy=policy, losses=losses, objective=value)
        records.append(record)
        if on_trial is not None:
            on_trial(record)
        return {"loss": value, "status": STATUS_OK}

    fmin(
        fn=evaluate,
        space=search_space(op_names, sub_policies, ops_per_sub_policy),
        algo=partial(tpe.suggest, n_startup_jobs=min(startup_trials, trials)),
        max_evals=trials,
        trials=Trials(),
        rstate=np.random.default_rng(seed),
        show_progressbar=False,
    )
    return records


def top_trials(records: Sequence[TrialRecord], count: int) -> list[TrialRecord]:
    """The `count` lowest-objective trials (ties broken by trial order)."""
    finite = [record for record in records if np.isfinite(record.objective)]
    return sorted(finite, key=lambda record: (record.objective, record.index))[:count]
