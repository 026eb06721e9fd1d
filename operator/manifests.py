"""Pure builders of the Kubernetes objects the operator creates (tested without a cluster).

Jobs carry deterministic names, ownerReferences to their resource, the app.kubernetes.io/*
labels and labels by search, stage and task. Credentials are referenced
(`valueFrom.secretKeyRef`), never copied; worker pods get no API token.

Every Job has a podFailurePolicy (Kubernetes >= 1.26) and an activeDeadlineSeconds:

- a pod evicted by a node drain, a preemption or a spot reclaim (pod condition
  `DisruptionTarget`) is replaced without counting against backoffLimit;
- a worker that exits with EXIT_BAD_INPUT (2) fails the Job at once: the same input fails
  the same way, so retrying only burns GPU hours;
- any other failure counts against backoffLimit, except in a multi-node Pretrain, where any
  rank's failure fails the whole Job (torchrun's group cannot go on without that rank) and
  the operator starts the Job again, all ranks together (PretrainReconciler);
- activeDeadlineSeconds (per stage) stops a worker that hangs (NCCL, a data loader).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from selfaugment.errors import EXIT_BAD_INPUT
from selfaugment.operator import names
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.pretrain_spec import PretrainSpec
from selfaugment.trainer.search.planner import GPU_KINDS, Task
from selfaugment.trainer.spec import AugmentSearchSpec, ResourcesConfig, StorageConfig

CONTAINER = "worker"
#: The worker's writable directory (HOME, temporary files, the worker cache).
SCRATCH_PATH = "/tmp"
#: With a read-only root filesystem: caches (worker, matplotlib, torch) under HOME on scratch.
SCRATCH_ENV = (
    {"name": "HOME", "value": SCRATCH_PATH},
    {"name": "TMPDIR", "value": SCRATCH_PATH},
    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
)
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def label_value(name: str) -> str:
    """A resource name as a label value (at most 63 characters, deterministic)."""
    return names.dns_name(name)


def app_labels(instance: str, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io/* labels of a worker Job, its pods and Services."""
    return {
        names.LABEL_NAME: names.WORKER_APP,
        names.LABEL_INSTANCE: label_value(instance),
        names.LABEL_COMPONENT: component,
        names.LABEL_PART_OF: names.PART_OF,
        names.LABEL_MANAGED: names.MANAGER,
    }


def pod_failure_policy(group: bool) -> dict[str, Any]:
    """Disruptions ignored, bad input fails the Job; with `group` (a multi-node Job), any
    other non-zero exit fails the Job too, so the operator restarts all ranks together."""
    rules: list[dict[str, Any]] = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                "values": [EXIT_BAD_INPUT],
            },
        },
    ]
    if group:
        rules.append(
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "NotIn",
                    "values": [0, EXIT_BAD_INPUT],
                },
            }
        )
    return {"rules": rules}


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to `body` (controller), so deletion cascades to the child."""
    metadata = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion", names.API_VERSION),
        "kind": body.get("kind", ""),
        "name": metadata.get("name", ""),
        "uid": metadata.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def worker_env(storage: StorageConfig, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Store endpoint and region as values; credentials as references to the Secret.

    An unset `storage.endpoint` / `storage.secretRef` falls back to the operator's defaults
    (SELFAUGMENT_S3_ENDPOINT / SELFAUGMENT_S3_SECRET).
    """
    storage = settings.resolve_storage(storage)
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.secret_ref:
        for key in SECRET_KEYS:
            reference = {"name": storage.secret_ref, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": reference}})
    return env


def container_resources(resources: ResourcesConfig, gpus: int, gpu_resource: str) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": str(resources.cpu), "memory": str(resources.memory)}
    limits: dict[str, Any] = {}
    if gpus > 0:  # extended resources: request == limit
        requests[gpu_resource] = str(gpus)
        limits[gpu_resource] = str(gpus)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def pod_security(settings: OperatorSettings) -> dict[str, Any]:
    """Pod securityContext: non-root (the worker image's user unless the platform assigns
    one), files group-owned by that group, the runtime's default seccomp profile."""
    security: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if settings.worker_run_as_user is not None:
        security["runAsUser"] = settings.worker_run_as_user
        security["runAsGroup"] = settings.worker_run_as_user
        security["fsGroup"] = settings.worker_run_as_user
    return security


def pod_volumes(resources: ResourcesConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the container's mounts: writable scratch on /tmp (the root
    filesystem is read-only), an in-memory /dev/shm, then the spec's own volumes."""
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "scratch", "mountPath": SCRATCH_PATH}]
    if resources.shared_memory:
        memory = {"medium": "Memory", "sizeLimit": str(resources.shared_memory)}
        volumes.append({"name": "dshm", "emptyDir": memory})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes += [dict(volume) for volume in resources.volumes]
    mounts += [mount.manifest() for mount in resources.volume_mounts]
    return volumes, mounts


def pod_template(
    command: list[str],
    env: list[dict[str, Any]],
    resources: ResourcesConfig,
    gpus: int,
    labels: dict[str, str],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """A pod template with scheduling settings from the spec over the operator's defaults
    (image, GPU resource name, nodeSelector entries, tolerations added to the spec's)."""
    volumes, mounts = pod_volumes(resources)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": resources.image or settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": [*env, *SCRATCH_ENV],
        "resources": container_resources(resources, gpus, settings.resolve_gpu_resource(resources)),
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # what podFailurePolicy requires; the Job makes new pods
        "automountServiceAccountToken": False,  # workers never call the Kubernetes API
        "containers": [container],
        "volumes": volumes,
        "securityContext": pod_security(settings),
    }
    node_selector = settings.resolve_node_selector(resources)
    if node_selector:
        spec["nodeSelector"] = node_selector
    tolerations = settings.resolve_tolerations(resources)
    if tolerations:
        spec["tolerations"] = tolerations
    if resources.affinity:
        spec["affinity"] = dict(resources.affinity)
    if resources.priority_class:
        spec["priorityClassName"] = resources.priority_class
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _job(
    name: str,
    namespace: str,
    owner: Mapping[str, Any],
    labels: dict[str, str],
    template: dict[str, Any],
    backoff_limit: int,
    queue: str | None,
    settings: OperatorSettings,
    deadline: int,
    group: bool = False,
) -> dict[str, Any]:
    job_labels = dict(labels)
    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "activeDeadlineSeconds": deadline,
        "podFailurePolicy": pod_failure_policy(group),
        "template": template,
    }
    if queue:  # Kueue admits the Job by unsuspending it
        job_labels[names.KUEUE_QUEUE_LABEL] = queue
        spec["suspend"] = True
    if settings.job_ttl_seconds is not None:
        spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
    }


def search_labels(search: str, stage: str, task_id: str) -> dict[str, str]:
    return {
        **app_labels(search, stage),
        names.LABEL_SEARCH: label_value(search),
        names.LABEL_STAGE: stage,
        names.LABEL_TASK: label_value(task_id),
    }


def task_command(storage_uri: str, task_id: str) -> list[str]:
    return ["selfaugment", "worker", "run", "--store", storage_uri, "--task", task_id]


def task_job(
    search: Mapping[str, Any], spec: AugmentSearchSpec, task: Task, settings: OperatorSettings
) -> dict[str, Any]:
    """The batch/v1 Job that runs one planner task of an AugmentSearch."""
    name = search["metadata"]["name"]
    namespace = search["metadata"]["namespace"]
    if not spec.storage.uri:
        raise ValueError("spec.storage.uri is required to run a search on Kubernetes")
    labels = search_labels(name, task.stage, task.id)
    gpus = spec.resources.gpus if task.kind in GPU_KINDS else 0
    template = pod_template(
        task_command(spec.storage.uri, task.id),
        worker_env(spec.storage, settings),
        spec.resources,
        gpus,
        labels,
        settings,
    )
    return _job(
        names.job_name(name, task.id),
        namespace,
        search,
        labels,
        template,
        spec.parallelism.max_retries,
        spec.resources.queue,
        settings,
        settings.deadline(spec.resources, task.stage),
    )


def retrain_pretrain(search: Mapping[str, Any], spec: AugmentSearchSpec) -> dict[str, Any]:
    """The Pretrain (owned by the search) that retrains the final model with the found policy."""
    name = search["metadata"]["name"]
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {
            "name": names.pretrain_name(name),
            "namespace": search["metadata"]["namespace"],
            "labels": {names.LABEL_MANAGED: names.MANAGER, names.LABEL_SEARCH: label_value(name)},
            "ownerReferences": [owner_reference(search)],
        },
        "spec": {  # by alias: camelCase, as the CRD's schema names the fields
            "searchRef": name,
            "dataset": spec.dataset.model_dump(mode="json", by_alias=True),
            "model": spec.model.model_dump(mode="json", by_alias=True),
            "moco": spec.moco.model_dump(mode="json", by_alias=True),
            "optim": {
                **spec.optim.model_dump(mode="json", by_alias=True),
                "epochs": spec.retrain.epochs,
            },
            "resources": spec.resources.model_dump(mode="json", by_alias=True),
            "maxRetries": spec.parallelism.max_retries,
            "storage": spec.storage.model_dump(mode="json", by_alias=True),
        },
    }


def pretrain_prefix(name: str, spec: PretrainSpec) -> str:
    return spec.prefix or f"pretrains/{name}"


def pretrain_command(name: str, spec: PretrainSpec) -> list[str]:
    """The worker command; wrapped in torchrun when several processes train together."""
    uri = spec.storage.uri or ""
    if spec.search_ref:
        base = task_command(uri, "retrain")
    else:
        base = ["selfaugment", "worker", "pretrain", "--store", uri]
        base += ["--prefix", pretrain_prefix(name, spec)]
    nodes, per_node = spec.distributed.nodes, spec.gpus_per_node()
    if nodes == 1 and per_node == 1:
        return base
    if nodes == 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={per_node}", "--no-python", *base]
    job = names.pretrain_job_name(name)
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={job}-0.{job}",
        f"--master-port={spec.distributed.port}",
        "--no-python",
        *base,
    ]


def pretrain_job(
    pretrain: Mapping[str, Any], spec: PretrainSpec, settings: OperatorSettings
) -> dict[str, Any]:
    """The Job of a Pretrain: one pod, or an indexed Job of `nodes` pods for torchrun."""
    name = pretrain["metadata"]["name"]
    namespace = pretrain["metadata"]["namespace"]
    job = names.pretrain_job_name(name)
    stage = "retrain" if spec.search_ref else "pretrain"
    labels = {**app_labels(name, stage), names.LABEL_PRETRAIN: label_value(name)}
    if spec.search_ref:
        labels.update(search_labels(spec.search_ref, "retrain", "retrain"))
        labels[names.LABEL_INSTANCE] = label_value(name)
    env = worker_env(spec.storage, settings)
    nodes = spec.distributed.nodes
    gpus = spec.resources.gpus and spec.gpus_per_node()
    if nodes > 1:
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        env.append(
            {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": index}}}
        )
    template = pod_template(
        pretrain_command(name, spec), env, spec.resources, gpus, labels, settings
    )
    group = nodes > 1
    manifest = _job(
        job,
        namespace,
        pretrain,
        labels,
        template,
        # A group's retries are the operator's (the whole Job again), counted in status.
        0 if group else spec.max_retries,
        spec.resources.queue,
        settings,
        settings.deadline(spec.resources, stage),
        group=group,
    )
    if group:  # pods reach each other as <job>-<index>.<service>
        template["spec"]["subdomain"] = job
        manifest["spec"].update(
            {"completions": nodes, "parallelism": nodes, "completionMode": "Indexed"}
        )
    return manifest


def pretrain_service(pretrain: Mapping[str, Any], spec: PretrainSpec) -> dict[str, Any]:
    """Headless Service giving the pods of a multi-node Pretrain stable DNS names."""
    name = pretrain["metadata"]["name"]
    job = names.pretrain_job_name(name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job,
            "namespace": pretrain["metadata"]["namespace"],
            "labels": {**app_labels(name, "pretrain"), names.LABEL_PRETRAIN: label_value(name)},
            "ownerReferences": [owner_reference(pretrain)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.LABEL_PRETRAIN: label_value(name)},
            "ports": [{"name": "rendezvous", "port": spec.distributed.port}],
        },
    }
