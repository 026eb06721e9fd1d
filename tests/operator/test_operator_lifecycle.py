"""Long runs on a real cluster, with the real operator on the emulated one (kmock, see
conftest.py): disruptions, bad input, deadlines, retries, rank restarts, deletion with the
operator stopped, two replicas with leader election, health, and the terminal conditions that
a real `kubectl wait` waits on.

Emulated: the kubelet and Job controller (conftest.Kubelet applies podFailurePolicy,
activeDeadlineSeconds and evictions as the Job controller does and reports its reasons and
messages), the garbage collector, and torchrun (one process per pod, no rendezvous). The
workers are tests/operator/fake_worker.py.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

SECRET = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "secret-test"}


def conditions(body: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((body or {}).get("status") or {}).get("conditions", [])}


def job_creations(cluster: Any) -> Counter[str]:
    return Counter(name for plural, name in cluster.emulator.creations() if plural == "jobs")


def health(process: Any, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{process.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _serving(process: Any) -> bool:
    try:
        return health(process, "/livez")[0] == 200
    except OSError:
        return False


def test_an_evicted_pod_is_replaced_without_using_a_retry(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """A node drain (DisruptionTarget) of fold-0's pod, with max_retries 0: the pod is
    replaced, the Job counts no failure, and the search succeeds."""
    cluster.create_secret("store-credentials", SECRET)
    kubelet_fake.extra_env["FAKE_SLEEP"] = "2"
    cluster.apply(search_manifest("drained", s3_endpoint, parallelism={"max_retries": 0}))
    job = names.job_name("drained", "fold-0")
    cluster.wait_for("fold-0 running", lambda: kubelet_fake.running(job))
    kubelet_fake.disrupt(job)
    body = cluster.wait_for(
        "finished", lambda: cluster.phase("drained", "Succeeded", "Failed"), 120
    )
    assert body["status"]["phase"] == "Succeeded", conditions(body)
    fold = next(j for j in cluster.jobs() if j["metadata"]["name"] == job)
    assert fold["spec"]["backoffLimit"] == 0 and not fold["status"].get("failed")


def test_bad_input_fails_the_search_without_retries(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """A worker that exits with EXIT_BAD_INPUT (2) fails its Job at once (podFailurePolicy
    FailJob), although max_retries allows two more tries: the same input fails the same way."""
    cluster.create_secret("store-credentials", SECRET)
    kubelet_fake.extra_env.update(FAKE_FAIL_TASKS="fold-1", FAKE_EXIT_CODE="2")
    cluster.apply(search_manifest("bad-input", s3_endpoint, parallelism={"max_retries": 2}))
    body = cluster.wait_for("Failed", lambda: cluster.phase("bad-input", "Failed", "Succeeded"))
    failed = conditions(body)["Failed"]
    assert failed["reason"] == "BadInput" and "exit code 2" in failed["message"], failed
    job = next(
        j for j in cluster.jobs() if j["metadata"]["name"] == names.job_name("bad-input", "fold-1")
    )
    assert job["status"]["failed"] == 1  # one try, no retry
    assert job["status"]["conditions"][0]["reason"] == "PodFailurePolicy"


def test_a_deadline_fails_the_search_and_a_retry_resumes_from_the_store(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest, kubectl
):
    """search-f0-r0 hangs past its 2 s deadline: Failed with reason DeadlineExceeded (condition
    and Warning Event), and `kubectl wait --for=condition=Finished` returns on that failure.
    With a longer deadline and `kubectl annotate selfaugment.io/retry=1`, the search resumes:
    only the stopped task runs again, and `kubectl wait --for=condition=Succeeded` returns."""
    cluster.create_secret("store-credentials", SECRET)
    kubelet_fake.extra_env.update(FAKE_FAIL_TASKS="search-f0-r0", FAKE_FAIL_SLEEP="600")
    manifest = search_manifest(
        "late", s3_endpoint, resources={"active_deadline_seconds": {"search": 2}}
    )
    cluster.apply(manifest)
    waited = kubectl("wait", "augs/late", "--for=condition=Finished", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    body = cluster.search("late")
    assert body["status"]["phase"] == "Failed" and body["status"]["failedTask"] == "search-f0-r0"
    failed = conditions(body)["Failed"]
    assert failed["reason"] == "DeadlineExceeded" and "deadline of 2 s" in failed["message"]
    assert conditions(body)["Finished"]["reason"] == "Failed"
    warnings = [e for e in cluster.events() if e.get("reason") == "DeadlineExceeded"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    # Jobs that finished before the failure (on a busy machine search-f1-r0 may itself have run
    # past the 2 s deadline, so the set is read, not assumed; the folds have no deadline).
    finished_before = {
        j["metadata"]["name"] for j in cluster.jobs() if j.get("status", {}).get("succeeded")
    }
    assert {names.job_name("late", t) for t in ("fold-0", "fold-1")} <= finished_before

    kubelet_fake.extra_env["FAKE_FAIL_TASKS"] = ""
    patched = kubectl(
        "patch",
        "augs/late",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"resources": {"activeDeadlineSeconds": {"search": 600}}}}),
    )
    assert patched.returncode == 0, patched.stderr
    annotated = kubectl("annotate", "augs/late", f"{names.RETRY_ANNOTATION}=1", "--overwrite")
    assert annotated.returncode == 0, annotated.stderr
    waited = kubectl("wait", "augs/late", "--for=condition=Succeeded", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    body = cluster.search("late")
    assert body["status"]["phase"] == "Succeeded" and body["status"]["retryToken"] == "1"
    created = job_creations(cluster)
    assert created[names.job_name("late", "search-f0-r0")] == 2  # stopped, then again
    for job_name in finished_before:  # finished before: never again
        assert created[job_name] == 1, (job_name, created)
    again = next(
        j for j in cluster.jobs() if j["metadata"]["name"] == names.job_name("late", "search-f0-r0")
    )
    assert again["spec"]["activeDeadlineSeconds"] == 600
    assert any(e.get("reason") == "Retry" for e in cluster.events())


def pretrain_manifest(name: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "dataset": {"uri": "sklearn:digits", "imageSize": 16},
            "storage": {
                "uri": f"s3://selfaugment/runs/{name}",
                "endpoint": endpoint,
                "region": "us-east-1",
                "secretRef": "store-credentials",
            },
            **spec,
        },
    }


def test_a_failed_rank_restarts_all_ranks_of_a_multi_node_pretrain(
    cluster, operator_process, kubelet_fake, s3_endpoint, tmp_path, kubectl
):
    """Rank 1 of a 2-node torchrun fails once: the Job fails as a whole (podFailurePolicy), the
    operator counts a restart and creates the Job again with both ranks, which succeed."""
    cluster.create_secret("store-credentials", SECRET)
    kubelet_fake.extra_env.update(
        FAKE_FAIL_TASKS="pretrains/ranks",
        FAKE_FAIL_RANK="1",
        FAKE_FAIL_TIMES="1",
        FAKE_FAIL_SLEEP="0.2",
        FAKE_SLEEP="3",
        FAKE_STATE_DIR=str(tmp_path),
    )
    cluster.apply(pretrain_manifest("ranks", s3_endpoint, distributed={"nodes": 2}, maxRetries=1))
    waited = kubectl("wait", "pretrain/ranks", "--for=condition=Finished", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    body = cluster.pretrain("ranks")
    assert body["status"]["phase"] == "Succeeded", conditions(body)
    assert body["status"]["restarts"] == 1
    job = names.pretrain_job_name("ranks")
    assert job_creations(cluster)[job] == 2
    first = next(run for run in kubelet_fake.runs.values() if run.name == job)
    assert first.outcome["reason"] == "PodFailurePolicy"  # rank 0 was stopped with it
    assert "exit code 1" in first.outcome["message"]
    restarted = [e for e in cluster.events() if e.get("reason") == "RanksRestarted"]
    assert len(restarted) == 1 and "all 2 ranks" in restarted[0]["message"]


def test_deleting_a_search_needs_no_running_operator(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """No finalizer: with the operator stopped, a search is deleted at once and its Jobs with
    it. A finalizer left by an earlier version is removed by the operator."""
    cluster.create_secret("store-credentials", SECRET)
    kubelet_fake.extra_env["FAKE_SLEEP"] = "30"
    legacy = search_manifest("legacy", s3_endpoint)
    legacy["metadata"]["finalizers"] = [f"{names.GROUP}/finalizer"]
    cluster.apply(legacy)
    cluster.apply(search_manifest("orphan", s3_endpoint))
    cluster.wait_for("Jobs of both", lambda: len(cluster.jobs()) == 4)
    cluster.wait_for(
        "the old finalizer removed",
        lambda: not (cluster.search("legacy") or {})["metadata"].get("finalizers"),
    )
    assert not cluster.search("orphan")["metadata"].get("finalizers")
    operator_process.stop()
    for name in ("legacy", "orphan"):
        cluster.kube.delete(names.API_VERSION, names.SEARCH_PLURAL, "default", name)
        assert cluster.search(name) is None  # gone at once, nobody needed
    assert cluster.jobs() == []  # garbage-collected through ownerReferences


def test_a_standby_replica_takes_over_from_a_killed_leader(
    cluster, operator_process, second_operator, kubelet_fake, s3_endpoint, search_manifest
):
    """Two operators: one holds the Lease and reconciles, the other stands by. The leader is
    killed (no clean-up): the standby takes over once the Lease lapses (4 s here) and finishes
    the search, with no Job created twice; Events carry the operator's name."""
    cluster.create_secret("store-credentials", SECRET)
    replicas = (operator_process, second_operator)

    def leading(process: Any) -> bool:
        try:
            return bool(process.alive() and health(process, "/healthz")[1]["leader"]["leading"])
        except OSError:  # not serving yet, or killed
            return False

    def leaders() -> list[Any]:
        return [process for process in replicas if leading(process)]

    def one_leader() -> Any:
        found = leaders()
        return found[0] if len(found) == 1 else None

    leader = cluster.wait_for("a leader", one_leader)
    (standby,) = [process for process in replicas if process is not leader]
    cluster.wait_for("the standby serving", lambda: _serving(standby))
    assert health(standby, "/livez")[0] == 200  # a standby is healthy
    kubelet_fake.extra_env["FAKE_SLEEP"] = "1"
    cluster.apply(search_manifest("failover", s3_endpoint))
    cluster.wait_for(
        "a task done",
        lambda: (
            ((cluster.search("failover") or {}).get("status") or {})
            .get("progress", {})
            .get("done", 0)
            >= 1
        ),
    )
    leader.kill()
    cluster.wait_for("the standby leads", lambda: one_leader() is standby, 60)
    body = cluster.wait_for(
        "finished", lambda: cluster.phase("failover", "Succeeded", "Failed"), 120
    )
    assert body["status"]["phase"] == "Succeeded", conditions(body)
    created = job_creations(cluster)
    assert created and set(created.values()) == {1}, created
    lease = cluster.kube.get("coordination.k8s.io/v1", "leases", "default", "selfaugment-operator")
    assert lease["spec"]["leaseTransitions"] == 1
    events = cluster.events()
    assert {e["source"]["component"] for e in events} == {names.MANAGER}
    assert {e["reportingComponent"] for e in events} == {names.MANAGER}
    instances = {e["reportingInstance"] for e in events}
    assert len(instances) == 2  # Events from the old leader, then from the new one


def test_health_reports_an_unreachable_default_store(cluster, operator_process):
    """/healthz (readiness) fails while the default store endpoint refuses connections;
    /livez (liveness) does not: a restart would not bring the store back."""
    operator_process.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        operator_process.env["SELFAUGMENT_S3_ENDPOINT"] = endpoint
        operator_process.start()

        def probed() -> tuple[int, dict[str, Any]] | None:
            try:
                code, report = health(operator_process, "/healthz")
            except OSError:
                return None  # not serving yet
            return (code, report) if not report["checks"]["store"]["ok"] else None

        code, report = cluster.wait_for("the store probed", probed, 60)
    assert code == 503 and report["healthy"] is False
    assert endpoint in report["checks"]["store"]["detail"]
    assert report["checks"]["kubernetes"]["ok"] and report["checks"]["watch"]["ok"]
    live, _ = health(operator_process, "/livez")
    assert live == 200
