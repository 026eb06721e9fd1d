"""TPE search plumbing: objectives, candidate encoding, determinism, top-P selection.

The score function here is synthetic (a known function of the candidate) so that the search
itself is tested; real scoring by forward passes is tested in test_scoring and test_search_e2e.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from selfaugment.trainer.search.tpe import (
    Normalisers,
    TrialRecord,
    objective_value,
    policy_from_sample,
    run_tpe,
    top_trials,
)
from selfaugment.trainer.spec import ObjectiveWeights

OPS = ("Invert", "Rotate", "Color", "Equalize")
NORM = Normalisers(rotation_loss=2.0, infonce=4.0)


def test_objectives() -> None:
    losses = {"rotation_loss": 1.0, "infonce": 6.0}
    weights = ObjectiveWeights()
    assert objective_value("min_rotation", losses, NORM, weights) == 1.0
    assert objective_value("min_infonce", losses, NORM, weights) == 6.0
    assert objective_value("max_infonce", losses, NORM, weights) == -6.0
    # minimax: L_rot / E[L_rot] - L_nce / E[L_nce] = 0.5 - 1.5
    assert objective_value("minimax", losses, NORM, weights) == pytest.approx(-1.0)
    weighted = ObjectiveWeights(rotation=2.0, infonce=0.5)
    assert objective_value("minimax", losses, NORM, weighted) == pytest.approx(1.0 - 0.75)
    with pytest.raises(ValueError, match="needs labels"):
        objective_value("supervised", losses, NORM, weights)
    assert objective_value("supervised", {**losses, "supervised_loss": 0.3}, NORM, weights) == 0.3


def test_policy_from_sample_shape() -> None:
    sample = {}
    for sub in range(2):
        for slot in range(3):
            sample[f"s{sub}_o{slot}_op"] = "Rotate"
            sample[f"s{sub}_o{slot}_p"] = 0.123456
            sample[f"s{sub}_o{slot}_m"] = 0.5
    policy = policy_from_sample(sample, 2, 3, "x")
    assert policy["schema_version"] == 1 and policy["name"] == "x"
    assert len(policy["sub_policies"]) == 2 and len(policy["sub_policies"][0]) == 3
    assert policy["sub_policies"][0][0] == {"op": "Rotate", "p": 0.1235, "magnitude": 0.5}


def _invert_strength(policy: dict) -> dict[str, float]:
    """Synthetic loss: lowest when candidates use Invert strongly and often."""
    total = 0.0
    for sub in policy["sub_policies"]:
        for op in sub:
            if op["op"] == "Invert":
                total += op["p"]
    return {"rotation_loss": 10.0 - total, "infonce": 1.0}


_SEARCH: dict[str, Any] = {
    "op_names": OPS,
    "sub_policies": 2,
    "ops_per_sub_policy": 2,
    "startup_trials": 10,
    "objective": "min_rotation",
    "normalisers": NORM,
    "weights": ObjectiveWeights(),
    "name_prefix": "t",
}


def _search(seed: int, trials: int = 40) -> list[TrialRecord]:
    return run_tpe(_invert_strength, **_SEARCH, trials=trials, seed=seed)


def test_tpe_improves_on_random_start_and_is_deterministic() -> None:
    records = _search(seed=0, trials=60)
    assert len(records) == 60 and [r.index for r in records] == list(range(60))
    random_phase = sum(r.objective for r in records[:10]) / 10
    model_phase = sum(r.objective for r in records[-20:]) / 20
    assert model_phase < random_phase - 0.3, (random_phase, model_phase)
    again = _search(seed=0, trials=60)
    assert [r.policy for r in again] == [r.policy for r in records]
    other = _search(seed=1, trials=60)
    assert [r.policy for r in other] != [r.policy for r in records]


def test_top_trials_orders_and_drops_non_finite() -> None:
    def record(index: int, value: float) -> TrialRecord:
        return TrialRecord(index=index, policy={}, losses={}, objective=value)

    records = [record(0, 3.0), record(1, float("nan")), record(2, 1.0), record(3, 1.0)]
    assert [r.index for r in top_trials(records, 3)] == [2, 3, 0]


def test_a_resumed_search_proposes_what_an_uninterrupted_one_would() -> None:
    """Killed after trial 16 with its trials kept (through JSON, as the store keeps them), the
    search resumes from them: the finished trials are not scored again, and the rest are the
    very candidates the uninterrupted search proposed."""
    full = _search(seed=3, trials=30)

    class Killed(Exception):
        pass

    kept: list[TrialRecord] = []

    def keep(record: TrialRecord) -> None:
        kept.append(TrialRecord.from_dict(json.loads(json.dumps(record.to_dict()))))
        if record.index == 16:
            raise Killed

    with pytest.raises(Killed):
        run_tpe(_invert_strength, **{**_SEARCH, "seed": 3, "trials": 30}, on_trial=keep)
    scored: list[dict] = []

    def score(policy: dict) -> dict[str, float]:
        scored.append(policy)
        return _invert_strength(policy)

    resumed = run_tpe(score, **{**_SEARCH, "seed": 3, "trials": 30}, previous=kept)
    assert len(kept) == 17 and len(scored) == 13
    assert [r.policy for r in resumed] == [r.policy for r in full]
    assert [r.objective for r in resumed] == [r.objective for r in full]
    with pytest.raises(ValueError, match="first trials of the search"):
        run_tpe(score, **{**_SEARCH, "seed": 3, "trials": 30}, previous=kept[1:])
