"""Shared test settings: small thread counts so the suite behaves on a 2-core machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


import socket  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _live_worker_pids(run: Path) -> list[int]:
    """Pids of live `selfaugment worker` processes (`run` or `serve`) whose store is `run`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and b"worker" in argv and str(run).encode() in argv:
            pids.append(int(entry.name))
    return pids


@pytest.fixture()
def worker_pids() -> Callable[[Path], list[int]]:
    """``worker_pids(run)``: the live worker processes of the search stored in ``run``."""
    return _live_worker_pids


@pytest.fixture()
def s3_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real S3 protocol server on loopback (moto's server); yields its endpoint URL.

    The environment gets dummy credentials and the endpoint, as a worker pod would.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # like a fresh pod: no scratch files from earlier runs
    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield endpoint
    finally:
        server.stop()


class S3Tenants:
    """A moto S3 server in its own process that checks every request's signature and the
    signer's IAM policy, as MinIO and AWS do (moto's in-process server checks neither).

    `admin` may do anything; `tenant(name)` makes an IAM user allowed only on bucket `name`
    (which it creates) and returns its Credentials.
    """

    def __init__(self, endpoint: str) -> None:
        import boto3

        from selfaugment.trainer.store.s3 import Credentials

        self.endpoint = endpoint
        self._client_args = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup",
                           **self._client_args)  # fmt: skip
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=_policy("*", "*"))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        self.admin = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        _post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on every request is checked

    def client(self, service: str, credentials: Any = None) -> Any:
        import boto3

        credentials = credentials or self.admin
        return boto3.client(
            service,
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            **self._client_args,
        )

    def tenant(self, bucket: str) -> Any:
        from selfaugment.trainer.store.s3 import Credentials

        self.client("s3").create_bucket(Bucket=bucket)
        iam = self.client("iam")
        iam.create_user(UserName=bucket)
        resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
        iam.put_user_policy(
            UserName=bucket, PolicyName="own", PolicyDocument=_policy("s3:*", resources)
        )
        key = iam.create_access_key(UserName=bucket)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def keys(self, bucket: str) -> list[str]:
        listed = self.client("s3").list_objects_v2(Bucket=bucket)
        return [item["Key"] for item in listed.get("Contents", [])]


def _policy(action: str, resource: Any) -> str:
    import json

    statement = {"Effect": "Allow", "Action": action, "Resource": resource}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def _post(url: str, data: bytes) -> None:
    import urllib.request

    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture()
def s3_tenants() -> Iterator[S3Tenants]:
    """A moto S3 server (own process) that enforces credentials and IAM policies."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5):
                    break
            except OSError:
                time.sleep(0.1)
        yield S3Tenants(endpoint)
    finally:
        server.terminate()
        server.wait(timeout=30)
