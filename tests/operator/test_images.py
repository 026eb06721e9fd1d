"""The container images, built from docker/ and run, as a cluster would run them.

No Docker engine and no registry base image is reachable on these machines, so the images are
built with buildah (chroot isolation) over a Debian bookworm base made by debootstrap
(docker/debian-base.sh), the release python:3.11-slim is built on; `podman run` cannot start
containers here, so commands run with `buildah run --isolation chroot`, which shares the host's
network: the operator in its image talks to the Kubernetes API emulator and the S3 server on
loopback. The worker image gets PyTorch from the wheels on this machine's disk (the build
arguments TORCH_INDEX_URL / PIP_EXTRA_INDEX_URL), the same CUDA build the test venv runs on CPU.
Needs root, buildah and debootstrap (`make system-deps` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfaugment.operator import names
from selfaugment.trainer.search.planner import all_tasks
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import prepare_run

pytestmark = [pytest.mark.cluster, pytest.mark.images]

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("DEBIAN_BASE_IMAGE", "localhost/debian-py:bookworm")
OPERATOR_IMAGE = "localhost/selfaugment/operator:test"
WORKER_IMAGE = "localhost/selfaugment/worker:test"
IMAGE_UID = 10001
# Where pip finds torch on this machine (see ../shared/environment.md); mounted into the build.
LOCAL_INDEXES = [Path("/opt/pypi"), Path("/opt/pypi-more")]


def _require_tools() -> None:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(
            f"the image tests need root and {', '.join(missing) or 'buildah, debootstrap'}: "
            "run `make system-deps` as root (CI does)",
            pytrace=False,
        )


def _pip_volumes() -> list[str]:
    """pip inside a build reaches the index only with the machine's CA bundle, if it has one."""
    cert = os.environ.get("PIP_CERT")
    if not cert or not Path(cert).exists():
        return []
    return ["--volume", f"{cert}:/ca.pem:ro", "--build-arg", "PIP_CERT=/ca.pem"]


def _build(dockerfile: str, tag: str, *args: str) -> None:
    command = [
        "buildah",
        "bud",
        "--isolation",
        "chroot",
        "--layers",
        "-f",
        dockerfile,
        "-t",
        tag,
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        *_pip_volumes(),
        *args,
        ".",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (
        f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


def _run_in(
    image: str, *command: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `command` in a fresh container of `image` (its user and working directory)."""
    container = subprocess.run(
        ["buildah", "from", "--quiet", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--isolation", "chroot", *options, container, "--", *command],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def _size(image: str) -> str:
    listing = subprocess.run(
        ["buildah", "images", "--json", image], capture_output=True, text=True, check=True
    )
    return str(json.loads(listing.stdout)[0]["size"])


@pytest.fixture(scope="module")
def base_image() -> str:
    _require_tools()
    done = subprocess.run(
        ["bash", "docker/debian-base.sh"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return BASE_IMAGE


@pytest.fixture(scope="module")
def operator_image(base_image: str) -> str:
    _build("docker/Dockerfile", OPERATOR_IMAGE)
    print(f"\n{OPERATOR_IMAGE}: {_size(OPERATOR_IMAGE)}")
    return OPERATOR_IMAGE


@pytest.fixture(scope="module")
def worker_image(base_image: str) -> str:
    import torch
    import torchvision

    volumes = [f"--volume={index}:{index}:ro" for index in LOCAL_INDEXES if index.exists()]
    extra_index = " ".join(f"file://{index}/simple" for index in LOCAL_INDEXES if index.exists())
    torch_index = (
        "file:///opt/pypi-more/simple" if volumes else "https://download.pytorch.org/whl/cpu"
    )
    _build(
        "docker/Dockerfile.worker",
        WORKER_IMAGE,
        *volumes,
        "--build-arg",
        f"TORCH_INDEX_URL={torch_index}",
        "--build-arg",
        f"PIP_EXTRA_INDEX_URL={extra_index} https://pypi.org/simple".strip(),
        "--build-arg",
        # the release the tests run on, without a local-version suffix such as +cpu
        f"TORCH_PACKAGES=torch=={torch.__version__.split('+')[0]} "
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    )
    print(f"\n{WORKER_IMAGE}: {_size(WORKER_IMAGE)}")
    return WORKER_IMAGE


def test_operator_image_runs_the_installed_package_without_torch(operator_image: str) -> None:
    """Fails on the old Dockerfile twice: useradd of `operator` (a Debian group) stopped the
    build, and the source tree in WORKDIR shadowed the standard library's `operator`."""
    probe = (
        "import os, sys, importlib.util, selfaugment, selfaugment.operator.handlers\n"
        "print(os.getuid(), os.getcwd(), selfaugment.__file__)\n"
        "print('torch' in sys.modules, importlib.util.find_spec('torch') is not None)\n"
    )
    done = _run_in(operator_image, "python", "-c", probe)
    assert done.returncode == 0, done.stderr
    uid, workdir, package = done.stdout.splitlines()[0].split()
    assert int(uid) == IMAGE_UID
    assert package.startswith("/opt/venv/lib/") and "site-packages" in package
    assert not (Path(workdir) / "operator").exists()
    assert done.stdout.splitlines()[1] == "False False"  # no training dependencies at all
    for path in ("/build", "/src", "/tmp/dist"):  # no source tree or wheel left behind
        assert _run_in(operator_image, "test", "-e", path).returncode == 1, path


def test_operator_image_serves_health_and_reconciles_against_the_cluster(
    operator_image: str, cluster: Any, s3_endpoint: str, tmp_path: Path
) -> None:
    """The image's own entrypoint, against the API emulator and S3 on loopback: /healthz and
    /metrics answer, and a new AugmentSearch gets a status and its first worker Jobs."""
    shared = tmp_path / "kube"
    shared.mkdir(mode=0o755)
    (shared / "kubeconfig").write_text(cluster.kubeconfig.read_text())
    (shared / "kubeconfig").chmod(0o644)
    port = free_port()
    env = {
        "KUBECONFIG": "/kube/kubeconfig",
        "SELFAUGMENT_METRICS_PORT": str(port),
        "SELFAUGMENT_TIMER_INTERVAL": "2",
        "AWS_ACCESS_KEY_ID": "operator-key",
        "AWS_SECRET_ACCESS_KEY": "operator-secret",
    }
    container = subprocess.run(
        ["buildah", "from", "--quiet", operator_image], capture_output=True, text=True, check=True
    ).stdout.strip()
    log = tmp_path / "operator.log"
    command = ["buildah", "run", "--isolation", "chroot", f"--volume={shared}:/kube:ro"]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    # the image's ENTRYPOINT (buildah run does not apply it by itself)
    command += [container, "--", "python", "-m", "selfaugment.operator"]
    with log.open("wb") as stream:
        process = subprocess.Popen(
            command,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        health = json.loads(_wait_http(f"http://127.0.0.1:{port}/healthz", process, log))
        assert health["healthy"] and health["leader"]["leading"], health
        cluster.create_secret(
            "store-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
        )
        cluster.apply(_search("imaged", s3_endpoint))
        jobs = cluster.wait_for("worker Jobs", lambda: cluster.jobs(), 90)
        assert all(job["metadata"]["name"].startswith("imaged-") for job in jobs)
        status = cluster.wait_for(
            "status", lambda: ((cluster.search("imaged") or {}).get("status") or {}).get("phase")
        )
        assert status == "Running"
        assert "selfaugment_" in _wait_http(f"http://127.0.0.1:{port}/metrics", process, log)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        subprocess.run(["buildah", "rm", container], capture_output=True)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


def test_worker_image_runs_a_search_task_against_a_local_store(
    worker_image: str, tmp_path: Path
) -> None:
    """`selfaugment --help`, then one real task (a base-candidate MoCo run on digits) in the
    worker image as the operator's Jobs run it, on a store mounted from the host."""
    helped = _run_in(worker_image, "selfaugment", "--help")
    assert helped.returncode == 0 and "worker" in helped.stdout, helped.stderr

    raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    raw["dataset"]["limit"] = 256
    raw["search"].update(baseEpochs=1)
    raw["evaluation"]["epochs"] = 1
    raw["runtime"]["device"] = "cpu"
    spec = AugmentSearchSpec.model_validate(raw)
    store_dir = tmp_path / "store"
    prepare_run(open_store(str(store_dir)), spec)
    task = next(task for task in all_tasks(spec) if task.kind == "base")
    for path in (store_dir, *store_dir.rglob("*")):
        os.chown(path, IMAGE_UID, IMAGE_UID)

    done = _run_in(
        worker_image,
        "selfaugment",
        "worker",
        "run",
        "--store",
        "/store",
        "--task",
        task.id,
        options=(f"--volume={store_dir}:/store", "--env", "SELFAUGMENT_THREADS=2"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((store_dir / "tasks" / task.id / "result.json").read_text())
    assert result["task"] == task.id and result["kind"] == "base"
    assert 0.0 <= result["rotation_accuracy"] <= 1.0


def _search(name: str, endpoint: str) -> dict[str, Any]:
    spec = {
        "dataset": {"uri": "sklearn:digits", "image_size": 16, "limit": 64},
        "model": {"width": 8},
        "search": {"base_policy": "RandomResizedCrop", "folds": 2},
        "runtime": {"device": "cpu"},
        "storage": {
            "uri": f"s3://selfaugment/runs/{name}",
            "endpoint": endpoint,
            "region": "us-east-1",
            "secret_ref": "store-credentials",
        },
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the operator exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            return str(urllib.request.urlopen(url, timeout=5).read().decode())
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
