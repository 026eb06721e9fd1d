"""Run state in the store: spec checks on resume, summaries, reuse of shared stages.

Result files are written by hand here to test the bookkeeping; the real tasks that produce them
run in test_search_e2e.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfaugment.trainer.search.reuse import reuse_results, training_digest
from selfaugment.trainer.search.status import summarise
from selfaugment.trainer.spec import AugmentSearchSpec, ParallelismConfig
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import RunMismatchError, done_task_ids, prepare_run


def _spec(**search: object) -> AugmentSearchSpec:
    base = {"folds": 2, "repeats": 1, "base_candidates": ["Rotate", "RandomResizedCrop"]}
    return AugmentSearchSpec.model_validate({"search": {**base, **search}})


def test_resume_requires_the_same_spec_but_not_the_same_resources(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    prepare_run(store, _spec())
    busier = _spec().model_copy(update={"parallelism": ParallelismConfig(max_workers=8)})
    prepare_run(store, busier)
    with pytest.raises(RunMismatchError, match="different spec"):
        prepare_run(store, _spec(trials=50))


def test_summary_tracks_stage_base_policy_and_best_objective(tmp_path: Path) -> None:
    store, spec = open_store(tmp_path), _spec()
    prepare_run(store, spec)
    assert summarise(store).state.stage == "base"
    store.write_json("tasks/base-rotate/result.json", {"kind": "base"})
    store.write_json("tasks/base-randomresizedcrop/result.json", {"kind": "base"})
    store.write_json("tasks/fold-0/result.json", {"kind": "fold", "base_policy": "Rotate"})
    store.write_json("tasks/fold-1/result.json", {"kind": "fold", "base_policy": "Rotate"})
    store.write_json("tasks/search-f0-r0/progress.json", {"trials_done": 4, "best_objective": -0.2})
    store.write_json("tasks/search-f1-r0/result.json", {"trials_done": 10, "best_objective": -0.5})
    summary = summarise(store)
    assert summary.state.stage == "search"
    assert summary.base_policy == "Rotate"
    assert summary.trials_done == 14
    assert summary.best_objective == -0.5
    assert summary.to_dict()["done"] == 5


def test_reuse_copies_base_and_fold_tasks_between_objectives(tmp_path: Path) -> None:
    source, target = open_store(tmp_path / "minimax"), open_store(tmp_path / "min-rotation")
    prepare_run(source, _spec(objective="minimax"))
    for task_id in ("base-rotate", "fold-0", "fold-1", "search-f0-r0"):
        source.write_bytes(f"tasks/{task_id}/checkpoint.pt", b"weights")
        source.write_json(f"tasks/{task_id}/result.json", {"task": task_id})
    source.write_bytes("tasks/fold-1/work/pretrain/checkpoint.pt", b"scratch")
    spec = _spec(objective="min_rotation", trials=30)
    assert training_digest(spec) == training_digest(_spec(objective="minimax"))
    prepare_run(target, spec)
    copied = reuse_results(source, target, spec)
    assert copied == ["base-rotate", "fold-0", "fold-1"]
    assert done_task_ids(target) == {"base-rotate", "fold-0", "fold-1"}
    assert target.read_bytes("tasks/fold-0/checkpoint.pt") == b"weights"
    assert not target.exists("tasks/fold-1/work/pretrain/checkpoint.pt")
    assert reuse_results(source, target, spec) == []  # idempotent

    with pytest.raises(RunMismatchError, match="trained its base and fold models"):
        reuse_results(source, open_store(tmp_path / "x"), _spec(fold_epochs=3))
    # The supervised oracle trains a linear head in each fold: only the base tasks are shared.
    supervised = _spec(objective="supervised")
    oracle = open_store(tmp_path / "y")
    prepare_run(oracle, supervised)
    assert reuse_results(source, oracle, supervised) == ["base-rotate"]
    assert done_task_ids(oracle) == {"base-rotate"}


def test_prepared_datasets_live_beside_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfaugment.trainer.store.layout import datasets_store, datasets_uri, store_endpoint

    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    assert datasets_uri("s3://team-bucket/runs/search-1") == "s3://team-bucket/datasets"
    assert datasets_uri(str(tmp_path / "run")) == str(tmp_path / "cache" / "datasets")
    local = datasets_store(open_store(tmp_path / "run"))
    assert local.uri == str(tmp_path / "cache" / "datasets")
    minio = open_store("s3://team-bucket/runs/a", endpoint="http://minio.local:9000")
    assert store_endpoint(minio) == "http://minio.local:9000"
    shared = datasets_store(minio)
    assert (shared.uri, store_endpoint(shared)) == (
        "s3://team-bucket/datasets",
        store_endpoint(minio),
    )
    assert store_endpoint(open_store("s3://team-bucket/runs/a")) is None  # AWS's own endpoint
