"""A search and a Pretrain on an image folder larger than the memory budget, end to end on one
machine (the CLI): prepared once into the shared datasets store, streamed by every training.

The folder holds 96 readable images of 16 px (73,728 bytes decoded at 3 x 16 x 16) and one
unreadable file; the spec's budget is 64 KiB, so the dataset is streamed, and the probes and
the scorer hold a seeded sample of each held-out part that fits the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from selfaugment.trainer.config import load_config
from selfaugment.trainer.search.tasks import run_task
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import load_spec, prepare_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IMAGES = 96
STREAMED = {
    "dataset.image_size": 16,
    "dataset.channels": 3,
    "dataset.memory_budget": "64Ki",
    "dataset.storage_size": 16,
    "model.width": 8,
    "moco.queue_size": 32,
    "optim.batch_size": 16,
    "search.base_candidates": "[RandomResizedCrop, Rotate]",
    "search.base_epochs": 1,
    "search.fold_epochs": 1,
    "search.folds": 2,
    "search.trials": 2,
    "search.startup_trials": 2,
    "search.top_policies": 1,
    "search.sub_policies": 2,
    "search.score_batch_size": 32,
    "retrain.epochs": 1,
    "evaluation.epochs": 1,
    "runtime.checkpoint_steps": 2,
}


def image_folder(root: Path) -> Path:
    """cat/ and dog/, 48 smooth 16 x 20 images each, and one file that is not an image."""
    rng = np.random.default_rng(5)
    for index in range(IMAGES):
        path = root / ("cat" if index % 2 else "dog") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((20, 16), Image.Resampling.BILINEAR).save(path)
    (root / "dog" / "broken.png").write_bytes(b"not a PNG at all")
    return root


def streamed_config(tmp_path: Path) -> Path:
    folder = image_folder(tmp_path / "images")
    overrides = [f"{key}={value}" for key, value in STREAMED.items()]
    overrides.append(f"dataset.uri={folder}")
    spec = load_config(AugmentSearchSpec, EXAMPLES / "search-smoke.yaml", overrides)
    path = tmp_path / "streamed.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))
    return path


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SELFAUGMENT_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "selfaugment.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


@pytest.mark.slow
def test_a_search_streams_a_folder_larger_than_its_memory_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, run, cache = streamed_config(tmp_path), tmp_path / "run", tmp_path / "cache"
    finished = cli("search", "-f", str(config), "-o", str(run), cache=cache)
    assert finished.returncode == 0, finished.stderr[-3000:]

    prepare = json.loads((run / "tasks" / "prepare" / "result.json").read_text())
    prepared = prepare["prepared"]
    assert prepared["uri"].startswith(str(cache / "datasets"))
    assert (prepared["count"], prepared["source_count"]) == (IMAGES, IMAGES + 1)
    assert prepared["reused"] is False and prepare["skipped_images"]["count"] == 1
    for task in ("base-randomresizedcrop", "fold-0", "search-f0-r0", "retrain"):
        result = json.loads((run / "tasks" / task / "result.json").read_text())
        assert result["data"] == {"images": IMAGES, "path": "streamed"}, task
    report = json.loads((run / "report.json").read_text())
    assert report["prepared"]["uri"] == prepared["uri"]
    assert prepared["uri"] in (run / "report.md").read_text()
    assert report["skipped_images"]["count"] == 1
    assert report["skipped_images"]["files"][0]["file"].endswith("broken.png")
    assert 0.0 <= report["final"]["rotation_accuracy"] <= 1.0
    status = cli("status", str(run), cache=cache)
    assert status.returncode == 0 and "1 unreadable image(s)" in status.stdout, status.stdout
    assert f"dataset: {prepared['uri']} ({IMAGES} images prepared)" in status.stdout

    # Another run on the same source finds the dataset prepared: nothing is built again.
    monkeypatch.setenv("SELFAUGMENT_CACHE", str(cache))
    other = open_store(tmp_path / "other")
    prepare_run(other, load_spec(open_store(run)))
    again = run_task(other, "prepare")
    assert again["prepared"]["reused"] is True
    assert again["prepared"]["uri"] == prepared["uri"]
    assert again["prepared"]["digest"] == prepared["digest"]


@pytest.mark.slow
def test_a_pretrain_streams_a_folder_larger_than_its_memory_budget(tmp_path: Path) -> None:
    folder, cache = image_folder(tmp_path / "images"), tmp_path / "cache"
    config = tmp_path / "pretrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": {
                    "uri": str(folder),
                    "image_size": 16,
                    "channels": 3,
                    "memory_budget": "64Ki",
                    "storage_size": 16,
                },
                "model": {"width": 8},
                "moco": {"dim": 16, "queue_size": 32},
                "optim": {"epochs": 2, "batch_size": 16},
                "runtime": {"progress": False, "device": "cpu", "checkpoint_steps": 2},
                "evaluation": {"tasks": ["rotation", "linear"], "probe": {"epochs": 1}},
            }
        )
    )
    finished = cli("pretrain", "-f", str(config), "-o", str(tmp_path / "out"), cache=cache)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert report["num_images"] == IMAGES and report["epochs"] == 2
    assert set(report["evaluation"]) == {"rotation", "linear"}
    assert [path.name for path in (cache / "datasets").iterdir()]  # prepared in the cache
    assert "held in memory" in finished.stderr  # the probes' seeded sample of what fits


def test_successive_halving_rungs_run_on_a_prepared_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later rung depends on `prepare` as well as on the rung before: it ranks only the base
    candidates it continues (a KeyError on 'prepare' once stopped every halving search on a
    source read from files)."""
    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images")
    overrides = [f"{key}={value}" for key, value in STREAMED.items()]
    overrides += [
        f"dataset.uri={folder}",
        "search.base_candidates=[RandomResizedCrop, Rotate, Cutout]",
        "search.base_epochs=2",
        "search.base_selection.method=successive_halving",
    ]
    spec = load_config(AugmentSearchSpec, EXAMPLES / "search-smoke.yaml", overrides)
    store = open_store(tmp_path / "run")
    prepare_run(store, spec)
    run_task(store, "prepare")
    for name in ("randomresizedcrop", "rotate", "cutout"):
        run_task(store, f"base-r0-{name}")
    first = run_task(store, "base-r1-s0")
    assert first["epochs"] == 2 and first["continued_from"].startswith("base-r0-")
    assert first["data"]["path"] == "streamed"
