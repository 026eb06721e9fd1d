"""Storage faults: one run per S3 prefix (a renewed lease), a full disk named in one line.

The S3 cases run against a real S3 protocol server on loopback (moto, the `s3_server` fixture),
whose conditional writes (If-None-Match / If-Match) behave as AWS S3's and MinIO's do. The full
disk is a real one: a 256 KiB tmpfs mounted in a private mount namespace (`unshare`), so the
kernel itself answers ENOSPC.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.artifacts import S3Store
from selfaugment.trainer.store.lock import LOCK_NAME, RunLockedError, hold_run_lock, run_holder

REPO = Path(__file__).resolve().parents[2]
SELFAUGMENT = Path(sys.executable).parent / "selfaugment"


#: Each test's own bucket: moto's server keeps one state per process, shared by all tests.
BUCKET = f"locks-{uuid.uuid4().hex[:8]}"


def _bucket(endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    for listed in client.list_buckets()["Buckets"]:
        if listed["Name"] == BUCKET:  # an earlier test's: start empty
            for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=item["Key"])
            return
    client.create_bucket(Bucket=BUCKET)


def _s3_store(prefix: str = "search-a") -> S3Store:
    store = open_store(f"s3://{BUCKET}/{prefix}")
    assert isinstance(store, S3Store)
    return store


def test_one_run_per_s3_prefix_names_the_holder(s3_server: str, tmp_path: Path) -> None:
    """A second runner on the same S3 prefix is refused with the holder named, from another
    process (the real CLI) too; a different prefix is free; after release the prefix is free."""
    _bucket(s3_server)
    store = _s3_store()
    with hold_run_lock(store):
        with pytest.raises(RunLockedError) as refused, hold_run_lock(_s3_store()):
            pass
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and f"{store.uri} is in use by" in message
        assert "lease was renewed" in message
        assert run_holder(store) is not None and f"pid {os.getpid()}" in str(run_holder(store))
        with hold_run_lock(_s3_store("search-b")):  # another prefix: another run
            pass
        raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
        raw["dataset"]["limit"] = 400
        config = tmp_path / "search.yaml"
        config.write_text(yaml.safe_dump(raw))
        second = subprocess.run(
            [str(SELFAUGMENT), "search", "-f", str(config), "-o", store.uri],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("selfaugment: error:")]
        assert f"pid {os.getpid()}" in line and "is in use by" in line
        assert "Traceback" not in second.stderr
        assert not store.list("tasks/")  # the refused run started nothing
    assert not store.exists(LOCK_NAME) and run_holder(store) is None
    with hold_run_lock(store):  # released: free again
        pass


def test_a_dead_runners_s3_lease_lapses_and_is_taken_over(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A runner killed without releasing (its lock object stays, never renewed) blocks others
    only for the lease; then the next runner takes the run over and says so."""
    _bucket(s3_server)
    monkeypatch.setenv("SELFAUGMENT_S3_LOCK_LEASE", "4")
    store = _s3_store()
    dead = {"pid": 999999, "host": "gone-host", "since": time.time(), "lease_seconds": 4}
    assert store.write_if(LOCK_NAME, json.dumps(dead).encode()) is not None
    with pytest.raises(RunLockedError, match="pid 999999 on gone-host"), hold_run_lock(store):
        pass
    assert "gone-host" in str(run_holder(store))
    time.sleep(5.5)
    assert run_holder(store) is None  # `status` no longer shows a live runner
    with caplog.at_level(logging.WARNING), hold_run_lock(store) as lock:
        assert not lock.lost
        assert f"pid {os.getpid()}" in str(run_holder(store))
    assert any("took over the run lock" in r.getMessage() for r in caplog.records)


def test_a_runner_whose_s3_lease_is_taken_over_stops(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another runner overwrites the lease (it judged it lapsed), the holder notices at its
    next renewal and its run stops with a line that says why."""
    _bucket(s3_server)
    monkeypatch.setenv("SELFAUGMENT_S3_LOCK_LEASE", "4")
    store = _s3_store()
    with hold_run_lock(store) as lock:
        time.sleep(1.5)
        assert not lock.lost  # renewals (every lease/4) go on undisturbed
        store.write_bytes(LOCK_NAME, json.dumps({"pid": 1, "host": "other"}).encode())
        deadline = time.monotonic() + 10
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(RunLockedError, match="taken over by another runner"):
            lock.check()
    assert store.exists(LOCK_NAME)  # the new holder's lock is left alone
    store.delete(LOCK_NAME)


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, torch
    from pathlib import Path
    from selfaugment.errors import SelfAugmentError
    from selfaugment.trainer.moco.checkpoint import save_checkpoint
    from selfaugment.trainer.store import open_store
    disk = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    for name, write in [
        ("checkpoint", lambda: save_checkpoint(disk / "ckpt" / "checkpoint.pt",
                                               {"w": torch.zeros(200_000)})),
        ("store", lambda: open_store(disk / "run").write_bytes("tasks/a/big.bin", b"x" * 400_000)),
    ]:
        try:
            write()
            print(name, "WROTE")
        except SelfAugmentError as error:
            print(name, type(error).__name__, error)
    print("left", sorted(p.name for p in disk.rglob("*") if p.is_file()))
    """
)


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """A checkpoint or an artifact written to a full disk: one line naming the folder (never
    torch's "unexpected pos ..."), no temporary file left, the previous file (if any) kept."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    done = subprocess.run(
        ["unshare", "--map-root-user", "--mount", sys.executable, str(script), str(disk)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["checkpoint"].startswith(f"DiskFullError no space left on {disk}/ckpt"), lines
    assert "(writing checkpoint.pt;" in lines["checkpoint"]
    assert lines["store"].startswith(f"DiskFullError no space left on {disk}/run/tasks/a"), lines
    assert "unexpected pos" not in done.stdout + done.stderr
    assert lines["left"] == "[]"  # no partial or temporary file


def test_pretrain_onto_a_full_disk_exits_with_one_line(tmp_path: Path) -> None:
    """The real CLI (`selfaugment pretrain`) whose output folder is on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    raw = {
        "dataset": {"uri": "sklearn:digits", "image_size": 16, "channels": 1, "limit": 256},
        "model": {"width": 16, "cifar_stem": True},
        "moco": {"queue_size": 128, "dim": 32},
        "optim": {"epochs": 1, "batch_size": 64},
        "evaluation": {"tasks": []},
    }
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && "
        f"{SELFAUGMENT} pretrain -f {config} -o {disk}/out"
    )
    done = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [x for x in done.stderr.splitlines() if x.startswith("selfaugment: error:")]
    assert len(errors) == 1 and f"no space left on {disk}/out" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "unexpected pos" not in done.stderr
