"""A search killed in its TPE stage and resumed: nothing finished is lost or redone, nothing the
kill left behind stays, and the images the dataset loads left out are named to the user.

Real `selfaugment search` processes on a real image folder (the bundled digits written as PNG
files, plus two files that are not images), killed with SIGKILL (runner and workers at once, as
the OOM killer or a lost node would). A tiny model keeps the whole test to a couple of minutes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SELFAUGMENT = Path(sys.executable).parent / "selfaugment"
BROKEN = ("broken.png", "truncated.jpg")


def _image_folder(root: Path, per_class: int = 30) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = root / f"digit-{label}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for index, image in enumerate(images):
            pixels = (image * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index:03d}.png")
    (root / "digit-3" / BROKEN[0]).write_bytes(b"this is not a PNG file")
    jpeg = (root / "digit-3" / "000.png").read_bytes()
    (root / "digit-7" / BROKEN[1]).write_bytes(b"\xff\xd8\xff\xe0" + jpeg[:20])
    return root


def _config(tmp_path: Path, data: Path) -> Path:
    raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    raw["dataset"] = {"uri": str(data), "image_size": 16, "channels": 1}
    raw["model"]["width"] = 4
    raw["moco"]["queueSize"] = 128
    raw["optim"]["batchSize"] = 64
    raw["evaluation"]["epochs"] = 2
    raw["search"].update(
        baseCandidates=["RandomResizedCrop", "Rotate"],
        baseEpochs=1,
        foldEpochs=1,
        folds=2,
        repeats=1,
        trials=80,
        startupTrials=5,
        topPolicies=2,
        subPolicies=2,
    )
    raw.setdefault("retrain", {})["epochs"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trials(run: Path) -> dict[str, list[dict]]:
    kept = {}
    for path in sorted((run / "tasks").glob("search-*/trials.json")):
        try:
            kept[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return kept


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SELFAUGMENT), *args], capture_output=True, text=True, timeout=900)


def test_a_killed_search_keeps_its_trials_and_names_skipped_images(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "images")
    config, run = _config(tmp_path, data), tmp_path / "run"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(
            [str(SELFAUGMENT), "search", "-f", str(config), "-o", str(run), "--no-progress"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600
        while not any(len(trials) >= 3 for trials in _trials(run).values()):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the search never reached its TPE stage"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    first_output = (tmp_path / "first.log").read_text()
    kept = _trials(run)
    assert kept and not (run / "tasks" / "merge" / "result.json").exists()
    unfinished = {task for task in kept if not (run / "tasks" / task / "result.json").exists()}
    assert unfinished, "every search task had finished: nothing was killed mid-search"
    # the terminal named the unreadable files as the search started
    assert "skipped 2 unreadable image(s)" in first_output
    assert all(name in first_output for name in BROKEN)

    # status: no runner; the killed tasks are stopped, not running
    status = _cli("status", str(run))
    assert status.returncode == 0, status.stderr
    assert "runner: none (stopped;" in status.stdout
    for task in unfinished:
        assert f"stopped at {task}:" in status.stdout, status.stdout
    assert "running/pending" not in status.stdout

    # what a write interrupted by the kill leaves (the name atomic_write gives its temporary)
    leftover = run / "tasks" / "fold-0" / ".result.json.0badc0de.partial"
    leftover.write_bytes(b'{"half": ')

    resumed = _cli("search", "-f", str(config), "-o", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not leftover.exists()
    assert "removed 1 temporary file(s) left by interrupted writes" in resumed.stderr

    # the trials finished before the kill are kept as they were, and were not scored again
    final = _trials(run)
    for task, trials in kept.items():
        assert final[task][: len(trials)] == trials, task
        assert len(final[task]) == 80
        if task in unfinished:
            worker_log = (run / "logs" / f"{task}.log").read_text()
            assert f"resuming the search from {len(trials)} finished trials" in worker_log

    # the unreadable images: named in the terminal, `status` and both reports
    assert "warning: 2 unreadable image(s) left out of the dataset" in resumed.stdout
    status = _cli("status", str(run))
    assert "dataset: 2 unreadable image(s) left out" in status.stdout
    assert all(name in status.stdout for name in BROKEN)
    as_json = json.loads(_cli("status", "--json", str(run)).stdout)
    assert as_json["skipped_images"]["count"] == 2 and as_json["runner"] is None
    report = json.loads((run / "report.json").read_text())
    assert report["skipped_images"]["count"] == 2
    assert {item["file"].rsplit("/", 1)[-1] for item in report["skipped_images"]["files"]} == set(
        BROKEN
    )
    markdown = (run / "report.md").read_text()
    assert "2 unreadable image(s)" in markdown and all(name in markdown for name in BROKEN)

    # every artifact has the same mode: what the user's umask gives a new file
    umask = os.umask(0)
    os.umask(umask)
    modes = {
        path.relative_to(run).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in run.rglob("*")
        if path.is_file()
    }
    assert modes and set(modes.values()) == {0o666 & ~umask}, {
        name: oct(mode) for name, mode in modes.items() if mode != 0o666 & ~umask
    }
