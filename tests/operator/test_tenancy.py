"""One tenant per namespace: the operator reads and writes a run's store only with the run's own
credentials Secret, never with credentials of its own.

The real operator (a subprocess) against the Kubernetes API emulator and a moto S3 server that
checks every request's signature and the signer's IAM policy (`s3_tenants`), as MinIO and AWS
do. The operator's environment holds an administrator's keys, which reach every bucket: a
search must still reach only what its own Secret allows.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from selfaugment.operator import names

if TYPE_CHECKING:
    from tests.conftest import S3Tenants

pytestmark = pytest.mark.cluster

TEAM_SECRET = "team-a-credentials"
TIMER = 2.0  # SELFAUGMENT_TIMER_INTERVAL of the operator fixture


@pytest.fixture()
def operator_env(s3_tenants: S3Tenants) -> dict[str, str]:
    """An operator whose own environment has an administrator's store credentials (what the
    operator used for every run before): they must not be what a run's store is used with."""
    return {
        "AWS_ACCESS_KEY_ID": s3_tenants.admin.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_tenants.admin.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "SELFAUGMENT_S3_MAX_ATTEMPTS": "2",
    }


def search(name: str, endpoint: str, uri: str, secret: str | None = TEAM_SECRET) -> dict:
    storage = {"uri": uri, "endpoint": endpoint, "region": "us-east-1"}
    if secret is not None:
        storage["secretRef"] = secret
    spec = {
        "dataset": {"uri": "sklearn:digits", "imageSize": 16, "limit": 64},
        "search": {"basePolicy": "RandomResizedCrop", "folds": 2, "trials": 2, "topPolicies": 1},
        "parallelism": {"maxWorkers": 1},
        "storage": storage,
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def storage_ready(cluster: Any, name: str) -> dict[str, Any] | None:
    status = (cluster.search(name) or {}).get("status") or {}
    found = [c for c in status.get("conditions") or [] if c["type"] == "StorageReady"]
    return found[0] if found else None


def test_a_search_reaches_only_what_its_own_secret_allows(
    cluster: Any, s3_tenants: S3Tenants, operator_process: Any
) -> None:
    """Team A's Secret allows bucket team-a only. Its search in team-a runs (the operator
    writes the run's spec there with team A's keys); its search that names bucket team-b, which
    the operator's own credentials could write, is refused by the store (AccessDenied), and the
    operator writes nothing there and starts no Job. A search naming no Secret is refused
    without any store access. No key or secret appears in status, Events, the operator's log,
    the Jobs or the run's artifacts."""
    team_a = s3_tenants.tenant("team-a")
    team_b = s3_tenants.tenant("team-b")
    endpoint = s3_tenants.endpoint
    cluster.create_secret(
        TEAM_SECRET,
        {"AWS_ACCESS_KEY_ID": team_a.access_key, "AWS_SECRET_ACCESS_KEY": team_a.secret_key},
    )
    cluster.apply(search("own", endpoint, "s3://team-a/runs/own"))
    cluster.apply(search("intruder", endpoint, "s3://team-b/runs/intruder"))
    cluster.apply(search("anonymous", endpoint, "s3://team-b/runs/anonymous", secret=None))

    cluster.wait_for(
        "the own search's Job",
        lambda: [j for j in cluster.jobs() if "own" in j["metadata"]["name"]],
        timeout=90,
    )
    assert "runs/own/spec.json" in s3_tenants.keys("team-a")
    # the status is patched at the end of the reconciliation that created the Job: wait for it
    own = cluster.wait_for(
        "the own search's StorageReady",
        lambda: storage_ready(cluster, "own"),
        timeout=90,
    )
    assert own is not None and own["status"] == "True", own

    denied = cluster.wait_for(
        "the intruder refused",
        lambda: (c := storage_ready(cluster, "intruder")) and c["status"] == "False" and c,
        timeout=90,
    )
    assert denied["reason"] == "StoreUnavailable", denied
    assert "s3://team-b/runs/intruder/" in denied["message"], denied
    assert "AccessDenied" in denied["message"], denied
    anonymous = cluster.wait_for(
        "the anonymous search refused",
        lambda: (c := storage_ready(cluster, "anonymous")) and c["status"] == "False" and c,
        timeout=90,
    )
    assert anonymous["reason"] == "NoCredentials", anonymous
    time.sleep(3 * TIMER)  # reconciled again and again: still refused, still nothing written
    assert storage_ready(cluster, "intruder")["status"] == "False"  # type: ignore[index]
    warnings = [
        event
        for event in cluster.events()
        if (event.get("involvedObject") or {}).get("name") == "intruder"
        and event.get("type") == "Warning"
    ]
    assert warnings and "AccessDenied" in warnings[0]["message"], warnings
    assert s3_tenants.keys("team-b") == []  # nothing written where team A may not write
    jobs = cluster.jobs()
    assert jobs and all("own" in job["metadata"]["name"] for job in jobs), jobs

    secrets = [
        team_a.access_key,
        team_a.secret_key,
        team_b.secret_key,
        s3_tenants.admin.access_key,
        s3_tenants.admin.secret_key,
    ]
    seen = {
        "status": json.dumps([cluster.search(n) for n in ("own", "intruder", "anonymous")]),
        "events": json.dumps(cluster.events()),
        "operator log": operator_process.text(),
        "jobs": json.dumps(jobs),
        "artifacts": "\n".join(
            s3_tenants.client("s3").get_object(Bucket="team-a", Key=key)["Body"].read().decode()
            for key in s3_tenants.keys("team-a")
        ),
    }
    for where, text in seen.items():
        for secret in secrets:
            assert secret not in text, f"a credential in the {where}"
    # The workers get team A's Secret by reference, as the operator used it.
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    references = {
        item["name"]: item["valueFrom"]["secretKeyRef"]["name"]
        for item in container["env"]
        if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]
    }
    assert references == {
        "AWS_ACCESS_KEY_ID": TEAM_SECRET,
        "AWS_SECRET_ACCESS_KEY": TEAM_SECRET,
    }
