"""The real operator against the emulated cluster (kmock), with a kubelet fixture and moto S3.

Mechanics tests use tests/operator/fake_worker.py as the container command (it writes result
files without training) so that they take seconds; `test_smoke_search_end_to_end` runs the
real `selfaugment worker`.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from typing import Any

import boto3
import pytest

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

SECRET_VALUES = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKCHECK0001",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-Leak-Check-42",
}


def search_manifest(name: str, endpoint: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"uri": "sklearn:digits", "image_size": 16, "limit": 64},
        "model": {"width": 8},
        "moco": {"dim": 16, "queue_size": 64},
        "optim": {"batch_size": 32},
        "evaluation": {"epochs": 1, "batch_size": 32},
        "search": {
            "base_policy": "RandomResizedCrop",
            "fold_epochs": 1,
            "folds": 2,
            "repeats": 1,
            "trials": 2,
            "top_policies": 1,
            "startup_trials": 1,
            "score_batch_size": 32,
        },
        "retrain": {"epochs": 1},
        "runtime": {"device": "cpu", "progress": False},
        "parallelism": {"max_workers": 2, "max_retries": 1},
        "storage": {
            "uri": f"s3://selfaugment/runs/{name}",
            "endpoint": endpoint,
            "region": "us-east-1",
            "secret_ref": "store-credentials",
        },
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def phase_is(cluster: Any, name: str, *phases: str) -> dict[str, Any] | None:
    body = cluster.search(name)
    status = (body or {}).get("status") or {}
    return body if status.get("phase") in phases else None


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
    cluster, operator_process, kubelet_fake, s3_endpoint
):
    """Mechanics (fake worker): every stage runs, the operator restarts mid-search, no Job is
    created twice, the retrain Pretrain completes, Secret values never leak."""
    cluster.create_secret("store-credentials", SECRET_VALUES)
    kubelet_fake.extra_env["FAKE_SLEEP"] = "1"
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
        "Succeeded", lambda: phase_is(cluster, "restart", "Succeeded", "Failed"), 120
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
    assert {"stage folds", "stage search", "stage merge", "stage retrain", "stage report"} <= set(
        stages
    )

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
