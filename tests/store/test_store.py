"""Artifact store: local directory and S3 (real S3 protocol against moto's server on loopback)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from selfaugment.trainer.store import LocalStore, S3Store, StoreError, open_store


def _exercise(store) -> None:
    assert not store.exists("tasks/a/result.json")
    store.write_json("tasks/a/result.json", {"value": 1})
    store.write_bytes("tasks/b/blob.bin", b"\x00\x01")
    assert store.exists("tasks/a/result.json")
    assert store.read_json("tasks/a/result.json") == {"value": 1}
    assert store.read_bytes("tasks/b/blob.bin") == b"\x00\x01"
    assert store.list("tasks/") == ["tasks/a/result.json", "tasks/b/blob.bin"]
    store.write_json("tasks/a/result.json", {"value": 2})  # overwrite
    assert store.read_json("tasks/a/result.json") == {"value": 2}
    with pytest.raises(StoreError, match="no such artifact"):
        store.read_bytes("tasks/missing.json")
    store.delete("tasks/b/blob.bin")
    assert store.list("tasks/") == ["tasks/a/result.json"]
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.write_bytes("../escape", b"x")


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path / "run")
    assert isinstance(store, LocalStore)
    _exercise(store)
    # atomic writes leave no temporary files behind
    assert not [p for p in (tmp_path / "run").rglob(".*") if p.is_file()]


def test_local_store_upload_download(tmp_path: Path) -> None:
    store = open_store(tmp_path / "run")
    source = tmp_path / "file.bin"
    source.write_bytes(b"abc")
    store.upload_file(source, "x/file.bin")
    assert store.download_file("x/file.bin", tmp_path / "copy.bin").read_bytes() == b"abc"
    assert store.local_path("x/file.bin") == (tmp_path / "run" / "x" / "file.bin").resolve()


def test_s3_store_round_trip(s3_server: str) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    store = open_store("s3://runs/searches/one")
    assert isinstance(store, S3Store)
    _exercise(store)
    assert store.url("policy.json") == "s3://runs/searches/one/policy.json"
    assert store.local_path("policy.json") is None
    # the keys really live under the prefix in the bucket
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="runs")
    assert [item["Key"] for item in listed["Contents"]] == ["searches/one/tasks/a/result.json"]


def test_s3_errors_name_the_object_and_hide_credentials(s3_server: str) -> None:
    store = open_store("s3://no-such-bucket/prefix")
    with pytest.raises(StoreError) as error:
        store.write_json("spec.json", {})
    message = str(error.value)
    assert "s3://no-such-bucket/prefix/spec.json" in message
    assert "test-secret-key" not in message


def test_bad_uris() -> None:
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="expected s3://bucket/prefix"):
        S3Store("s3://")


def test_unreachable_endpoint_is_retried_then_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused connection (nothing listens on the port): each retry is logged with the
    endpoint and the cause, then one StoreError names the object, the endpoint and the cause."""
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "refused-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "refused-secret")
    monkeypatch.setenv("SELFAUGMENT_S3_MAX_ATTEMPTS", "3")
    store = open_store("s3://bucket/run", endpoint=endpoint)
    with caplog.at_level("WARNING"), pytest.raises(StoreError) as raised:
        store.exists("spec.json")
    message = str(raised.value)
    assert message.startswith("s3://bucket/run/spec.json: cannot stat at " + endpoint)
    assert "EndpointConnectionError" in message and "\n" not in message
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(endpoint in line for line in retries), retries
    assert "refused-key" not in message + "".join(retries)
