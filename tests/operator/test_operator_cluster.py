"""The real operator against the emulated cluster (kmock), with a kubelet fixture and moto S3.

Mechanics tests use tests/operator/fake_worker.py as the container command (it writes result
files without training) so that they take seconds; `test_smoke_search_end_to_end` runs the
real `selfaugment worker`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from selfaugment.operator import names

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cluster

SECRET_VALUES = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKCHECK0001",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-Leak-Check-42",
}


def store_keys(endpoint: str, prefix: str) -> set[str]:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    listing = client.list_objects_v2(Bucket="selfaugment", Prefix=prefix).get("Contents", [])
    return {item["Key"].removeprefix(prefix) for item in listing}


def scrape(operator_process: Any) -> str:
    url = f"http://127.0.0.1:{operator_process.metrics_port}/metrics"
    return str(urllib.request.urlopen(url).read().decode())


def store_texts(endpoint: str, prefix: str) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    texts = []
    for item in client.list_objects_v2(Bucket="selfaugment", Prefix=prefix).get("Contents", []):
        texts.append(
            client.get_object(Bucket="selfaugment", Key=item["Key"])["Body"]
            .read()
            .decode(errors="replace")
        )
    return "\n".join(texts)


def test_search_succeeds_across_an_operator_restart(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """Mechanics (fake worker): every stage runs, the operator restarts mid-search, no Job is
    created twice, the retrain Pretrain completes, Secret values never leak."""
    cluster.create_secret("store-credentials", SECRET_VALUES)
    # Tasks last long enough that the restart lands inside the search stage: kopf posts Events
    # asynchronously, and a stopping operator drops the ones still queued.
    kubelet_fake.extra_env["FAKE_SLEEP"] = "4"
    cluster.apply(search_manifest("restart", s3_endpoint))
    cluster.wait_for(
        "two tasks done",
        lambda: (
            ((cluster.search("restart") or {}).get("status") or {})
            .get("progress", {})
            .get("done", 0)
            >= 2
        ),
    )
    operator_process.stop()
    operator_process.start()
    body = cluster.wait_for(
        "Succeeded", lambda: cluster.phase("restart", "Succeeded", "Failed"), 120
    )
    status = body["status"]
    assert status["phase"] == "Succeeded", status
    assert status["stage"] == "done"
    assert status["progress"]["done"] == status["progress"]["total"] == 7
    assert status["progress"]["percent"] == 100
    assert status["bestPolicy"]["uri"] == "s3://selfaugment/runs/restart/policy.json"
    assert status["bestObjective"] == pytest.approx(-1.0 - len("search-f0-r0") / 100)
    assert status["basePolicy"] == "RandomResizedCrop"
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Failed"]["status"] == "False"

    creations = Counter(cluster.emulator.creations())
    job_creations = {name: count for (plural, name), count in creations.items() if plural == "jobs"}
    # 6 task Jobs + the Pretrain's Job (retrain), each created exactly once
    assert len(job_creations) == 7 and set(job_creations.values()) == {1}, job_creations
    assert names.pretrain_job_name(names.pretrain_name("restart")) in job_creations
    assert creations[("pretrains", names.pretrain_name("restart"))] == 1

    pretrain = cluster.wait_for(
        "Pretrain Succeeded",
        lambda: (
            (p := cluster.pretrain(names.pretrain_name("restart")))
            and (p.get("status") or {}).get("phase") == "Succeeded"
            and p
        ),
    )
    assert pretrain["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert pretrain["status"]["rotationAccuracy"] == 0.5

    jobs = cluster.jobs()
    for job in jobs:
        assert job["metadata"]["labels"][names.LABEL_SEARCH] == "restart"
        container = job["spec"]["template"]["spec"]["containers"][0]
        refs = [e for e in container["env"] if e["name"] in SECRET_VALUES]
        assert all("secretKeyRef" in e["valueFrom"] and "value" not in e for e in refs)
    seen = kubelet_fake.seen_env[names.job_name("restart", "fold-0")]
    assert seen["AWS_ACCESS_KEY_ID"] == SECRET_VALUES["AWS_ACCESS_KEY_ID"]  # injected by reference

    reasons = {event.get("reason") for event in cluster.events()}
    assert {"StageStarted", "TaskStarted", "Succeeded"} <= reasons
    stages = [
        e["message"].split(":")[0] for e in cluster.events() if e.get("reason") == "StageStarted"
    ]
    expected = {"stage folds", "stage search", "stage merge", "stage retrain", "stage report"}
    assert expected <= set(stages), [(e.get("reason"), e.get("message")) for e in cluster.events()]

    leak_surfaces = [
        json.dumps(cluster.search("restart")),
        json.dumps(cluster.events()),
        json.dumps(pretrain),
        operator_process.text(),
        store_texts(s3_endpoint, "runs/restart/"),
    ]
    for value in SECRET_VALUES.values():
        assert all(value not in text for text in leak_surfaces)

    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{operator_process.metrics_port}/metrics")
        .read()
        .decode()
    )
    assert 'selfaugment_searches{phase="Succeeded"} 1.0' in metrics
    assert (
        'selfaugment_tasks{namespace="default",search="restart",state="succeeded"} 7.0' in metrics
    )
    assert "selfaugment_reconcile_duration_seconds_bucket" in metrics
    assert (
        "selfaugment_reconcile_errors_total" in metrics or "selfaugment_reconcile_errors" in metrics
    )
    health = urllib.request.urlopen(f"http://127.0.0.1:{operator_process.metrics_port}/healthz")
    assert health.status == 200


def test_failed_task_is_retried_then_fails_the_search(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """Mechanics (fake worker told to fail search-f1-r0): the Job is retried up to
    max_retries (backoffLimit), then the search fails with a condition naming the task."""
    cluster.create_secret("store-credentials", SECRET_VALUES)
    kubelet_fake.extra_env["FAKE_FAIL_TASKS"] = "search-f1-r0"
    cluster.apply(search_manifest("failing", s3_endpoint, parallelism={"max_retries": 2}))
    body = cluster.wait_for("Failed", lambda: cluster.phase("failing", "Failed", "Succeeded"), 90)
    status = body["status"]
    assert status["phase"] == "Failed"
    assert status["failedTask"] == "search-f1-r0"
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "TaskFailed"
    assert "search-f1-r0" in failed["message"] and "BackoffLimitExceeded" in failed["message"]
    assert "3 failed attempts" in failed["message"]  # 1 try + 2 retries
    job = next(
        j
        for j in cluster.jobs()
        if j["metadata"]["name"] == names.job_name("failing", "search-f1-r0")
    )
    assert job["spec"]["backoffLimit"] == 2 and job["status"]["failed"] == 3
    warnings = [
        e
        for e in cluster.events()
        if e.get("type") == "Warning" and e.get("reason") == "TaskFailed"
    ]
    assert warnings and "search-f1-r0" in warnings[0]["message"]
    assert cluster.pretrain(names.pretrain_name("failing")) is None  # later stages never started
    # The Job's 3 failed pods and 2 retries reach the counters (once each, however many events).
    labels = 'namespace="default",search="failing"'
    cluster.wait_for(
        "failure counters",
        lambda: f"selfaugment_task_failures_total{{{labels}}} 3.0" in scrape(operator_process),
        15,
    )
    assert f"selfaugment_task_retries_total{{{labels}}} 2.0" in scrape(operator_process)


def test_operator_defaults_reach_the_store_and_the_workers(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """A spec without storage.endpoint/secret_ref: the operator opens the store at
    SELFAUGMENT_S3_ENDPOINT and gives workers that endpoint and the SELFAUGMENT_S3_SECRET
    Secret; the GPU resource, nodeSelector and tolerations defaults land in the Jobs."""
    operator_process.stop()
    operator_process.env.update(
        SELFAUGMENT_S3_ENDPOINT=s3_endpoint,
        SELFAUGMENT_S3_SECRET="default-credentials",
        SELFAUGMENT_GPU_RESOURCE="amd.com/gpu",
        SELFAUGMENT_WORKER_NODE_SELECTOR='{"pool": "gpu"}',
        SELFAUGMENT_WORKER_TOLERATIONS='[{"key": "gpu", "operator": "Exists"}]',
    )
    operator_process.start()
    cluster.create_secret("default-credentials", SECRET_VALUES)
    manifest = search_manifest("defaults", s3_endpoint, resources={"gpus": 1})
    del manifest["spec"]["storage"]["endpoint"], manifest["spec"]["storage"]["secretRef"]
    cluster.apply(manifest)
    # fold-0 finished and the search went on: the operator read its result at the default.
    cluster.wait_for(
        "a task done",
        lambda: (
            ((cluster.search("defaults") or {}).get("status") or {})
            .get("progress", {})
            .get("done", 0)
            >= 1
        ),
        60,
    )
    job = next(
        j for j in cluster.jobs() if j["metadata"]["name"] == names.job_name("defaults", "fold-0")
    )
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "default-credentials"
    assert container["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    seen = kubelet_fake.seen_env[names.job_name("defaults", "fold-0")]
    assert seen["AWS_ACCESS_KEY_ID"] == SECRET_VALUES["AWS_ACCESS_KEY_ID"]
    assert "AWS_ENDPOINT_URL" not in operator_process.env  # only the operator's own setting
    assert "spec.json" in store_keys(s3_endpoint, "runs/defaults/")


def test_invalid_spec_fails_the_resource_not_the_operator(
    cluster, operator_process, s3_endpoint, search_manifest
):
    """A spec the model rejects gets phase Failed, a SpecValid=False condition and an Event
    naming the field; the operator keeps serving other resources."""
    bad = search_manifest("invalid", s3_endpoint)
    bad["spec"]["search"]["folds"] = 0
    cluster.apply(bad)
    bad_pretrain = {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {"name": "invalid-pretrain", "namespace": "default"},
        "spec": {
            "trainable": "heads",
            "storage": {"uri": "s3://selfaugment/x", "endpoint": s3_endpoint},
        },
    }
    cluster.apply(bad_pretrain)
    body = cluster.wait_for("Failed", lambda: cluster.phase("invalid", "Failed"))
    condition = {c["type"]: c for c in body["status"]["conditions"]}["SpecValid"]
    assert condition["status"] == "False" and condition["reason"] == "InvalidSpec"
    assert "search.folds" in condition["message"]
    events = [e for e in cluster.events() if e.get("reason") == "InvalidSpec"]
    assert any("search.folds" in e["message"] for e in events)
    pretrain = cluster.wait_for(
        "Pretrain Failed",
        lambda: (
            (p := cluster.pretrain("invalid-pretrain"))
            and (p.get("status") or {}).get("phase") == "Failed"
            and p
        ),
    )
    assert (
        "trainable"
        in {c["type"]: c for c in pretrain["status"]["conditions"]}["SpecValid"]["message"]
    )
    assert operator_process.alive()
    assert not cluster.jobs()


def test_spec_change_is_refused_and_deletion_removes_children(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    """Mechanics (fake worker, slow): changing an immutable field sets SpecImmutable and an
    Event; deleting the search garbage-collects its Jobs (ownerReferences)."""
    cluster.create_secret("store-credentials", SECRET_VALUES)
    kubelet_fake.extra_env["FAKE_SLEEP"] = "30"
    cluster.apply(search_manifest("deleted", s3_endpoint))
    cluster.wait_for("Jobs", lambda: len(cluster.jobs()) == 2)
    cluster.kube._call(
        "PATCH",
        f"/apis/{names.API_VERSION}/namespaces/default/{names.SEARCH_PLURAL}/deleted",
        body={"spec": {"search": {"trials": 5}}},
        content_type="application/merge-patch+json",
    )

    def immutable() -> Any:
        conditions = ((cluster.search("deleted") or {}).get("status") or {}).get("conditions", [])
        return next(
            (c for c in conditions if c["type"] == "SpecImmutable" and c["status"] == "True"), None
        )

    condition = cluster.wait_for("SpecImmutable", immutable)
    assert "spec.search" in condition["message"]
    assert any(e.get("reason") == "ImmutableFieldChanged" for e in cluster.events())
    cluster.kube.delete(names.API_VERSION, names.SEARCH_PLURAL, "default", "deleted")
    # kopf stops the timers and removes its finalizer first: slow on a loaded machine
    cluster.wait_for("search gone", lambda: cluster.search("deleted") is None, timeout=180)
    assert cluster.jobs() == []


def test_kubectl_apply_example(cluster):
    """A real kubectl applies examples/augmentsearch.yaml to the emulated API server.

    (--validate=false: the emulator serves no OpenAPI document; schema validation of the
    example is in test_crdgen.py.)"""
    local = Path(sys.executable).parent / "kubectl"  # `make tools` puts kubectl into the venv
    kubectl = str(local) if local.exists() else shutil.which("kubectl")
    assert kubectl, "kubectl not found: run `make tools` (or install a kubectl on PATH)"
    example = REPO / "examples" / "augmentsearch.yaml"
    result = subprocess.run(
        [
            kubectl,
            "--kubeconfig",
            str(cluster.kubeconfig),
            "apply",
            "--validate=false",
            "-f",
            str(example),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "cifar10-selfaugment" in result.stdout
    body = cluster.search("cifar10-selfaugment")
    expected = yaml.safe_load(example.read_text())
    assert body["spec"] == expected["spec"]
    assert body["metadata"]["uid"]


def smoke_manifest(name: str, endpoint: str) -> dict[str, Any]:
    """examples/search-smoke.yaml, shrunk further (2 base candidates, fewer epochs/trials)."""
    spec = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    spec["dataset"]["limit"] = 256
    spec["search"].update(
        baseCandidates=["RandomResizedCrop", "Rotate"],
        baseEpochs=1,
        foldEpochs=1,
        trials=4,
        startupTrials=2,
        topPolicies=2,
    )
    spec["evaluation"]["epochs"] = 2
    spec["retrain"]["epochs"] = 1
    spec["runtime"] = {**spec.get("runtime", {}), "device": "cpu", "progress": False}
    spec["parallelism"] = {"maxWorkers": 2, "maxRetries": 0}
    spec["storage"] = {
        "uri": f"s3://selfaugment/runs/{name}",
        "endpoint": endpoint,
        "region": "us-east-1",
        "secretRef": "store-credentials",
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def test_smoke_search_end_to_end(cluster, operator_process, kubelet_real, s3_endpoint):
    """The real worker (`selfaugment worker run`) runs every stage of the smoke search in
    Jobs; results land in S3 (moto); the search succeeds with a policy artifact and a
    completed Pretrain."""
    cluster.create_secret("store-credentials", SECRET_VALUES)
    cluster.apply(smoke_manifest("smoke", s3_endpoint))
    body = cluster.wait_for("finished", lambda: cluster.phase("smoke", "Succeeded", "Failed"), 540)
    status = body["status"]
    assert status["phase"] == "Succeeded", (
        status,
        sorted(p.name for p in (kubelet_real.logs).iterdir()),
    )
    assert status["progress"]["done"] == status["progress"]["total"]
    assert status["basePolicy"] in ("RandomResizedCrop", "Rotate")
    assert status["bestPolicy"]["uri"] == "s3://selfaugment/runs/smoke/policy.json"
    assert isinstance(status["bestObjective"], float)
    assert status["progress"]["trialsDone"] == status["progress"]["trialsTotal"] == 8
    policy = json.loads(store_texts(s3_endpoint, "runs/smoke/policy.json"))
    assert policy
    pretrain = cluster.wait_for(
        "Pretrain Succeeded",
        lambda: (
            (p := cluster.pretrain(names.pretrain_name("smoke")))
            and (p.get("status") or {}).get("phase") == "Succeeded"
            and p
        ),
    )
    assert 0.0 <= pretrain["status"]["rotationAccuracy"] <= 1.0
    assert pretrain["status"]["checkpoint"].startswith("s3://selfaugment/runs/smoke/")
    stage_events = {
        e["message"].split(":")[0] for e in cluster.events() if e.get("reason") == "StageStarted"
    }
    assert {
        "stage base",
        "stage folds",
        "stage search",
        "stage merge",
        "stage retrain",
        "stage report",
    } <= stage_events
    for value in SECRET_VALUES.values():
        assert value not in operator_process.text()
        assert value not in json.dumps(cluster.search("smoke"))
