"""Successive halving on the cluster: the base stage's rungs are ordinary tasks to the operator.

The real kopf operator against the stateful API emulator and a real S3 server (moto); the
workers are the fake worker (tests/operator/fake_worker.py: it writes the results the operator
reads, training nothing), because no kubelet or GPU runs here. The operator is restarted
between the rungs: nothing is created twice and the later rung's Jobs appear after it.
"""

from __future__ import annotations

from collections import Counter

import boto3
import pytest

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rung-test-key", "AWS_SECRET_ACCESS_KEY": "rung-test-secret"}
RUNG_ZERO = ("base-r0-randomresizedcrop", "base-r0-rotate", "base-r0-cutout")
RUNG_ONE = ("base-r1-s0", "base-r1-s1")


def test_an_operator_restart_between_rungs_creates_each_job_once(
    cluster, operator_process, kubelet_fake, s3_endpoint, search_manifest
):
    cluster.create_secret("store-credentials", CREDENTIALS)
    kubelet_fake.extra_env["FAKE_SLEEP"] = "1"
    manifest = search_manifest(
        "rungs",
        s3_endpoint,
        search={
            "base_policy": "auto",
            "base_candidates": ["RandomResizedCrop", "Rotate", "Cutout"],
            "base_epochs": 2,
            "base_selection": {"method": "successive_halving"},
        },
    )
    cluster.apply(manifest)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )

    def done(task_id: str) -> bool:
        listed = s3.list_objects_v2(
            Bucket="selfaugment", Prefix=f"runs/rungs/tasks/{task_id}/result.json"
        )
        return bool(listed.get("Contents"))

    cluster.wait_for("rung 0 done", lambda: all(done(task) for task in RUNG_ZERO), 120)
    operator_process.stop()
    jobs_before = {job["metadata"]["name"] for job in cluster.jobs()}
    assert {names.job_name("rungs", task) for task in RUNG_ZERO} <= jobs_before
    operator_process.start()
    body = cluster.wait_for("Succeeded", lambda: cluster.phase("rungs", "Succeeded", "Failed"), 180)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    creations = Counter(name for plural, name in cluster.emulator.creations() if plural == "jobs")
    for task in (*RUNG_ZERO, *RUNG_ONE, "fold-0", "fold-1"):
        assert creations[names.job_name("rungs", task)] == 1, (task, creations)
    assert all(done(task) for task in RUNG_ONE)
