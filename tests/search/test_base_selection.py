"""Base-policy selection by successive halving: the rungs, their task ids, and the promise that
a candidate surviving every rung trains exactly as it would in the exhaustive stage.

The stage test runs real workers' code in this process (`run_task`) on the bundled digits with a
width-4 ResNet, so the whole search takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic.alias_generators import to_camel

from selfaugment.trainer.config import ConfigError, load_config, parse_config
from selfaugment.trainer.search.base_selection import (
    describe_separation,
    final_scores,
    separation,
)
from selfaugment.trainer.search.planner import all_tasks, base_rungs, plan
from selfaugment.trainer.search.status import summarise
from selfaugment.trainer.search.tasks import run_task
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import done_task_ids, prepare_run

REPO = Path(__file__).resolve().parents[2]
ALL16 = "all"


def _spec(**search: Any) -> AugmentSearchSpec:
    raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    raw["search"].update({to_camel(name): value for name, value in search.items()})
    return parse_config(AugmentSearchSpec, raw, source="test")


def test_rungs_halve_the_candidates_and_end_at_the_full_budget() -> None:
    spec = _spec(
        base_candidates=ALL16,
        base_epochs=20,
        base_selection={"method": "successive_halving", "eta": 2},
    )
    rungs = base_rungs(spec)
    # digits are 1-channel: Color (saturation) is the identity there and is left out
    assert [(r.epochs, r.candidates) for r in rungs] == [(2, 15), (5, 8), (10, 4), (20, 2)]
    ids = [task.id for task in all_tasks(spec) if task.kind == "base"]
    assert ids[:2] == ["base-r0-randomresizedcrop", "base-r0-shearx"]
    assert "base-r0-color" not in ids
    assert ids[15:17] == ["base-r1-s0", "base-r1-s1"] and ids[-1] == "base-r3-s1"
    assert len(ids) == 15 + 8 + 4 + 2
    state = plan(spec, set())
    assert {task.id for task in state.ready} == set(ids[:15])  # later rungs wait for theirs
    rung_one = next(task for task in all_tasks(spec) if task.id == "base-r1-s0")
    assert rung_one.depends_on == tuple(ids[:15])
    # the rungs stop where epochs would fall below min_epochs; the last rung has >= 2
    few = _spec(base_epochs=2, base_selection={"method": "successive_halving"})
    assert [(r.epochs, r.candidates) for r in base_rungs(few)] == [(1, 15), (2, 8)]
    exhaustive = _spec(base_epochs=20, base_selection={"method": "exhaustive"})
    assert [(r.epochs, r.candidates) for r in base_rungs(exhaustive)] == [(20, 15)]
    rgb = _spec(base_epochs=20, base_selection={"method": "successive_halving"})
    rgb = rgb.model_copy(update={"dataset": rgb.dataset.model_copy(update={"channels": 3})})
    assert [r.candidates for r in base_rungs(rgb)] == [16, 8, 4, 2]
    assert "base-rotate" in {task.id for task in all_tasks(exhaustive)}  # ids unchanged


def test_bad_base_selection_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="minEpochs"):
        _spec(base_epochs=4, base_selection={"method": "successive_halving", "min_epochs": 5})
    with pytest.raises(ConfigError, match="baseSelection.eta"):
        _spec(base_selection={"method": "successive_halving", "eta": 1})
    with pytest.raises(ConfigError, match="baseSelection.method"):
        _spec(base_selection={"method": "hyperband"})
    with pytest.raises(ConfigError, match="Color is the identity on 1-channel images"):
        _spec(base_candidates=["Rotate", "Color"])


TINY = {
    "dataset.limit": 240,
    "model.width": 4,
    "moco.queue_size": 128,
    "optim.batch_size": 64,
    "search.base_candidates": "[RandomResizedCrop, Rotate, Cutout]",
    "search.base_epochs": 2,
    "search.fold_epochs": 1,
    "search.folds": 2,
    "search.repeats": 1,
    "search.trials": 3,
    "search.startup_trials": 2,
    "search.top_policies": 2,
    "search.sub_policies": 2,
    "retrain.epochs": 1,
    "evaluation.epochs": 2,
}


def _tiny(**extra: object) -> AugmentSearchSpec:
    overrides = [f"{key}={value}" for key, value in {**TINY, **extra}.items()]
    return load_config(AugmentSearchSpec, REPO / "examples" / "search-smoke.yaml", overrides)


def _run_all(spec: AugmentSearchSpec, root: Path) -> dict[str, dict[str, Any]]:
    store = open_store(root)
    prepare_run(store, spec)
    while not (state := plan(spec, done_task_ids(store))).finished:
        run_task(store, state.ready[0].id)
    return {
        path.parent.name: json.loads(path.read_text())
        for path in (root / "tasks").glob("*/result.json")
    }


def test_a_survivor_trains_exactly_as_in_the_exhaustive_stage(tmp_path: Path) -> None:
    spec = _tiny(**{"search.base_selection.method": "successive_halving"})
    assert [(r.epochs, r.candidates) for r in base_rungs(spec)] == [(1, 3), (2, 2)]
    results = _run_all(spec, tmp_path / "halving")
    first = [results[f"base-r0-{name}"] for name in ("randomresizedcrop", "rotate", "cutout")]
    assert all(r["epochs"] == 1 and len(r["loss_history"]) == 1 for r in first)
    ranked = sorted(first, key=lambda r: (-r["rotation_accuracy"], r["rotation_loss"]))
    survivors = [results["base-r1-s0"], results["base-r1-s1"]]
    # slot s of rung 1 goes on from the s-th best of rung 0, from that task's checkpoint
    assert [r["transform"] for r in survivors] == [r["transform"] for r in ranked[:2]]
    assert [r["continued_from"] for r in survivors] == [r["task"] for r in ranked[:2]]
    for survivor, source in zip(survivors, ranked[:2], strict=True):
        assert survivor["epochs"] == 2 and survivor["loss_history"][:1] == source["loss_history"]
    chosen = max(survivors, key=lambda r: (r["rotation_accuracy"], -r["rotation_loss"]))
    assert results["fold-0"]["base_policy"] == chosen["transform"]

    # the same candidate trained at once for base_epochs (the exhaustive stage): same model
    transform = survivors[0]["transform"]
    exhaustive = _tiny(**{"search.base_candidates": f"[{transform}]"})
    store = open_store(tmp_path / "exhaustive")
    prepare_run(store, exhaustive)
    alone = run_task(store, f"base-{transform.lower()}")
    assert alone["loss_history"] == survivors[0]["loss_history"]
    assert alone["rotation_accuracy"] == survivors[0]["rotation_accuracy"]

    # the report shows the rungs and what they saved
    report = json.loads((tmp_path / "halving" / "report.json").read_text())
    selection = report["base_selection"]
    assert selection["method"] == "successive_halving"
    assert (selection["epochs_trained"], selection["epochs_exhaustive"]) == (5, 6)
    assert report["base_candidates"][transform]["rung"] == 1
    markdown = (tmp_path / "halving" / "report.md").read_text()
    assert "Successive halving (eta 2): 5 candidate-epochs trained instead of 6 for" in markdown
    assert "rung 1 (2 ep)" in markdown
    assert report["left_out_ops"] == ["Color"] and "identity on 1-channel images" in markdown
    for trials in (tmp_path / "halving" / "tasks").glob("search-*/trials.json"):
        ops = {
            op["op"]
            for t in json.loads(trials.read_text())
            for sub in t["policy"]["sub_policies"]
            for op in sub
        }
        assert "Color" not in ops


def test_the_last_rung_is_trained_again_with_other_seeds() -> None:
    spec = _spec(
        base_candidates=ALL16,
        base_epochs=20,
        base_selection={"method": "successive_halving", "seeds": 3},
    )
    replicates = [task for task in all_tasks(spec) if "seed" in task.id]
    assert [task.id for task in replicates] == [
        "base-r3-s0-seed1",
        "base-r3-s1-seed1",
        "base-r3-s0-seed2",
        "base-r3-s1-seed2",
    ]
    assert replicates[0].depends_on == ("base-r3-s0",)
    assert replicates[0].params == {"rung": 3, "replicate": 1, "of": "base-r3-s0"}
    fold = next(task for task in all_tasks(spec) if task.id == "fold-0")
    assert set(fold.depends_on) >= {task.id for task in replicates}


def _result(transform: str, accuracy: float, images: int = 100, rung: int = 0) -> dict:
    return {
        "transform": transform,
        "rotation_accuracy": accuracy,
        "rotation_loss": 1.0 - accuracy,
        "heldout_images": images,
        "rung": rung,
    }


def test_scores_carry_their_uncertainty_and_a_close_call_is_named() -> None:
    spec = _spec(base_candidates=["Rotate", "Cutout"], base_selection={"seeds": 3})
    close = {
        "base-rotate": _result("Rotate", 0.60),
        "base-rotate-seed1": _result("Rotate", 0.50),
        "base-rotate-seed2": _result("Rotate", 0.55),
        "base-cutout": _result("Cutout", 0.56),
        "base-cutout-seed1": _result("Cutout", 0.54),
        "base-cutout-seed2": _result("Cutout", 0.52),
    }
    scores = final_scores(spec, close)
    assert [s.transform for s in scores] == ["Rotate", "Cutout"]
    assert scores[0].accuracy == pytest.approx(0.55) and scores[0].seeds == 3
    assert scores[0].standard_error == pytest.approx(0.05 / 3**0.5)  # std 0.05 over 3 seeds
    verdict = separation(scores)
    assert verdict is not None and not verdict["separated"]
    line = describe_separation(verdict)
    assert line is not None and "NOT separated" in line and "training seeds" in line
    # one seed: only the held-out images' binomial error is known, and the line says so
    single = _spec(base_candidates=["Rotate", "Cutout"])
    wide = {"base-rotate": _result("Rotate", 0.9), "base-cutout": _result("Cutout", 0.5)}
    verdict = separation(final_scores(single, wide))
    assert verdict is not None and verdict["separated"]
    assert "held-out images only" in str(describe_separation(verdict))
    near = {"base-rotate": _result("Rotate", 0.52), "base-cutout": _result("Cutout", 0.50)}
    line = describe_separation(separation(final_scores(single, near)))
    assert line is not None and "NOT separated" in line and "base_selection.seeds" in line


def test_replicates_run_with_their_own_seeds_and_the_report_shows_the_spread(
    tmp_path: Path,
) -> None:
    spec = _tiny(
        **{
            "search.base_candidates": "[RandomResizedCrop, Rotate]",
            "search.base_selection.seeds": 2,
        }
    )
    results = _run_all(spec, tmp_path / "seeds")
    for name in ("randomresizedcrop", "rotate"):
        first, again = results[f"base-{name}"], results[f"base-{name}-seed1"]
        assert first["transform"] == again["transform"]
        assert first["seed"] != again["seed"]
        assert first["loss_history"] != again["loss_history"]  # another training run
    report = json.loads((tmp_path / "seeds" / "report.json").read_text())
    final = report["base_selection"]["final"]
    assert {f["transform"] for f in final} == {"RandomResizedCrop", "Rotate"}
    assert all(f["seeds"] == 2 and f["uncertainty"] == "training seeds" for f in final)
    assert report["base_selection"]["separation"]["winner"] == results["fold-0"]["base_policy"]
    markdown = (tmp_path / "seeds" / "report.md").read_text()
    assert "Final comparison (2 epochs, 2 training seed(s) each)" in markdown
    assert "**Choice:** " in markdown
    status = summarise(open_store(tmp_path / "seeds"), spec)
    assert status.base_choice is not None and status.base_choice.startswith(
        report["base_selection"]["separation"]["winner"]
    )


def test_a_rung_killed_mid_training_resumes_and_still_trains_exactly(tmp_path: Path) -> None:
    """A later rung's worker is SIGKILLed mid-training and run again: it resumes from its own
    checkpoint (not from the earlier rung's), and the candidate still ends up trained exactly
    as the exhaustive stage would train it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = _tiny(
        **{
            "dataset.limit": 960,
            "search.base_selection.method": "successive_halving",
            "search.base_epochs": 24,
            "runtime.checkpoint_every": 1,
        }
    )
    assert [(r.epochs, r.candidates) for r in base_rungs(spec)] == [(12, 3), (24, 2)]
    run = tmp_path / "halving"
    store = open_store(run)
    prepare_run(store, spec)
    # every training runs in a worker process with the same thread settings, so that both
    # arms compute alike whatever this test process's torch state is
    env = dict(os.environ, OMP_NUM_THREADS="1", SELFAUGMENT_THREADS="1")
    selfaugment = str(Path(sys.executable).parent / "selfaugment")

    def worker(root: Path, task_id: str) -> list[str]:
        return [selfaugment, "worker", "run", "--store", str(root), "--task", task_id]

    for task in all_tasks(spec):
        if task.kind == "base" and task.params["rung"] == 0:
            subprocess.run(worker(run, task.id), env=env, check=True, capture_output=True)
    command = worker(run, "base-r1-s0")
    worker_process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    epochs_done = run / "tasks" / "base-r1-s0" / "work" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while True:  # one line per epoch, from the checkpoint's 12 on
        assert worker_process.poll() is None, "the rung finished before it could be killed"
        assert time.monotonic() < deadline
        if epochs_done.exists() and len(epochs_done.read_text().splitlines()) >= 15:
            break
        time.sleep(0.01)
    worker_process.send_signal(signal.SIGKILL)
    worker_process.wait()
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    survivor = store.read_json("tasks/base-r1-s0/result.json")
    assert len(survivor["loss_history"]) == 24
    lines = epochs_done.read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[-1])["epoch"] == 24

    exhaustive = _tiny(
        **{
            "dataset.limit": 960,
            "search.base_candidates": f"[{survivor['transform']}]",
            "search.base_epochs": 24,
            "runtime.checkpoint_every": 1,
        }
    )
    alone_store = open_store(tmp_path / "exhaustive")
    prepare_run(alone_store, exhaustive)
    alone_id = f"base-{survivor['transform'].lower()}"
    subprocess.run(worker(tmp_path / "exhaustive", alone_id), env=env, check=True)
    alone = alone_store.read_json(f"tasks/{alone_id}/result.json")
    assert alone["loss_history"] == survivor["loss_history"]
    assert alone["rotation_accuracy"] == survivor["rotation_accuracy"]
