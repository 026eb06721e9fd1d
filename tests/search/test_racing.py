"""Racing TPE candidates: a candidate stops once its objective, less z standard errors over the
images seen, is worse than the current P-th best; the top P are always scored in full."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from selfaugment.trainer.config import load_config
from selfaugment.trainer.search.planner import plan
from selfaugment.trainer.search.tasks import run_task
from selfaugment.trainer.search.tpe import Normalisers, ObjectiveRace, per_image_objective
from selfaugment.trainer.spec import AugmentSearchSpec, ObjectiveWeights
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import done_task_ids, prepare_run

REPO = Path(__file__).resolve().parents[2]
NORM = Normalisers(rotation_loss=2.0, infonce=4.0)


def _losses(rotation: float, infonce: float, count: int, spread: float = 0.1) -> dict:
    wiggle = torch.linspace(-spread, spread, count, dtype=torch.float64)
    return {"rotation_loss": rotation + wiggle, "infonce": infonce + wiggle}


def test_the_race_stops_only_a_candidate_that_cannot_reach_the_top() -> None:
    race = ObjectiveRace(
        "minimax", NORM, ObjectiveWeights(), top=2, z=2.0, min_fraction=0.25, finished=[]
    )
    bad = _losses(rotation=3.0, infonce=2.0, count=40)  # 1.5 - 0.5 = 1.0 per image
    assert not race.should_stop(bad, total=100)  # fewer than P finished: no threshold yet
    race.finished = [-0.5, 0.2, 0.9]
    assert race.threshold() == 0.2
    assert race.should_stop(bad, total=100)
    assert not race.should_stop(_losses(3.0, 2.0, count=20), total=100)  # < min_fraction seen
    close = _losses(rotation=1.2, infonce=2.0, count=40, spread=1.0)  # mean 0.1, wide
    assert not race.should_stop(close, total=100)
    values = per_image_objective("minimax", bad, NORM, ObjectiveWeights())
    assert torch.allclose(values, bad["rotation_loss"] / 2.0 - bad["infonce"] / 4.0)


def test_a_raced_search_scores_its_top_policies_in_full(tmp_path: Path) -> None:
    overrides = [
        "dataset.limit=240",
        "model.width=4",
        "moco.queue_size=128",
        "optim.batch_size=64",
        "search.base_policy=RandomResizedCrop",
        "search.fold_epochs=1",
        "search.folds=2",
        "search.repeats=1",
        "search.trials=16",
        "search.startup_trials=4",
        "search.top_policies=2",
        "search.sub_policies=2",
        "search.racing.enabled=true",
        "search.racing.z=0.5",
        "retrain.epochs=1",
        "evaluation.epochs=2",
    ]
    spec = load_config(AugmentSearchSpec, REPO / "examples" / "search-smoke.yaml", overrides)
    store = open_store(tmp_path / "run")
    prepare_run(store, spec)
    while (state := plan(spec, done_task_ids(store))).stage in ("folds", "search"):
        run_task(store, state.ready[0].id)
    result: dict[str, Any] = store.read_json("tasks/search-f0-r0/result.json")
    racing = result["racing"]
    full = racing["images_in_full"] // 16
    trials = json.loads((tmp_path / "run" / "tasks" / "search-f0-r0" / "trials.json").read_text())
    assert [int(t["losses"]["images"]) for t in trials].count(full) == 16 - racing["stopped_early"]
    assert racing["images_scored"] == sum(int(t["losses"]["images"]) for t in trials)
    assert all(int(t["losses"]["images"]) == full for t in result["top"])
    assert racing["enabled"] and racing["images_scored"] < racing["images_in_full"]
    assert racing["stopped_early"] >= 1  # on this seed: 6 of 16 stopped, 1,488 of 1,920 images
