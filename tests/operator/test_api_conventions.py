"""API conventions on the emulated cluster with the real kubectl: a camelCase manifest applied
with `kubectl apply`, Jobs held by Kueue shown as `Queued` until admitted, and a Job the API
server refuses (422) shown as a condition instead of retried for ever."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SECRET = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "secret-test"}


def conditions(body: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((body or {}).get("status") or {}).get("conditions", [])}


def example(name: str, endpoint: str, **resources: Any) -> dict[str, Any]:
    """examples/augmentsearch.yaml (camelCase) with a search the fake worker runs quickly."""
    body = yaml.safe_load((REPO / "examples" / "augmentsearch.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": "default"}
    spec = body["spec"]
    spec["search"].update(
        basePolicy="RandomResizedCrop", folds=2, repeats=1, trials=2, topPolicies=1
    )
    spec["search"]["startupTrials"] = 1
    spec["resources"].update(resources)
    spec["storage"].update(uri=f"s3://selfaugment/runs/{name}", endpoint=endpoint)
    return body


def created_kinds(cluster: Any) -> list[tuple[str, str]]:
    return [
        ("Job" if plural == "jobs" else plural, name)
        for plural, name in cluster.emulator.creations()
    ]


class Kueue:
    """Admits every suspended Job (spec.suspend: false), as Kueue does once quota is free."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.admitted: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for job in self.cluster.jobs():
                if job["spec"].get("suspend"):
                    name = job["metadata"]["name"]
                    body = {"spec": {"suspend": False}}
                    self.cluster.kube.patch("batch/v1", "jobs", "default", name, body)
                    self.admitted.add(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_camel_case_manifest_is_queued_while_kueue_holds_its_jobs(
    cluster, operator_process, kubelet_fake, s3_endpoint, kubectl, tmp_path
):
    """`kubectl apply` of the camelCase example (with `resources.cpu: 4`, an integer, and a
    Kueue queue): its Jobs are created suspended and the search says `Queued=True` (reason
    WaitingForAdmission); once `spec.suspend` is flipped (by `kubectl patch`, as Kueue does),
    `Queued` turns False; with every later Job admitted too, the search succeeds."""
    search = example("queued", s3_endpoint, queue="team-a", cpu=4)
    cluster.create_secret(search["spec"]["storage"]["secretRef"], SECRET)
    # The first admitted Jobs run long enough for Queued=False to be seen on a loaded machine.
    kubelet_fake.extra_env["FAKE_SLEEP"] = "10"
    manifest = tmp_path / "search.yaml"
    manifest.write_text(yaml.safe_dump(search))
    applied = kubectl("apply", "--validate=false", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert cluster.search("queued")["spec"] == search["spec"]  # camelCase, as written

    waited = kubectl("wait", "augs/queued", "--for=condition=Queued", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    queued = conditions(cluster.search("queued"))["Queued"]
    assert queued["reason"] == "WaitingForAdmission" and "team-a" in queued["message"]
    jobs = cluster.jobs()
    assert jobs and all(job["spec"]["suspend"] is True for job in jobs)
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == "4"
    assert cluster.search("queued")["status"]["phase"] == "Pending"
    assert not any(kubelet_fake.running(job["metadata"]["name"]) for job in jobs)

    for job in jobs:
        patched = kubectl(
            "patch", f"jobs/{job['metadata']['name']}", "--type=merge", "-p",
            json.dumps({"spec": {"suspend": False}}),
        )  # fmt: skip
        assert patched.returncode == 0, patched.stderr
    waited = kubectl("wait", "augs/queued", "--for=condition=Queued=false", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    assert conditions(cluster.search("queued"))["Queued"]["reason"] == "Admitted"
    queued_events = [e for e in cluster.events() if e.get("reason") == "Queued"]
    assert queued_events and all(e["type"] == "Normal" for e in queued_events)

    kubelet_fake.extra_env.pop("FAKE_SLEEP")  # later tasks: the fake worker's default
    kueue = Kueue(cluster)
    try:
        waited = kubectl("wait", "augs/queued", "--for=condition=Succeeded", "--timeout=240s")
        assert waited.returncode == 0, (waited.stderr, conditions(cluster.search("queued")))
    finally:
        kueue.close()
    assert names.pretrain_job_name(names.pretrain_name("queued")) in kueue.admitted
    assert conditions(cluster.search("queued"))["Queued"]["status"] == "False"


def test_a_job_the_api_server_refuses_is_a_condition_until_the_spec_is_fixed(
    cluster, operator_process, kubelet_fake, s3_endpoint, kubectl, tmp_path
):
    """A volume name that is not an RFC 1123 label passes the spec's checks but the API server
    refuses the Job (422): the search fails at once with reason InvalidJob, the server's message
    and one Warning Event (`kubectl wait --for=condition=Finished` returns), and no Job is
    tried again for that spec. Fixing the spec (`kubectl patch`) runs the search to the end."""
    search = example("refused", s3_endpoint)
    search["spec"]["resources"]["volumes"] = [{"name": "Data", "emptyDir": {}}]
    search["spec"]["resources"]["volumeMounts"] = [{"name": "Data", "mountPath": "/data"}]
    cluster.create_secret(search["spec"]["storage"]["secretRef"], SECRET)
    manifest = tmp_path / "search.yaml"
    manifest.write_text(yaml.safe_dump(search))
    applied = kubectl("apply", "--validate=false", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr

    waited = kubectl("wait", "augs/refused", "--for=condition=Finished", "--timeout=120s")
    assert waited.returncode == 0, waited.stderr
    body = cluster.search("refused")
    failed = conditions(body)["Failed"]
    assert body["status"]["phase"] == "Failed" and failed["reason"] == "InvalidJob", failed
    assert (
        "422" in failed["message"]
        and 'volumes[2].name: Invalid value: "Data"' in (failed["message"])
    )
    assert cluster.jobs() == []
    time.sleep(3)  # more reconciliations may come (events, resync): none tries it again
    assert cluster.jobs() == [] and "Job" not in {kind for kind, _ in created_kinds(cluster)}
    warnings = [e for e in cluster.events() if e.get("reason") == "InvalidJob"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"

    fixed = {
        "volumes": [{"name": "data", "emptyDir": {}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    patched = kubectl(
        "patch", "augs/refused", "--type=merge", "-p",
        json.dumps({"spec": {"resources": fixed}}),
    )  # fmt: skip
    assert patched.returncode == 0, patched.stderr
    waited = kubectl("wait", "augs/refused", "--for=condition=Succeeded", "--timeout=240s")
    assert waited.returncode == 0, (waited.stderr, conditions(cluster.search("refused")))
    body = cluster.search("refused")
    assert conditions(body)["Failed"]["status"] == "False" and "failedTask" not in body["status"]
