"""Artifact store: local directory and S3 (real S3 protocol against moto's server on loopback)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from selfaugment.trainer.store import LocalStore, S3Store, StoreError, open_store

if TYPE_CHECKING:
    from tests.conftest import S3Tenants


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
    assert "Connection refused" in message and "\n" not in message
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(endpoint in line for line in retries), retries
    assert "refused-key" not in message + "".join(retries)


def test_s3_conditional_writes_and_deletes(s3_server: str) -> None:
    """The run lease's requests through the minio SDK against a real S3 server: create only if
    absent, replace and delete only while the ETag is ours, the age by the server's clock."""
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="leases")
    store = open_store("s3://leases/run")
    assert isinstance(store, S3Store)
    first = store.write_if("lock", b"one")
    assert first is not None
    assert store.write_if("lock", b"two") is None  # exists: not created again
    second = store.write_if("lock", b"three", etag=first)
    assert second is not None and second != first
    assert store.write_if("lock", b"four", etag=first) is None  # stale ETag: refused
    data, etag, age = store.read_with_age("lock")
    assert (data, etag) == (b"three", second) and 0.0 <= age < 60.0
    store.delete("lock", if_match=first)  # not ours any more: kept
    assert store.read_bytes("lock") == b"three"
    store.delete("lock", if_match=second)
    assert not store.exists("lock")


def test_s3_large_files_go_up_in_parts_and_stream_down(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than a part is uploaded as a multipart object (its ETag says how many
    parts) and downloaded whole, byte for byte."""
    from selfaugment.trainer.store import s3

    monkeypatch.setattr(s3, "MULTIPART_PART_SIZE", 5 * 2**20)  # S3's smallest part
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="big")
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(bytes(range(256)) * (11 * 2**20 // 256 + 3))
    store = open_store("s3://big/run")
    store.upload_file(source, "tasks/a/checkpoint.pt")
    head = client.head_object(Bucket="big", Key="run/tasks/a/checkpoint.pt")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
    copy = store.download_file("tasks/a/checkpoint.pt", tmp_path / "copy" / "checkpoint.pt")
    assert copy.read_bytes() == source.read_bytes()
    assert not [p for p in copy.parent.iterdir() if p.name != "checkpoint.pt"]


def test_s3_store_acts_only_with_the_credentials_it_is_given(
    s3_tenants: S3Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials given to a store are the only ones it signs with: the environment's (here
    an administrator's) are not used, so it reaches exactly what its own credentials allow.
    A wrong secret is refused by the server and named without the secret."""
    from selfaugment.trainer.store.s3 import Credentials

    alice = s3_tenants.tenant("tenant-alice")
    s3_tenants.tenant("tenant-bob")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_tenants.admin.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_tenants.admin.secret_key)
    own = open_store("s3://tenant-alice/run", endpoint=s3_tenants.endpoint, credentials=alice)
    own.write_json("spec.json", {"a": 1})
    assert own.read_json("spec.json") == {"a": 1} and own.list() == ["spec.json"]
    other = open_store("s3://tenant-bob/run", endpoint=s3_tenants.endpoint, credentials=alice)
    with pytest.raises(StoreError, match="AccessDenied") as denied:
        other.write_json("spec.json", {"b": 1})
    assert str(denied.value).startswith("s3://tenant-bob/run/spec.json: cannot write at ")
    assert s3_tenants.keys("tenant-bob") == []
    # the environment's administrator credentials do reach it: they were not what was used
    open_store("s3://tenant-bob/run", endpoint=s3_tenants.endpoint).write_json("x.json", {})
    assert s3_tenants.keys("tenant-bob") == ["run/x.json"]
    forged = Credentials(alice.access_key, "not-the-secret")
    wrong = open_store("s3://tenant-alice/run", endpoint=s3_tenants.endpoint, credentials=forged)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch") as refused:
        wrong.read_json("spec.json")
    assert "not-the-secret" not in str(refused.value) + repr(forged)
    assert alice.secret_key not in repr(alice)


def test_s3_endpoints_must_be_urls_without_paths_or_credentials() -> None:
    for endpoint, said in [
        ("minio:9000", "expected http(s)://host[:port]"),
        ("http://minio:9000/some/path", "no path"),
        ("http://user:hunter2@minio:9000", "credentials in the URL are not accepted"),
    ]:
        with pytest.raises(StoreError, match=re.escape(said)) as error:
            open_store("s3://bucket/run", endpoint=endpoint)
        assert "hunter2" not in str(error.value)


def test_product_code_reaches_s3_only_through_the_one_client_factory() -> None:
    """No product module imports boto3 or botocore, and only trainer/store/s3.py makes a
    minio client: every S3 request gets the same retries, endpoint rules and credentials."""
    import ast

    repo = Path(__file__).resolve().parents[2]
    files = [*repo.glob("trainer/**/*.py"), *repo.glob("operator/**/*.py")]
    files += [*repo.glob("src/selfaugment/**/*.py")]
    makers = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names]
                module = getattr(node, "module", None) or ""
                for name in [module, *names]:
                    assert name.split(".")[0] not in ("boto3", "botocore", "s3transfer"), path
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Minio":
                makers.append(path.relative_to(repo).as_posix())
    assert makers == ["trainer/store/s3.py"]


def test_throttling_and_server_errors_are_retried_with_a_warning_each(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An S3 endpoint that answers 503 SlowDown, then 500, then the object: the request goes
    through, each retry logged once with the endpoint and the status."""
    import http.server
    import threading

    answers = [503, 500, 200]

    class Throttling(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            status = answers.pop(0)
            self.send_response(status)
            if status == 200:
                self.send_header("ETag", '"abc"')
                self.send_header("Last-Modified", "Wed, 02 Dec 2026 07:00:00 GMT")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr("selfaugment.trainer.store.s3.BACKOFF_FACTOR", 0.01)
    try:
        with caplog.at_level("WARNING"):
            assert open_store("s3://bucket/run", endpoint=endpoint).exists("spec.json")
    finally:
        server.shutdown()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2, retries
    assert f"S3 at {endpoint}: HTTP 503" in retries[0] and "HTTP 500" in retries[1], retries
    assert answers == []
