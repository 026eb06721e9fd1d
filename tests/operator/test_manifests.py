"""Pure manifest builders: names, ownership, labels, scheduling, credentials, torchrun."""

from __future__ import annotations

import re
from typing import Any

import pytest

from selfaugment.operator import manifests, names
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.pretrain_spec import PretrainSpec
from selfaugment.trainer.search.planner import all_tasks, task_by_id
from selfaugment.trainer.spec import AugmentSearchSpec

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SETTINGS = OperatorSettings(worker_image="registry/worker:1")
SEARCH: dict[str, Any] = {
    "apiVersion": names.API_VERSION,
    "kind": names.SEARCH_KIND,
    "metadata": {"name": "cifar", "namespace": "ml", "uid": "uid-1"},
}


def search_spec(**resources: Any) -> AugmentSearchSpec:
    return AugmentSearchSpec.model_validate(
        {
            "resources": {"gpus": 2, **resources},
            "parallelism": {"maxRetries": 3},
            "storage": {"uri": "s3://b/p", "endpoint": "http://minio:9000", "secretRef": "creds"},
        }
    )


def test_job_names_are_deterministic_dns_labels_within_63() -> None:
    long = "a-very-long-search-name-" * 4
    first = names.job_name(long, "search-f12-r1")
    assert first == names.job_name(long, "search-f12-r1")
    assert first != names.job_name(long, "search-f12-r0")
    assert len(first) <= 63 and DNS_LABEL.match(first)
    assert names.job_name("cifar", "base-rotate") == "cifar-base-rotate"
    assert names.dns_name("My_Search.v2", "fold-0") != names.dns_name("my-search-v2", "fold-0")
    pretrain_job = names.pretrain_job_name(long)
    assert len(pretrain_job) <= 52 and DNS_LABEL.match(pretrain_job)


def test_every_task_gets_a_distinct_job_name() -> None:
    spec = AugmentSearchSpec()
    job_names = {names.job_name("s", task.id) for task in all_tasks(spec)}
    assert len(job_names) == len(all_tasks(spec))


def test_task_job_is_owned_labelled_and_scheduled() -> None:
    spec = search_spec(
        node_selector={"pool": "gpu"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"x": 1}},
        priority_class="high",
        gpu_resource="amd.com/gpu",
    )
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-1"), SETTINGS)
    meta = job["metadata"]
    assert meta["name"] == "cifar-fold-1" and meta["namespace"] == "ml"
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "AugmentSearch",
        "cifar",
        "uid-1",
        True,
    )
    assert meta["labels"][names.LABEL_SEARCH] == "cifar"
    assert meta["labels"][names.LABEL_STAGE] == "folds"
    assert meta["labels"][names.LABEL_TASK] == "fold-1"
    assert job["spec"]["backoffLimit"] == 3 and "suspend" not in job["spec"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}} and pod["priorityClassName"] == "high"
    container = pod["containers"][0]
    assert container["image"] == "registry/worker:1"
    assert container["command"] == [
        "selfaugment",
        "worker",
        "run",
        "--store",
        "s3://b/p",
        "--task",
        "fold-1",
    ]
    assert container["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_cpu_only_tasks_request_no_gpu_and_image_comes_from_spec() -> None:
    spec = search_spec(image="mine:2")
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "merge"), SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "limits" not in container["resources"]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert container["image"] == "mine:2"


def test_credentials_are_referenced_never_copied() -> None:
    env = manifests.worker_env(search_spec().storage, SETTINGS)
    by_name = {item["name"]: item for item in env}
    assert by_name["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in by_name[key]
        assert by_name[key]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": key}


def test_kueue_queue_creates_suspended_labelled_jobs() -> None:
    spec = search_spec(queue="team-a")
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), SETTINGS)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-a"


def test_search_without_storage_cannot_build_jobs() -> None:
    spec = AugmentSearchSpec()
    with pytest.raises(ValueError, match=r"storage\.uri"):
        manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), SETTINGS)


def test_retrain_pretrain_is_owned_by_the_search_and_valid() -> None:
    spec = search_spec()
    pretrain = manifests.retrain_pretrain(SEARCH, spec)
    assert pretrain["metadata"]["name"] == "cifar-retrain"
    assert pretrain["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    parsed = PretrainSpec.model_validate(pretrain["spec"])
    assert parsed.search_ref == "cifar" and parsed.optim.epochs == spec.retrain.epochs
    body = {**pretrain, "metadata": {**pretrain["metadata"], "uid": "uid-2"}}
    job = manifests.pretrain_job(body, parsed, SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    # two GPUs on one node: torchrun standalone around the search's retrain task
    assert container["command"][:4] == [
        "torchrun",
        "--standalone",
        "--nproc-per-node=2",
        "--no-python",
    ]
    assert container["command"][4:] == manifests.task_command("s3://b/p", "retrain")
    assert job["metadata"]["labels"][names.LABEL_TASK] == "retrain"


PRETRAIN: dict[str, Any] = {
    "apiVersion": names.API_VERSION,
    "kind": names.PRETRAIN_KIND,
    "metadata": {"name": "hier", "namespace": "ml", "uid": "uid-9"},
}


def test_single_gpu_pretrain_runs_the_worker_directly() -> None:
    spec = PretrainSpec.model_validate({"resources": {"gpus": 1}, "storage": {"uri": "s3://b"}})
    job = manifests.pretrain_job(PRETRAIN, spec, SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "selfaugment",
        "worker",
        "pretrain",
        "--store",
        "s3://b",
        "--prefix",
        "pretrains/hier",
    ]
    assert "completionMode" not in job["spec"]
    assert spec.to_config().init_from is None


def test_multi_node_pretrain_is_an_indexed_job_with_a_headless_service() -> None:
    spec = PretrainSpec.model_validate(
        {
            "resources": {"gpus": 4},
            "distributed": {"nodes": 3, "port": 29400},
            "initFrom": "s3://b/ckpt.pt",
            "trainable": "batchnorm",
            "storage": {"uri": "s3://b"},
        }
    )
    job = manifests.pretrain_job(PRETRAIN, spec, SETTINGS)
    service = manifests.pretrain_service(PRETRAIN, spec)
    name = names.pretrain_job_name("hier")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    command = pod["containers"][0]["command"]
    assert "--nnodes=3" in command and "--nproc-per-node=4" in command
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert f"--master-addr={name}-0.{name}" in command and "--master-port=29400" in command
    assert any(item["name"] == "JOB_COMPLETION_INDEX" for item in pod["containers"][0]["env"])
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-9"
    config = spec.to_config()
    assert (config.init_from, config.trainable) == ("s3://b/ckpt.pt", "batchnorm")


def test_pretrain_spec_requires_a_store() -> None:
    with pytest.raises(ValueError, match=r"storage\.uri"):
        PretrainSpec.model_validate({})


DATA_VOLUME = {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets"}}


def test_worker_pods_are_non_root_read_only_with_scratch_and_shared_memory() -> None:
    spec = search_spec()
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), SETTINGS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # with a read-only root the worker writes only to /tmp (HOME, cache) and /dev/shm
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {"/tmp": "scratch", "/dev/shm": "dshm"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}


def test_platform_assigned_uid_and_no_shared_memory_volume() -> None:
    spec = search_spec(shared_memory=None)
    settings = OperatorSettings(worker_run_as_user=None)
    pod = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), settings)["spec"]["template"]
    assert "runAsUser" not in pod["spec"]["securityContext"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert [volume["name"] for volume in pod["spec"]["volumes"]] == ["scratch"]


def test_spec_volumes_are_mounted_in_task_and_retrain_pods() -> None:
    spec = search_spec(
        volumes=[DATA_VOLUME],
        volume_mounts=[{"name": "datasets", "mount_path": "/data", "read_only": True}],
    )
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "base-r0-rotate"), SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert DATA_VOLUME in pod["volumes"]
    mount = {"name": "datasets", "mountPath": "/data", "readOnly": True}
    assert mount in pod["containers"][0]["volumeMounts"]
    # the retraining Pretrain inherits the volumes through the search's resources
    pretrain = manifests.retrain_pretrain(SEARCH, spec)
    parsed = PretrainSpec.model_validate(pretrain["spec"])
    body = {**pretrain, "metadata": {**pretrain["metadata"], "uid": "uid-2"}}
    retrain_pod = manifests.pretrain_job(body, parsed, SETTINGS)["spec"]["template"]["spec"]
    assert DATA_VOLUME in retrain_pod["volumes"]
    assert mount in retrain_pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            "volumeMounts[0].name: 'data' is not in volumes (declared: none declared)",
        ),
        ({"volumes": [{"emptyDir": {}}]}, "volumes[0].name: required"),
        ({"volumes": [{"name": "scratch", "emptyDir": {}}]}, "'scratch' is reserved"),
        ({"volumes": [DATA_VOLUME, DATA_VOLUME]}, "volumes[1].name: 'datasets' is declared twice"),
        (
            {
                "volumes": [DATA_VOLUME],
                "volumeMounts": [{"name": "datasets", "mountPath": "/tmp/"}],
            },
            "volumeMounts[0].mountPath: '/tmp/' is used by the worker pod",
        ),
        (
            {
                "volumes": [DATA_VOLUME],
                "volumeMounts": [{"name": "datasets", "mountPath": "data"}],
            },
            "resources.volumeMounts.0.mountPath",
        ),
    ],
)
def test_bad_volumes_are_rejected_naming_the_entry(resources: dict[str, Any], message: str) -> None:
    from selfaugment.trainer.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"resources": resources}, "search.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("search.yaml: resources")


def test_worker_uid_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELFAUGMENT_WORKER_RUN_AS_USER", raising=False)
    assert OperatorSettings.from_env().worker_run_as_user == 10001
    monkeypatch.setenv("SELFAUGMENT_WORKER_RUN_AS_USER", "")
    assert OperatorSettings.from_env().worker_run_as_user is None
    monkeypatch.setenv("SELFAUGMENT_WORKER_RUN_AS_USER", "2000")
    assert OperatorSettings.from_env().worker_run_as_user == 2000
    monkeypatch.setenv("SELFAUGMENT_WORKER_RUN_AS_USER", "root")
    with pytest.raises(ValueError, match="SELFAUGMENT_WORKER_RUN_AS_USER"):
        OperatorSettings.from_env()


def test_jobs_ignore_disruptions_and_fail_at_once_on_bad_input() -> None:
    """podFailurePolicy: DisruptionTarget ignored, EXIT_BAD_INPUT fails the Job, the rest
    counts against backoffLimit; it needs restartPolicy Never."""
    spec = search_spec()
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), SETTINGS)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]},
        },
    ]
    single = PretrainSpec.model_validate({"storage": {"uri": "s3://b"}, "max_retries": 4})
    single_job = manifests.pretrain_job(PRETRAIN, single, SETTINGS)
    assert single_job["spec"]["podFailurePolicy"] == job["spec"]["podFailurePolicy"]
    assert single_job["spec"]["backoffLimit"] == 4


def test_a_multi_node_job_fails_whole_on_any_rank_failure() -> None:
    """All ranks start again together (the operator recreates the Job), so the Job itself
    retries nothing: backoffLimit 0, and any non-zero exit fails it."""
    spec = PretrainSpec.model_validate(
        {"distributed": {"nodes": 2}, "max_retries": 3, "storage": {"uri": "s3://b"}}
    )
    job = manifests.pretrain_job(PRETRAIN, spec, SETTINGS)
    assert job["spec"]["backoffLimit"] == 0
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore"
    assert rules[1]["onExitCodes"]["values"] == [2]  # bad input: final, not restarted
    assert rules[2] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "worker", "operator": "NotIn", "values": [0, 2]},
    }


def test_deadlines_per_stage_from_the_spec_over_the_operator_defaults() -> None:
    settings = OperatorSettings(active_deadlines={**SETTINGS.active_deadlines, "search": 999})
    spec = search_spec(active_deadline_seconds={"folds": 3600})
    fold = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), settings)
    trial = manifests.task_job(SEARCH, spec, task_by_id(spec, "search-f0-r0"), settings)
    merge = manifests.task_job(SEARCH, spec, task_by_id(spec, "merge"), settings)
    assert fold["spec"]["activeDeadlineSeconds"] == 3600
    assert trial["spec"]["activeDeadlineSeconds"] == 999
    assert merge["spec"]["activeDeadlineSeconds"] == OperatorSettings().active_deadlines["merge"]
    retrain = manifests.retrain_pretrain(
        SEARCH, search_spec(active_deadline_seconds={"retrain": 7})
    )
    retrain_spec = PretrainSpec.model_validate(retrain["spec"])
    retrain_body = {**PRETRAIN, "metadata": {**PRETRAIN["metadata"], "name": "cifar-retrain"}}
    retrain_job = manifests.pretrain_job(retrain_body, retrain_spec, settings)
    assert retrain_job["spec"]["activeDeadlineSeconds"] == 7
    standalone = PretrainSpec.model_validate({"storage": {"uri": "s3://b"}})
    standalone_job = manifests.pretrain_job(PRETRAIN, standalone, settings)
    assert standalone_job["spec"]["activeDeadlineSeconds"] == settings.active_deadlines["pretrain"]


def test_deadline_stages_are_checked_by_the_spec() -> None:
    with pytest.raises(ValueError, match="active_deadline_seconds"):
        search_spec(active_deadline_seconds={"fold": 60})
    with pytest.raises(ValueError, match="activeDeadlineSeconds"):
        search_spec(activeDeadlineSeconds={"folds": 0})


def test_quantities_reach_the_job_as_strings() -> None:
    spec = search_spec(cpu=4, memory="16Gi", sharedMemory=2**30)
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "fold-0"), SETTINGS)
    pod = job["spec"]["template"]["spec"]
    requests = pod["containers"][0]["resources"]["requests"]
    assert (requests["cpu"], requests["memory"]) == ("4", "16Gi")
    dshm = next(volume for volume in pod["volumes"] if volume["name"] == "dshm")
    assert dshm["emptyDir"]["sizeLimit"] == str(2**30)


def test_the_retraining_pretrain_spec_is_camel_case() -> None:
    spec = search_spec(nodeSelector={"pool_name": "gpu"}, priorityClass="batch")
    pretrain = manifests.retrain_pretrain(SEARCH, spec)["spec"]
    assert pretrain["searchRef"] == SEARCH["metadata"]["name"] and "maxRetries" in pretrain
    assert pretrain["resources"]["nodeSelector"] == {"pool_name": "gpu"}  # user data as is
    assert pretrain["resources"]["priorityClass"] == "batch"
    assert "batchSize" in pretrain["optim"] and "imageSize" in pretrain["dataset"]
    assert PretrainSpec.model_validate(pretrain).search_ref == SEARCH["metadata"]["name"]


def test_jobs_pods_and_services_carry_the_recommended_labels_and_no_token() -> None:
    spec = search_spec()
    job = manifests.task_job(SEARCH, spec, task_by_id(spec, "search-f0-r0"), SETTINGS)
    expected = {
        "app.kubernetes.io/name": "selfaugment-worker",
        "app.kubernetes.io/instance": "cifar",
        "app.kubernetes.io/component": "search",
        "app.kubernetes.io/part-of": "selfaugment",
        "app.kubernetes.io/managed-by": "selfaugment-operator",
    }
    pod = job["spec"]["template"]
    assert expected.items() <= job["metadata"]["labels"].items()
    assert expected.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["automountServiceAccountToken"] is False
    multi = PretrainSpec.model_validate({"distributed": {"nodes": 2}, "storage": {"uri": "s3://b"}})
    pretrain_job = manifests.pretrain_job(PRETRAIN, multi, SETTINGS)
    service = manifests.pretrain_service(PRETRAIN, multi)
    for labels in (pretrain_job["metadata"]["labels"], service["metadata"]["labels"]):
        assert labels["app.kubernetes.io/instance"] == "hier"
        assert labels["app.kubernetes.io/component"] == "pretrain"
        assert labels["app.kubernetes.io/part-of"] == "selfaugment"
    assert pretrain_job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    retrain_body = {**PRETRAIN, "metadata": {**PRETRAIN["metadata"], "name": "cifar-retrain"}}
    retrain = PretrainSpec.model_validate(manifests.retrain_pretrain(SEARCH, spec)["spec"])
    retrain_labels = manifests.pretrain_job(retrain_body, retrain, SETTINGS)["metadata"]["labels"]
    assert retrain_labels["app.kubernetes.io/instance"] == "cifar-retrain"
    assert retrain_labels["app.kubernetes.io/component"] == "retrain"
    assert retrain_labels[names.LABEL_SEARCH] == "cifar"
