"""A preempted training task resumes from its last epoch checkpoint, not from epoch 0.

On a cluster the pod that trained is gone with its local cache (a spot reclaim, a node drain);
here a real `selfaugment worker run` on a real S3 server (moto, on loopback) is killed with
SIGKILL mid-training, and the next attempt runs with an empty cache, as a new pod would.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from selfaugment.trainer.config import load_config
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import prepare_run

REPO = Path(__file__).resolve().parents[2]
SELFAUGMENT = Path(sys.executable).parent / "selfaugment"
EPOCHS = 200


def _worker(store_uri: str, cache: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [str(SELFAUGMENT), "worker", "run", "--store", store_uri, "--task", "fold-0"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, SELFAUGMENT_CACHE=str(cache)),
        )


@pytest.mark.slow
def test_a_preempted_training_task_resumes_from_its_last_epoch(
    tmp_path: Path, s3_server: str
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="preempt")
    overrides = [
        "dataset.limit=960",
        "model.width=4",
        "moco.queue_size=128",
        "optim.batch_size=64",
        "search.base_policy=RandomResizedCrop",
        "search.folds=2",
        f"search.fold_epochs={EPOCHS}",
        "evaluation.epochs=2",
    ]
    spec = load_config(AugmentSearchSpec, REPO / "examples" / "search-smoke.yaml", overrides)
    store = open_store("s3://preempt/run")
    prepare_run(store, spec)
    scratch = "run/tasks/fold-0/scratch/checkpoint.pt"

    first = _worker(store.uri, tmp_path / "pod-1", tmp_path / "attempt-1.log")
    deadline = time.monotonic() + 300
    # the checkpoint is mirrored after every epoch: kill once the mirror exists
    while not s3.list_objects_v2(Bucket="preempt", Prefix=scratch).get("Contents"):
        assert first.poll() is None, (tmp_path / "attempt-1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never mirrored a checkpoint"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # the pod is gone, and its cache with it
    first.wait()
    stored = s3.get_object(Bucket="preempt", Key=scratch)["Body"].read()
    reached = int(torch.load(io.BytesIO(stored), weights_only=True)["epoch"])
    assert 1 <= reached < EPOCHS

    second = _worker(store.uri, tmp_path / "pod-2", tmp_path / "attempt-2.log")
    assert second.wait(600) == 0, (tmp_path / "attempt-2.log").read_text()[-3000:]
    log = (tmp_path / "attempt-2.log").read_text()
    assert "resuming from s3://preempt/run/tasks/fold-0/scratch/checkpoint.pt" in log
    assert f"epoch {reached + 1}/{EPOCHS}" in log and f"epoch {reached}/{EPOCHS}" not in log
    result = store.read_json("tasks/fold-0/result.json")
    assert result["base_policy"] == "RandomResizedCrop"
    # the mirror and the new pod's scratch files are gone once the result is stored
    assert not store.exists("tasks/fold-0/scratch/checkpoint.pt")
    assert not [p for p in (tmp_path / "pod-2" / "work").rglob("*") if p.is_file()]
