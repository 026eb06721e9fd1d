"""The operator tells the user: a missing credentials Secret, a missing bucket, an unreachable S3
endpoint and pods that cannot start show as a status condition and a Warning Event naming the
Secret, bucket, endpoint or pod, and clear once the cause is gone.

The real operator process runs against kmock's Kubernetes API emulator and a real S3 server
(moto) on loopback (fixtures of tests/operator/conftest.py). There is no real API server and no
kubelet: the fake kubelet of those fixtures runs a Job's command as a local process once the Job
exists, and the test creating Pod objects plays the kubelet that reports a container waiting
with CreateContainerConfigError or ImagePullBackOff.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

SECRET = "store-credentials"
SECRET_VALUES = {
    "AWS_ACCESS_KEY_ID": "AKIAFAULTCHECK0001",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-Fault-Check-42",
}
#: The operator's own store credentials (tests/operator/conftest.py operator_env).
OPERATOR_CREDENTIALS = ("operator-key", "operator-secret")
TIMER = 2.0  # SELFAUGMENT_TIMER_INTERVAL of the operator fixture


def storage(endpoint: str, uri: str) -> dict[str, Any]:
    return {"uri": uri, "endpoint": endpoint, "region": "us-east-1", "secretRef": SECRET}


def search_manifest(name: str, endpoint: str, uri: str | None = None, **spec: Any) -> dict:
    """A small search (2 folds, 2 workers) whose tasks the fake worker finishes in a second."""
    body: dict[str, Any] = {
        "dataset": {"uri": "sklearn:digits", "imageSize": 16, "limit": 64},
        "model": {"width": 8},
        "moco": {"dim": 16, "queueSize": 64},
        "optim": {"batchSize": 32},
        "search": {
            "basePolicy": "RandomResizedCrop",
            "foldEpochs": 1,
            "folds": 2,
            "repeats": 1,
            "trials": 2,
            "topPolicies": 1,
            "startupTrials": 1,
        },
        "retrain": {"epochs": 1},
        "parallelism": {"maxWorkers": 2, "maxRetries": 0},
        "storage": storage(endpoint, uri or f"s3://selfaugment/faults/{name}"),
        **spec,
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }


def conditions(body: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((body or {}).get("status") or {}).get("conditions") or []}


def wait_condition(
    cluster: Any, read: Callable[[], dict[str, Any] | None], kind: str, status: str, **kw: Any
) -> dict[str, Any]:
    """The condition `kind` once it has `status` (and the reason given as `reason=`)."""

    def check() -> dict[str, Any] | None:
        found = conditions(read()).get(kind)
        if found is None or found["status"] != status:
            return None
        return found if kw.get("reason") in (None, found["reason"]) else None

    return dict(cluster.wait_for(f"{kind}={status} {kw}", check, kw.get("timeout", 60)))


def events_of(cluster: Any, name: str, reason: str, kind: str = "Warning") -> list[dict]:
    return [
        event
        for event in cluster.events()
        if (event.get("involvedObject") or {}).get("name") == name
        and event.get("reason") == reason
        and event.get("type") == kind
    ]


def wait_events(cluster: Any, name: str, reason: str, kind: str = "Warning") -> list[dict]:
    return list(
        cluster.wait_for(
            f"{kind} Event {reason} of {name}", lambda: events_of(cluster, name, reason, kind), 30
        )
    )


def progress_done(cluster: Any, name: str) -> int:
    status = (cluster.search(name) or {}).get("status") or {}
    return int((status.get("progress") or {}).get("done") or 0)


def leaked(cluster: Any, operator_process: Any, name: str, values: tuple[str, ...]) -> list[str]:
    surfaces = {
        "status": json.dumps(cluster.search(name)),
        "events": json.dumps(cluster.events()),
        "operator log": operator_process.text(),
    }
    return [where for where, text in surfaces.items() for value in values if value in text]


def test_a_missing_secret_is_named_and_the_run_starts_once_it_exists(
    cluster, operator_process, kubelet_fake, s3_endpoint
):
    """`storage.secret_ref` names a Secret that does not exist (of a search and of a standalone
    Pretrain): StorageReady=False, reason SecretNotFound, and one Warning Event name the Secret;
    no Job is created and the store is not touched (the operator reads a run's store only with
    the run's own Secret). Once the Secret is created, the next reconciliation clears the
    condition and the runs start."""
    cluster.apply(search_manifest("no-secret", s3_endpoint))
    cluster.apply(
        {
            "apiVersion": names.API_VERSION,
            "kind": names.PRETRAIN_KIND,
            "metadata": {"name": "no-secret-pt", "namespace": "default"},
            "spec": {"storage": storage(s3_endpoint, "s3://selfaugment/faults/no-secret-pt")},
        }
    )
    search = lambda: cluster.search("no-secret")  # noqa: E731
    pretrain = lambda: cluster.pretrain("no-secret-pt")  # noqa: E731
    for read, name in ((search, "no-secret"), (pretrain, "no-secret-pt")):
        condition = wait_condition(cluster, read, "StorageReady", "False", reason="SecretNotFound")
        assert f"Secret {SECRET} (spec.storage.secretRef) not found" in condition["message"]
        assert "namespace default" in condition["message"]
        warnings = wait_events(cluster, name, "SecretNotFound")
        assert f"Secret {SECRET}" in warnings[0]["message"]
    progressing = conditions(search())["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "SecretNotFound")
    assert conditions(pretrain())["Ready"]["reason"] == "SecretNotFound"
    assert (search() or {})["status"]["phase"] == "Pending"
    time.sleep(3 * TIMER)  # reconciled again and again: no Job, no second Event
    assert cluster.jobs() == []
    assert len(events_of(cluster, "no-secret", "SecretNotFound")) == 1
    assert operator_process.alive()

    cluster.create_secret(SECRET, SECRET_VALUES)
    ready = wait_condition(cluster, search, "StorageReady", "True")
    assert ready["reason"] == "Available" and f"Secret {SECRET} exists" in ready["message"]
    cluster.wait_for("a task done", lambda: progress_done(cluster, "no-secret") >= 1, 60)
    assert conditions(search())["Progressing"]["status"] == "True"
    wait_condition(cluster, pretrain, "StorageReady", "True")
    cluster.wait_for(
        "Pretrain Succeeded",
        lambda: ((pretrain() or {}).get("status") or {}).get("phase") == "Succeeded",
        60,
    )
    assert wait_events(cluster, "no-secret", "StorageReady", "Normal")
    assert not leaked(cluster, operator_process, "no-secret", tuple(SECRET_VALUES.values()))


def test_a_missing_bucket_is_named_and_the_search_starts_once_it_exists(
    cluster, operator_process, kubelet_fake, s3_endpoint
):
    """`storage.uri` names a bucket that does not exist: StorageReady=False, reason
    BucketNotFound, and a Warning Event name the bucket and the endpoint; the operator keeps
    retrying. Once the bucket is created the search starts, writing its spec.json there."""
    cluster.create_secret(SECRET, SECRET_VALUES)
    uri = "s3://missing-bucket/runs/no-bucket"
    cluster.apply(search_manifest("no-bucket", s3_endpoint, uri=uri))
    search = lambda: cluster.search("no-bucket")  # noqa: E731
    condition = wait_condition(cluster, search, "StorageReady", "False", reason="BucketNotFound")
    assert f"bucket missing-bucket does not exist at {s3_endpoint}" in condition["message"]
    warning = wait_events(cluster, "no-bucket", "BucketNotFound")[0]
    assert "bucket missing-bucket" in warning["message"] and s3_endpoint in warning["message"]
    status = (search() or {})["status"]
    assert status["phase"] == "Pending"
    assert conditions(search())["Progressing"]["reason"] == "BucketNotFound"
    assert cluster.jobs() == [] and operator_process.alive()

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    client.create_bucket(Bucket="missing-bucket")
    wait_condition(cluster, search, "StorageReady", "True")
    cluster.wait_for("a task done", lambda: progress_done(cluster, "no-bucket") >= 1, 60)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="missing-bucket")["Contents"]]
    assert "runs/no-bucket/spec.json" in keys
    assert len(events_of(cluster, "no-bucket", "BucketNotFound")) == 1
    assert not leaked(cluster, operator_process, "no-bucket", OPERATOR_CREDENTIALS)


def test_an_unreachable_endpoint_is_named_and_the_operator_keeps_retrying(
    cluster, operator_process, s3_endpoint, closed_endpoint
):
    """`storage.endpoint` points at a loopback port where nothing listens: after the S3
    client's retries, StorageReady=False, reason EndpointUnreachable, and a Warning Event name
    the endpoint (never credentials); the operator stays up and serves other searches."""
    cluster.create_secret(SECRET, SECRET_VALUES)
    cluster.apply(search_manifest("no-endpoint", closed_endpoint))
    search = lambda: cluster.search("no-endpoint")  # noqa: E731
    condition = wait_condition(
        cluster, search, "StorageReady", "False", reason="EndpointUnreachable", timeout=90
    )
    assert f"S3 endpoint {closed_endpoint} is unreachable" in condition["message"]
    warning = wait_events(cluster, "no-endpoint", "EndpointUnreachable")[0]
    assert closed_endpoint in warning["message"]
    assert (search() or {})["status"]["phase"] == "Pending"
    assert conditions(search())["Progressing"]["reason"] == "EndpointUnreachable"
    # Another search at the working endpoint still gets served.
    cluster.apply(search_manifest("reachable", s3_endpoint))
    wait_condition(cluster, lambda: cluster.search("reachable"), "StorageReady", "True")
    assert operator_process.alive()
    values = OPERATOR_CREDENTIALS + tuple(SECRET_VALUES.values())
    assert not leaked(cluster, operator_process, "no-endpoint", values)


def stuck_pod(job: dict[str, Any], suffix: str, reason: str, message: str) -> dict[str, Any]:
    """A Pod of `job` as the Job controller creates it (template labels, job-name labels, a
    controller reference) with the waiting state the kubelet reports for `reason`."""
    template = copy.deepcopy(job["spec"]["template"])
    job_name = job["metadata"]["name"]
    labels = {
        **template["metadata"]["labels"],
        "batch.kubernetes.io/job-name": job_name,
        "job-name": job_name,
        "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
    }
    container = template["spec"]["containers"][0]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{suffix}",
            "namespace": "default",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job_name,
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
        "status": {
            "phase": "Pending",
            "containerStatuses": [waiting(container, reason, message)],
        },
    }


def waiting(container: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": {"reason": reason, "message": message}},
    }


def set_pod_status(cluster: Any, name: str, status: dict[str, Any]) -> None:
    cluster.kube._call(
        "PATCH",
        f"/api/v1/namespaces/default/pods/{name}",
        body={"status": status},
        content_type="application/merge-patch+json",
    )


def test_pods_that_cannot_start_are_named_with_the_kubelets_reason(
    cluster, operator_process, s3_endpoint
):
    """The pods of a search's two Jobs wait with CreateContainerConfigError (a key missing from
    the Secret) and ImagePullBackOff (an image tag that does not exist), as a kubelet reports
    them: WorkersHealthy=False names both pods with reason and message (the image), and each
    pod gets one Warning Event, not one per reconciliation nor per pull retry
    (ImagePullBackOff and ErrImagePull alternate). Once the containers run, it clears."""
    cluster.create_secret(SECRET, SECRET_VALUES)
    image = "registry.example.com/selfaugment/worker:no-such-tag"
    cluster.apply(search_manifest("stuck", s3_endpoint, resources={"image": image}))
    jobs = cluster.wait_for("two Jobs", lambda: len(cluster.jobs()) == 2 and cluster.jobs())
    config, pull = sorted(jobs, key=lambda job: job["metadata"]["name"])
    key_missing = f"couldn't find key AWS_SECRET_ACCESS_KEY in Secret default/{SECRET}"
    back_off = f'Back-off pulling image "{image}"'
    pods = [
        stuck_pod(config, "x7k2p", "CreateContainerConfigError", key_missing),
        stuck_pod(pull, "q4m9z", "ImagePullBackOff", back_off),
    ]
    for pod in pods:
        cluster.kube._call("POST", "/api/v1/namespaces/default/pods", body=pod)
    config_pod, pull_pod = (pod["metadata"]["name"] for pod in pods)
    search = lambda: cluster.search("stuck")  # noqa: E731

    condition = wait_condition(cluster, search, "WorkersHealthy", "False")
    assert condition["reason"] == "CreateContainerConfigError"  # the first pod's, by name
    message = condition["message"]
    assert f"pod {config_pod} of Job {config['metadata']['name']}" in message
    assert f"CreateContainerConfigError: {key_missing}" in message
    assert f"pod {pull_pod} of Job {pull['metadata']['name']}" in message
    assert f"ImagePullBackOff: {back_off}" in message
    progressing = conditions(search())["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", condition["reason"])
    config_events = wait_events(cluster, "stuck", "CreateContainerConfigError")
    assert config_pod in config_events[0]["message"] and key_missing in config_events[0]["message"]
    pull_events = wait_events(cluster, "stuck", "ImagePullBackOff")
    assert pull_pod in pull_events[0]["message"] and image in pull_events[0]["message"]

    # The kubelet retries the pull: ErrImagePull with the registry's answer, then back-off again.
    not_found = f'failed to resolve reference "{image}": not found'
    set_pod_status(
        cluster,
        pull_pod,
        {
            "containerStatuses": [
                waiting(
                    pull["spec"]["template"]["spec"]["containers"][0], "ErrImagePull", not_found
                )
            ]
        },
    )
    cluster.wait_for(
        "ErrImagePull in the condition",
        lambda: not_found in conditions(search())["WorkersHealthy"]["message"],
        30,
    )
    time.sleep(3 * TIMER)
    assert len(events_of(cluster, "stuck", "CreateContainerConfigError")) == 1
    assert len(events_of(cluster, "stuck", "ImagePullBackOff")) == 1
    assert events_of(cluster, "stuck", "ErrImagePull") == []  # the same fault, told once

    running = {"phase": "Running", "containerStatuses": []}
    for pod, job in ((config_pod, config), (pull_pod, pull)):
        container = job["spec"]["template"]["spec"]["containers"][0]
        started = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        running["containerStatuses"] = [{**waiting(container, "", ""), "state": started}]
        set_pod_status(cluster, pod, running)
    healthy = wait_condition(cluster, search, "WorkersHealthy", "True")
    assert healthy["reason"] == "NoStuckPods"
    assert conditions(search())["Progressing"]["status"] == "True"
    assert operator_process.alive()
