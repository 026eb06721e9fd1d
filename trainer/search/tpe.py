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

Trials are kept as they finish (the caller's `on_trial` stores them) and a search resumes from
them: `run_tpe(previous=...)` replays the finished trials into hyperopt's history and advances
the random state past them, so a search that was killed and resumed proposes exactly the
candidates an uninterrupted one would (tests/faults/test_kills.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    #: hyperopt's raw values of the candidate (op indices, unrounded floats), for resuming
    sample: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "policy": self.policy,
            "losses": self.losses,
            "objective": self.objective,
            "sample": self.sample,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(
            index=int(data["index"]),
            policy=dict(data["policy"]),
            losses={key: float(value) for key, value in data["losses"].items()},
            objective=float(data["objective"]),
            sample={key: float(value) for key, value in data.get("sample", {}).items()},
        )


def objective_value(
    objective: Objective,
    losses: dict[str, float],
    normalisers: Normalisers,
    weights: ObjectiveWeights,
) -> float:
    """The objective (lower is better) of one candidate from its losses."""
    if objective == "supervised" and "supervised_loss" not in losses:
        raise ValueError("objective 'supervised' needs labels: no supervised loss was computed")
    return float(per_image_objective(objective, losses, normalisers, weights))


def per_image_objective(
    objective: Objective,
    per_image: dict[str, Any],
    normalisers: Normalisers,
    weights: ObjectiveWeights,
) -> Any:
    """The objective of each image: every objective is a mean over images of a linear
    combination of per-image losses, so its standard error follows from these values. Given
    mean losses (floats), it is the candidate's objective (objective_value)."""
    if objective == "min_rotation":
        return per_image["rotation_loss"]
    if objective == "min_infonce":
        return per_image["infonce"]
    if objective == "max_infonce":
        return -per_image["infonce"]
    if objective == "minimax":
        rotation = per_image["rotation_loss"] / max(normalisers.rotation_loss, 1e-12)
        infonce = per_image["infonce"] / max(normalisers.infonce, 1e-12)
        return weights.rotation * rotation - weights.infonce * infonce
    if objective == "supervised":
        return per_image["supervised_loss"]
    raise ValueError(f"unknown objective {objective!r}")


@dataclass
class ObjectiveRace:
    """Stops a candidate once it cannot reach the top P (see RacingConfig in trainer/spec.py).

    `finished` holds the objectives of the candidates scored in full; until there are P of
    them, no candidate stops."""

    objective: Objective
    normalisers: Normalisers
    weights: ObjectiveWeights
    top: int
    z: float
    min_fraction: float
    finished: list[float] = field(default_factory=list)

    def threshold(self) -> float | None:
        """The P-th best objective of the candidates scored in full (None: fewer than P)."""
        if len(self.finished) < self.top:
            return None
        return sorted(self.finished)[self.top - 1]

    def should_stop(self, per_image: dict[str, Any], total: int) -> bool:
        threshold = self.threshold()
        values = per_image_objective(self.objective, per_image, self.normalisers, self.weights)
        seen = len(values)
        if threshold is None or seen < max(2, self.min_fraction * total):
            return False
        mean = float(values.mean())
        error = float(values.std()) / seen**0.5
        return mean - self.z * error > threshold


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
    previous: Sequence[TrialRecord] = (),
) -> list[TrialRecord]:
    """Run `trials` TPE evaluations; `score(policy_json) -> losses`. Returns every trial.

    `previous`: the trials a killed run of the same search finished (in order); they are not
    scored again, and the search goes on from them as if it had never stopped.
    """
    from hyperopt import STATUS_OK, fmin, tpe

    records: list[TrialRecord] = list(previous)[:trials]
    if [record.index for record in records] != list(range(len(records))):
        raise ValueError("previous trials must be the first trials of the search, in order")
    history, rstate = _resumed(records, op_names, seed)

    def evaluate(sample: dict[str, Any]) -> dict[str, Any]:
        index = len(records)
        policy = policy_from_sample(
            sample, sub_policies, ops_per_sub_policy, f"{name_prefix}-t{index}"
        )
        losses = score(policy)
        value = objective_value(objective, losses, normalisers, weights)
        record = TrialRecord(
            index=index,
            policy=policy,
            losses=losses,
            objective=value,
            sample=_raw_values(sample, op_names),
        )
        records.append(record)
        if on_trial is not None:
            on_trial(record)
        return {"loss": value, "status": STATUS_OK}

    if len(records) < trials:
        fmin(
            fn=evaluate,
            space=search_space(op_names, sub_policies, ops_per_sub_policy),
            algo=partial(tpe.suggest, n_startup_jobs=min(startup_trials, trials)),
            max_evals=trials,
            trials=history,
            rstate=rstate,
            show_progressbar=False,
        )
    return records


def sample_matches_policy(record: TrialRecord, op_names: Sequence[str]) -> bool:
    """Whether a kept trial's raw sample names the ops of its policy under `op_names` (it would
    not if the search space changed since the trial was kept)."""
    for sub_index, sub_policy in enumerate(record.policy.get("sub_policies", [])):
        for slot, op in enumerate(sub_policy):
            index = record.sample.get(f"s{sub_index}_o{slot}_op")
            if index is None or not 0 <= int(index) < len(op_names):
                return False
            if op_names[int(index)] != op.get("op"):
                return False
    return True


def _raw_values(sample: dict[str, Any], op_names: Sequence[str]) -> dict[str, float]:
    """hyperopt's own encoding of a sample: the index of a chosen op, the floats as drawn."""
    return {
        label: float(list(op_names).index(value)) if label.endswith("_op") else float(value)
        for label, value in sample.items()
    }


def _resumed(
    records: Sequence[TrialRecord], op_names: Sequence[str], seed: int
) -> tuple[Any, np.random.Generator]:
    """hyperopt history holding `records`, and the random state as it was after them.

    fmin draws one integer from its random state per proposal (hyperopt 0.2.7+), so drawing
    len(records) integers puts the state where the interrupted search left it.
    """
    from hyperopt import JOB_STATE_DONE, STATUS_OK, Trials
    from hyperopt.fmin import generate_trial

    history = Trials()
    documents = []
    for record in records:
        if not record.sample:
            raise ValueError(f"trial {record.index} has no recorded sample: cannot resume from it")
        values = {
            label: int(value) if label.endswith("_op") else value
            for label, value in record.sample.items()
        }
        if any(label.endswith("_op") and not 0 <= v < len(op_names) for label, v in values.items()):
            raise ValueError(f"trial {record.index} names an op outside this search's ops")
        document = generate_trial(record.index, values)
        document["state"] = JOB_STATE_DONE
        document["result"] = {"loss": record.objective, "status": STATUS_OK}
        documents.append(document)
    if documents:
        history.insert_trial_docs(documents)
        history.refresh()
    rstate = np.random.default_rng(seed)
    for _ in records:
        rstate.integers(2**31 - 1)
    return history, rstate


def top_trials(records: Sequence[TrialRecord], count: int) -> list[TrialRecord]:
    """The `count` lowest-objective trials (ties broken by trial order)."""
    finite = [record for record in records if np.isfinite(record.objective)]
    return sorted(finite, key=lambda record: (record.objective, record.index))[:count]
