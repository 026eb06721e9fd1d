"""Operator settings from the environment, and how a spec's values combine with them in the
Jobs the operator builds and the store it opens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from selfaugment.operator import manifests, names
from selfaugment.operator.runtime import open_run_store
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.pretrain_spec import PretrainSpec
from selfaugment.trainer.search.planner import task_by_id
from selfaugment.trainer.spec import AugmentSearchSpec, StorageConfig
from selfaugment.trainer.store import LocalStore, S3Store

SEARCH: dict[str, Any] = {
    "apiVersion": names.API_VERSION,
    "kind": names.SEARCH_KIND,
    "metadata": {"name": "cifar", "namespace": "ml", "uid": "uid-1"},
}
DEFAULT_TOLERATION = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
SETTINGS = OperatorSettings(
    gpu_resource="amd.com/gpu",
    worker_node_selector={"pool": "gpu", "zone": "a"},
    worker_tolerations=(DEFAULT_TOLERATION, {"key": "spot", "tolerationSeconds": 60}),
    s3_endpoint="http://minio.minio.svc:9000",
    s3_secret="minio-credentials",
)


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(__import__("os").environ):
        if key.startswith("SELFAUGMENT_"):
            monkeypatch.delenv(key)
    return monkeypatch


def build(spec_data: dict[str, Any], task: str = "fold-0") -> dict[str, Any]:
    """The pod of a task's Job for a spec (storage uri filled in) under SETTINGS."""
    data = {"resources": {"gpus": 1}, **spec_data}
    data["storage"] = {"uri": "s3://b/p", **data.get("storage", {})}
    spec = AugmentSearchSpec.model_validate(data)
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, task), SETTINGS)
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def test_from_env_reads_every_variable(clean_env: pytest.MonkeyPatch) -> None:
    tolerations = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    clean_env.setenv("SELFAUGMENT_GPU_RESOURCE", "amd.com/gpu")
    clean_env.setenv("SELFAUGMENT_WORKER_NODE_SELECTOR", json.dumps({"pool": "gpu"}))
    clean_env.setenv("SELFAUGMENT_WORKER_TOLERATIONS", json.dumps(tolerations))
    clean_env.setenv("SELFAUGMENT_S3_ENDPOINT", "http://minio:9000")
    clean_env.setenv("SELFAUGMENT_S3_SECRET", "minio-credentials")
    clean_env.setenv("SELFAUGMENT_JOB_TTL_SECONDS", "600")
    clean_env.setenv("SELFAUGMENT_ACTIVE_DEADLINES", json.dumps({"folds": 7200}))
    clean_env.setenv("SELFAUGMENT_LEADER_ELECTION", "false")
    clean_env.setenv("SELFAUGMENT_LEASE_NAME", "sa-operator")
    clean_env.setenv("POD_NAMESPACE", "ml-ops")
    clean_env.setenv("SELFAUGMENT_LEASE_DURATION_SECONDS", "30")
    settings = OperatorSettings.from_env()
    assert settings.gpu_resource == "amd.com/gpu"
    assert settings.worker_node_selector == {"pool": "gpu"}
    assert settings.worker_tolerations == tuple(tolerations)
    assert settings.s3_endpoint == "http://minio:9000"
    assert settings.s3_secret == "minio-credentials"
    assert settings.job_ttl_seconds == 600
    assert settings.active_deadlines == {**OperatorSettings().active_deadlines, "folds": 7200}
    assert settings.leader_election is False
    assert (settings.lease_name, settings.lease_namespace) == ("sa-operator", "ml-ops")
    assert settings.lease_duration == 30.0


def test_from_env_defaults_when_unset_or_empty(clean_env: pytest.MonkeyPatch) -> None:
    assert OperatorSettings.from_env() == OperatorSettings()
    # What the chart renders with its default values: empty JSON and no store settings.
    clean_env.setenv("SELFAUGMENT_GPU_RESOURCE", "")
    clean_env.setenv("SELFAUGMENT_WORKER_NODE_SELECTOR", "{}")
    clean_env.setenv("SELFAUGMENT_WORKER_TOLERATIONS", "[]")
    clean_env.setenv("SELFAUGMENT_S3_ENDPOINT", "")
    settings = OperatorSettings.from_env()
    assert settings == OperatorSettings()
    assert settings.gpu_resource == "nvidia.com/gpu" and settings.s3_endpoint is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SELFAUGMENT_WORKER_NODE_SELECTOR", "{pool: gpu}", "invalid JSON"),
        ("SELFAUGMENT_WORKER_NODE_SELECTOR", '["pool"]', "expected a JSON object, got list"),
        ("SELFAUGMENT_WORKER_NODE_SELECTOR", '{"pool": 1}', "entry 'pool': expected a string"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", "[{", "invalid JSON"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '{"key": "gpu"}', "expected a JSON list, got dict"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '["gpu"]', r"entry \[0\]: expected an object"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '[{}, {"kee": "x"}]', r"entry \[1\]: unknown field"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '[{"operator": "In"}]', r"\[0\]\.operator"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '[{"effect": "Never"}]', r"\[0\]\.effect"),
        ("SELFAUGMENT_WORKER_TOLERATIONS", '[{"tolerationSeconds": "5"}]', "expected int"),
        ("SELFAUGMENT_METRICS_PORT", "http", "expected an integer"),
        ("SELFAUGMENT_ACTIVE_DEADLINES", "[3600]", "expected a JSON object"),
        ("SELFAUGMENT_ACTIVE_DEADLINES", '{"fold": 60}', "unknown stage 'fold'"),
        ("SELFAUGMENT_ACTIVE_DEADLINES", '{"folds": 0}', "entry 'folds': expected a positive"),
        ("SELFAUGMENT_ACTIVE_DEADLINES", '{"folds": true}', "entry 'folds': expected a positive"),
        ("SELFAUGMENT_LEADER_ELECTION", "maybe", "expected true or false"),
    ],
)
def test_bad_values_name_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ValueError, match=message) as error:
        OperatorSettings.from_env()
    assert variable in str(error.value)


def test_operator_defaults_fill_what_the_spec_leaves_unset() -> None:
    pod = build({})
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "a"}
    assert pod["tolerations"] == list(SETTINGS.worker_tolerations)
    env = env_of(pod)
    assert env["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"secretKeyRef": {"name": "minio-credentials", "key": key}}


def test_spec_values_win_over_operator_defaults() -> None:
    pod = build(
        {
            "resources": {
                "gpus": 2,
                "gpu_resource": "intel.com/gpu",
                "node_selector": {"pool": "a100"},
                "tolerations": [
                    {"key": "team", "operator": "Equal", "value": "x"},
                    DEFAULT_TOLERATION,
                ],
            },
            "storage": {"endpoint": "https://s3.example.com", "secret_ref": "team-creds"},
        }
    )
    assert pod["containers"][0]["resources"]["limits"] == {"intel.com/gpu": "2"}
    assert pod["nodeSelector"] == {"pool": "a100", "zone": "a"}  # merged, spec over default
    # spec's first, then the defaults not already there (no duplicate of DEFAULT_TOLERATION)
    assert pod["tolerations"] == [
        {"key": "team", "operator": "Equal", "value": "x"},
        DEFAULT_TOLERATION,
        {"key": "spot", "tolerationSeconds": 60},
    ]
    env = env_of(pod)
    assert env["AWS_ENDPOINT_URL"] == "https://s3.example.com"
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "team-creds"


def test_spec_gpu_resource_equal_to_the_spec_default_takes_the_operator_default() -> None:
    # The CRD fills in nvidia.com/gpu when a spec omits the field: both mean "operator default".
    pod = build({"resources": {"gpus": 1, "gpu_resource": "nvidia.com/gpu"}})
    assert pod["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
    plain = OperatorSettings()
    spec = AugmentSearchSpec.model_validate(
        {"resources": {"gpus": 1}, "storage": {"uri": "s3://b"}}
    )
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), plain)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "1"}
    assert "nodeSelector" not in job["spec"]["template"]["spec"]


def test_cpu_tasks_get_scheduling_defaults_but_no_gpu() -> None:
    pod = build({}, task="merge")
    assert "limits" not in pod["containers"][0]["resources"]
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "a"}


def test_retrain_pretrain_job_gets_the_defaults_too() -> None:
    spec = AugmentSearchSpec.model_validate(
        {"resources": {"gpus": 1}, "storage": {"uri": "s3://b/p"}}
    )
    pretrain = manifests.retrain_pretrain(SEARCH, spec)
    assert pretrain["spec"]["storage"]["endpoint"] is None  # the spec itself is not rewritten
    parsed = PretrainSpec.model_validate(pretrain["spec"])
    job = manifests.pretrain_job(pretrain, parsed, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert pod["nodeSelector"] == SETTINGS.worker_node_selector
    assert env_of(pod)["AWS_ENDPOINT_URL"] == SETTINGS.s3_endpoint


class _Secret:
    """The run's credentials Secret, as the API server returns it (values base64)."""

    def get(self, *_: str) -> dict[str, Any]:
        values = {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}
        return {"data": values}


def test_operator_store_uses_the_default_endpoint(tmp_path: Path) -> None:
    kube: Any = _Secret()
    store = open_run_store(StorageConfig(uri="s3://bucket/run"), SETTINGS, kube, "team")
    assert isinstance(store, S3Store)
    assert store.endpoint == "http://minio.minio.svc:9000"
    own = open_run_store(
        StorageConfig(uri="s3://bucket/run", endpoint="http://other:9000"), SETTINGS, kube, "team"
    )
    assert isinstance(own, S3Store) and own.endpoint == "http://other:9000"
    assert isinstance(open_run_store(StorageConfig(uri=str(tmp_path)), SETTINGS), LocalStore)
