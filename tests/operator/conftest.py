"""An emulated cluster for the operator tests: API server, garbage collector, kubelet, S3.

- `ClusterEmulator`: kmock's KubernetesEmulator plus what a real API server and controller
  manager add that the operator relies on: uid/generation/creationTimestamp on objects, a
  generation bump on spec changes, a new resourceVersion on every write and the
  resourceVersion precondition of a patch (409 on a stale one, as leader election needs),
  lists with `kind`, equality label selectors and the `metadata.name` field selector (as
  `kubectl wait` needs), owner-reference garbage collection, and the API server's 422 for a
  Job whose volume names are not RFC 1123 labels.
- `Kubelet`: plays kubelet and Job controller: runs each pod of a Job (one, or `completions`
  of an Indexed Job, with JOB_COMPLETION_INDEX) as a local process with the Job's environment
  (Secret references and `$(VAR)` in the command resolved as a kubelet would; `torchrun
  ... --no-python CMD` runs CMD, one process per pod, without a rendezvous), applies the
  Job's podFailurePolicy (Ignore on DisruptionTarget, FailJob on exit codes, the rest counted
  against backoffLimit), its activeDeadlineSeconds, and patches the Job's status to Complete
  or Failed with the Job controller's reasons and messages. `disrupt()` evicts a pod as a node
  drain would (condition DisruptionTarget).
- `moto`: an S3 server on loopback; `operator_process`: the real operator (`python -m
  selfaugment.operator`) as a subprocess that tests can stop, kill and start again;
  `second_operator`: another replica (leader election); `kubectl`: the real kubectl binary
  against the emulator; `search_manifest`: a tiny AugmentSearch for the fake worker.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import kmock
import pytest
from kmock._internal import enums
from kmock._internal.k8s import KubernetesError, KubernetesObjectConflictError
from pydantic.alias_generators import to_camel

from selfaugment.operator import names
from selfaugment.operator.crdgen import pretrain_crd, search_crd
from selfaugment.operator.kube import Kube, KubeError

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
_versions = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _now() -> str:
    return (
        dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )


@attrs.frozen
class StaleResourceVersion(KubernetesObjectConflictError):
    """409 for a patch whose metadata.resourceVersion is not the object's (optimistic lock)."""

    reason: str = "Conflict"
    message: str = "the object has been modified; please apply your changes to the latest version"


@attrs.frozen
class FailedPatchTest(KubernetesError):
    """422 for a JSON patch whose `test` of metadata.resourceVersion fails, as the API server
    answers (kmock answers 500, which kopf retries for a minute instead of moving on)."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the server rejected our request due to an error in our request (test failed)"


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _job_errors(job: dict[str, Any]) -> list[str]:
    """What the API server's validation of a Job says about fields the operator copies from a
    spec without checking them all (volume names must be RFC 1123 labels): the 422 cases."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    errors = []
    for index, volume in enumerate(pod.get("volumes") or []):
        name = str(volume.get("name", ""))
        if len(name) > 63 or not _DNS_LABEL.match(name):
            errors.append(
                f'spec.template.spec.volumes[{index}].name: Invalid value: "{name}": a lowercase '
                "RFC 1123 label must consist of lower case alphanumeric characters or '-'"
            )
    return errors


def _label_equalities(request: Any) -> dict[str, str] | None:
    """`labelSelector=k=v,k2=v2` as a dict; None for no selector or one with other operators
    (then every object is listed: the operator's client filters again)."""
    selector = (request.params or {}).get("labelSelector") or ""
    if not selector:
        return None
    pairs = [term.split("=", 1) for term in selector.split(",")]
    if any(len(pair) != 2 or pair[0].endswith(("!", "=")) for pair in pairs):
        return None
    return {key: value.lstrip("=") for key, value in pairs}


def _field_name(request: Any) -> str | None:
    """The name a `fieldSelector=metadata.name=NAME` asks for (kubectl wait sends one)."""
    selector = (request.params or {}).get("fieldSelector") or ""
    for term in selector.split(","):
        if term.startswith("metadata.name="):
            return term.split("=", 1)[1]
    return None


class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with uids, generations, resourceVersions, typed lists, field
    selectors by name and owner-reference garbage collection."""

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        name = _field_name(request)
        labels = _label_equalities(request) or {}
        items = [
            i
            for i in payload["items"]
            if (name is None or i["metadata"]["name"] == name)
            and labels.items() <= (i["metadata"].get("labels") or {}).items()
        ]
        resource = request.resource
        kind = next(
            (
                info.kind
                for declared, info in self._resources.items()
                if declared == resource and info.kind
            ),
            None,
        )
        group = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {
            "apiVersion": group,
            "kind": f"{kind or 'Object'}List",
            "metadata": {"resourceVersion": str(next(_versions))},
            "items": items,
        }

    async def _serve_watch(self, request: Any) -> Any:
        """kmock's watch, filtered by name, and resumed after `resourceVersion` as the API
        server does: a watch that names the version of its listing gets no ADDED event for
        objects it has seen (kmock would send every object again on each reconnection)."""
        name = _field_name(request)
        since = (request.params or {}).get("resourceVersion") or ""
        async for event in super()._serve_watch(request):
            meta = isinstance(event, dict) and event.get("object", {}).get("metadata", {})
            if name is not None and meta and meta.get("name") != name:
                continue
            version = str(meta.get("resourceVersion", "")) if meta else ""
            resumed = (
                bool(meta) and event["type"] == "ADDED" and since.isdigit() and version.isdigit()
            )
            if resumed and int(version) <= int(since):
                continue
            yield event

    async def _handle(self, request: Any) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and isinstance(request.data, list):
            key = (request.resource, request.namespace, request.name)
            current = self._objects[key] if key in list(self._objects.keys()) else None
            version = (current or {}).get("metadata", {}).get("resourceVersion")
            for op in request.data:
                tested = op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion"
                if tested and current is not None and op.get("value") != version:
                    raise FailedPatchTest()
        if request.resource is not None and data is not None:
            if request.action == enums.action.CREATE:
                if request.resource.plural == "jobs" and (errors := _job_errors(data)):
                    name = (data.get("metadata") or {}).get("name")
                    message = f'Job.batch "{name}" is invalid: ' + ", ".join(errors)
                    raise KubernetesError(status=422, reason="Invalid", message=message)
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(_versions))
                self.creations().append((str(request.resource.plural), meta.get("name")))
                self.creation_times().append(time.monotonic())
            elif request.action == enums.action.UPDATE:
                key = (request.resource, request.namespace, request.name)
                current = self._objects[key] if key in list(self._objects.keys()) else None
                if current is not None and not current.deleted:
                    meta = data.setdefault("metadata", {})
                    expected = meta.get("resourceVersion")
                    if expected is not None and expected != current.get("metadata", {}).get(
                        "resourceVersion"
                    ):
                        raise StaleResourceVersion()
                    meta["resourceVersion"] = str(next(_versions))
                    if "spec" in data and not request.subresource:
                        generation = current.get("metadata", {}).get("generation", 1)
                        meta["generation"] = generation + 1
        response = await super()._handle(request)
        if request.action in (enums.action.DELETE, enums.action.UPDATE):
            await self._collect_garbage()
        return response

    def creations(self) -> list[tuple[str, str]]:
        """(plural, name) of every create request, in order (to detect duplicates)."""
        if not hasattr(self, "_creations"):
            self._creations: list[tuple[str, str]] = []
        return self._creations

    def creation_times(self) -> list[float]:
        """time.monotonic() of each entry of creations() (benchmarks/bench_operator.py)."""
        if not hasattr(self, "_creation_times"):
            self._creation_times: list[float] = []
        return self._creation_times

    async def _collect_garbage(self) -> None:
        """Delete objects whose owners are all gone, as the garbage collector does."""
        progress = True
        while progress:
            progress = False
            async with self._lock:
                items = [(key, obj) for key, obj in self._objects.items() if not obj.deleted]
                live = {obj.get("metadata", {}).get("uid") for _, obj in items}
                for key, obj in items:
                    meta = obj.get("metadata", {})
                    owners = meta.get("ownerReferences") or []
                    if not owners or any(ref.get("uid") in live for ref in owners):
                        continue
                    if meta.get("finalizers"):
                        if not meta.get("deletionTimestamp"):
                            obj.patch({"metadata": {"deletionTimestamp": _now()}})
                            await self._buses[key[0]].put({"type": "MODIFIED", "object": obj.raw})
                        continue
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
                    progress = True


def _declare(emulator: ClusterEmulator) -> None:
    for crd in (search_crd(), pretrain_crd()):
        spec = crd["spec"]
        emulator.resources[f"{names.GROUP}/{names.VERSION}/{spec['names']['plural']}"] = {
            "kind": spec["names"]["kind"],
            "singular": spec["names"]["singular"],
            "namespaced": True,
            "shortnames": spec["names"]["shortNames"],
            "categories": spec["names"]["categories"],
            "subresources": ["status"],
            "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
        }
    verbs = ["get", "list", "watch", "create", "patch", "update", "delete"]
    for path, kind, namespaced in (
        ("batch/v1/jobs", "Job", True),
        ("v1/services", "Service", True),
        ("v1/secrets", "Secret", True),
        ("v1/pods", "Pod", True),
        ("v1/events", "Event", True),
        ("v1/namespaces", "Namespace", False),
        ("coordination.k8s.io/v1/leases", "Lease", True),
        ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False),
    ):
        emulator.resources[path] = {"kind": kind, "namespaced": namespaced, "verbs": verbs}


class Cluster:
    """The emulated API server running in a background thread with its own event loop."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: test, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: test, user: {token: test-token}}]\n"
            "contexts: [{name: test, context: {cluster: test, user: test, namespace: default}}]\n"
        )
        self.emulator: ClusterEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the Kubernetes emulator did not start")
        self.kube = Kube(_api_client(self.url))

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with ClusterEmulator() as emulator, kmock.Server(emulator, port=self.port):
            _declare(emulator)
            self.emulator = emulator
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- conveniences for tests -------------------------------------------------------------
    def search(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.kube.get(names.API_VERSION, names.SEARCH_PLURAL, namespace, name)

    def pretrain(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.kube.get(names.API_VERSION, names.PRETRAIN_PLURAL, namespace, name)

    def jobs(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.kube.list("batch/v1", "jobs", namespace, {})

    def events(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.kube.list("v1", "events", namespace, {})

    def create_secret(self, name: str, values: dict[str, str], namespace: str = "default") -> None:
        data = {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": data,
        }
        self.kube._call("POST", f"/api/v1/namespaces/{namespace}/secrets", body=body)

    def apply(self, body: dict[str, Any]) -> None:
        namespace = body["metadata"].setdefault("namespace", "default")
        plural = {"AugmentSearch": names.SEARCH_PLURAL, "Pretrain": names.PRETRAIN_PLURAL}[
            body["kind"]
        ]
        path = f"/apis/{names.API_VERSION}/namespaces/{namespace}/{plural}"
        self.kube._call("POST", path, body=body)

    def phase(self, name: str, *phases: str) -> dict[str, Any] | None:
        """The AugmentSearch `name` once its phase is one of `phases`, else None."""
        body = self.search(name)
        status = (body or {}).get("status") or {}
        return body if status.get("phase") in phases else None

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def fake_search(name: str, endpoint: str, **overrides: Any) -> dict[str, Any]:
    """A tiny AugmentSearch (camelCase, as the CRD names its fields); `overrides` replace
    fields per section, named in either spelling (`parallelism={"max_retries": 0}`)."""
    spec: dict[str, Any] = {
        "dataset": {"uri": "sklearn:digits", "imageSize": 16, "limit": 64},
        "model": {"width": 8},
        "moco": {"dim": 16, "queueSize": 64},
        "optim": {"batchSize": 32},
        "evaluation": {"epochs": 1, "batchSize": 32},
        "search": {
            "basePolicy": "RandomResizedCrop",
            "foldEpochs": 1,
            "folds": 2,
            "repeats": 1,
            "trials": 2,
            "topPolicies": 1,
            "startupTrials": 1,
            "scoreBatchSize": 32,
        },
        "retrain": {"epochs": 1},
        "runtime": {"device": "cpu", "progress": False},
        "parallelism": {"maxWorkers": 2, "maxRetries": 1},
        "storage": {
            "uri": f"s3://selfaugment/runs/{name}",
            "endpoint": endpoint,
            "region": "us-east-1",
            "secretRef": "store-credentials",
        },
    }
    for section, values in overrides.items():
        camel = {to_camel(key): value for key, value in values.items()}
        spec[to_camel(section)] = {**spec.get(to_camel(section), {}), **camel}
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def _api_client(url: str) -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    configuration.host = url
    configuration.api_key = {"authorization": "test-token"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return kubernetes.client.ApiClient(configuration)


_VARIABLE = re.compile(r"\$\((\w+)\)")


class _JobGone(Exception):
    """The Job this run belongs to was deleted (or replaced by one of the same name)."""


class _JobRun:
    """The pods of one Job (by uid) as the Job controller and kubelets would run them."""

    def __init__(self, kubelet: Kubelet, job: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.job = job
        self.uid = job["metadata"]["uid"]
        self.name = job["metadata"]["name"]
        self.namespace = job["metadata"]["namespace"]
        spec = job["spec"]
        self.indexed = spec.get("completionMode") == "Indexed"
        self.completions = int(spec.get("completions") or 1)
        self.limit = int(spec.get("backoffLimit", 6))
        self.deadline = spec.get("activeDeadlineSeconds")
        self.rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        self.lock = threading.Lock()
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.disrupted: set[int] = set()
        self.succeeded: set[int] = set()
        self.failed = 0
        self.outcome: dict[str, Any] | None = None  # the Failed condition, once decided

    # -- what the Job controller decides -------------------------------------------------
    def _rule_for_exit(self, code: int) -> tuple[int, dict[str, Any]] | None:
        for index, rule in enumerate(self.rules):
            exits = rule.get("onExitCodes")
            if not exits:
                continue
            values = set(exits.get("values") or [])
            if (exits.get("operator") == "In") == (code in values):
                return index, rule
        return None

    def _rule_for_disruption(self) -> tuple[int, dict[str, Any]] | None:
        for index, rule in enumerate(self.rules):
            types = {c.get("type") for c in rule.get("onPodConditions") or []}
            if "DisruptionTarget" in types:
                return index, rule
        return None

    def _fail(self, reason: str, message: str) -> None:
        """Decide the Job's failure (first decision wins) and stop its other pods."""
        if self.outcome is None:
            self.outcome = {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            }
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()

    def pod_ended(self, index: int, code: int) -> bool:
        """Record one pod's end; whether the index runs another pod."""
        with self.lock:
            if self.outcome is not None:
                return False
            if code == 0:
                self.succeeded.add(index)
                return False
            pod = f"{self.namespace}/{self.name}-{index}"
            if index in self.disrupted:
                self.disrupted.discard(index)
                matched = self._rule_for_disruption()
                if matched is not None and matched[1]["action"] == "Ignore":
                    return True  # not counted: a new pod replaces the evicted one
            else:
                matched = self._rule_for_exit(code)
                if matched is not None and matched[1]["action"] == "FailJob":
                    index_of_rule = matched[0]
                    self.failed += 1
                    self._fail(
                        "PodFailurePolicy",
                        f"Container worker for pod {pod} failed with exit code {code} "
                        f"matching FailJob rule at index {index_of_rule}",
                    )
                    return False
                if matched is not None and matched[1]["action"] == "Ignore":
                    return True
            self.failed += 1
            if self.failed > self.limit:
                self._fail("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return False
            return True

    def check_deadline(self, started: float) -> None:
        if self.deadline is not None and time.monotonic() - started > float(self.deadline):
            with self.lock:
                self._fail("DeadlineExceeded", "Job was active longer than specified deadline")


class Kubelet:
    """Runs the pods of each Job as local processes and reports their outcome."""

    def __init__(self, cluster: Cluster, logs: Path, commands: dict[str, list[str]]) -> None:
        self.cluster = cluster
        self.logs = logs
        self.commands = commands  # executable name -> local command (e.g. the venv's script)
        self.started: dict[str, int] = {}
        self.runs: dict[str, _JobRun] = {}  # by Job uid
        self.extra_env: dict[str, str] = {}
        self.seen_env: dict[str, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in list(self.runs.values()):
            with run.lock:
                for process in run.processes.values():
                    if process.poll() is None:
                        process.kill()

    def running(self, job_name: str, index: int = 0) -> bool:
        """Whether pod `index` of the Job named `job_name` runs now."""
        for run in list(self.runs.values()):
            process = run.processes.get(index)
            if run.name == job_name and process is not None and process.poll() is None:
                return True
        return False

    def disrupt(self, job_name: str, index: int = 0) -> None:
        """Evict a running pod as a node drain does: condition DisruptionTarget, then killed."""
        for run in list(self.runs.values()):
            process = run.processes.get(index)
            if run.name == job_name and process is not None and process.poll() is None:
                with run.lock:
                    run.disrupted.add(index)
                process.kill()
                return
        raise AssertionError(f"no running pod {index} of Job {job_name}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.cluster.jobs()
            except Exception:
                jobs = []
            for job in jobs:
                uid = job["metadata"]["uid"]
                if uid in self.started or job["spec"].get("suspend"):
                    continue
                self.started[uid] = 0
                self.runs[uid] = _JobRun(self, job)
                threading.Thread(target=self._run, args=(self.runs[uid],), daemon=True).start()
            self._stop.wait(0.2)

    def _env(self, container: dict[str, Any], namespace: str) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            # Pods start with a clean filesystem: no worker cache left by earlier test runs.
            "SELFAUGMENT_CACHE": str(self.logs.parent / "pod-cache"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **self.extra_env,
        }
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.cluster.kube.get("v1", "secrets", namespace, ref["name"])
                if secret is None:
                    raise RuntimeError(f"secret {ref['name']} not found")
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def _command(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        """The container command with $(VAR) expanded; torchrun runs what follows --no-python."""
        command = [
            _VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), part)
            for part in container["command"]
        ]
        if command[0] == "torchrun":
            command = command[command.index("--no-python") + 1 :]
        return [*self.commands.get(command[0], [command[0]]), *command[1:]]

    def _patch(self, run: _JobRun, status: dict[str, Any]) -> None:
        """Patch the status of the run's Job; _JobGone once it is deleted or replaced."""
        try:
            job = self.cluster.kube.get("batch/v1", "jobs", run.namespace, run.name)
        except KubeError:
            job = None
        if job is None or job["metadata"]["uid"] != run.uid:
            raise _JobGone()
        try:
            self.cluster.kube.patch_status("batch/v1", "jobs", run.namespace, run.name, status)
        except KubeError:
            # A real kubelet stops reporting on a deleted Job, or when the test's emulated
            # cluster is gone (a pod still running at teardown).
            if self._stop.is_set():
                raise _JobGone() from None
            raise

    def _run(self, run: _JobRun) -> None:
        container = run.job["spec"]["template"]["spec"]["containers"][0]
        started = time.monotonic()
        try:
            self._patch(run, {"active": run.completions, "startTime": _now()})
            pods = [
                threading.Thread(target=self._pod, args=(run, container, index), daemon=True)
                for index in range(run.completions)
            ]
            for pod in pods:
                pod.start()
            while any(pod.is_alive() for pod in pods):
                run.check_deadline(started)
                time.sleep(0.1)
            if run.outcome is not None:
                # Pods stopped by a deadline count as failed, as the Job controller counts them.
                failed = max(run.failed, 1)
                self._patch(run, {"active": 0, "failed": failed, "conditions": [run.outcome]})
                return
            done = {"type": "Complete", "status": "True", "lastTransitionTime": _now()}
            self._patch(
                run,
                {
                    "active": 0,
                    "succeeded": len(run.succeeded),
                    "failed": run.failed,
                    "completionTime": _now(),
                    "conditions": [done],
                },
            )
        except _JobGone:
            run._fail("Deleted", "the Job was deleted")

    def _pod(self, run: _JobRun, container: dict[str, Any], index: int) -> None:
        """One index's pods, one after another until one succeeds or the Job ends."""
        env = self._env(container, run.namespace)
        if run.indexed:  # the Job controller sets it in every pod of an Indexed Job
            env["JOB_COMPLETION_INDEX"] = str(index)
        command = self._command(container, env)
        self.seen_env[run.name if index == 0 else f"{run.name}-{index}"] = env
        while True:
            with open(self.logs / f"{run.name}-{index}.log", "ab") as log:
                with run.lock:
                    if run.outcome is not None:
                        return
                    process = subprocess.Popen(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
                    )
                    run.processes[index] = process
                code = process.wait()
            if not run.pod_ended(index, code):
                return
            try:
                self._patch(run, {"active": run.completions, "failed": run.failed})
            except _JobGone:
                run._fail("Deleted", "the Job was deleted")
                return


class OperatorProcess:
    """The real operator as a subprocess, stoppable and restartable (logs kept in one file)."""

    def __init__(self, cluster: Cluster, workdir: Path, env: dict[str, str]) -> None:
        self.log = workdir / "operator.log"
        self.metrics_port = free_port()
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "KUBECONFIG": str(cluster.kubeconfig),
            "SELFAUGMENT_TIMER_INTERVAL": "2",
            "SELFAUGMENT_METRICS_PORT": str(self.metrics_port),
            "SELFAUGMENT_WORKER_IMAGE": "selfaugment-worker:test",
            # A short Lease: a standby takes over from a killed leader in seconds.
            "SELFAUGMENT_LEASE_DURATION_SECONDS": "4",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "selfaugment.operator", "--verbose"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """A crash (SIGKILL): no clean-up, the Lease is not given up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 server (moto) on loopback with the bucket `selfaugment`."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="operator-key",
        aws_secret_access_key="operator-secret",
    )
    client.create_bucket(Bucket="selfaugment")
    yield endpoint
    server.stop()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    instance = Cluster(tmp_path)
    yield instance
    instance.close()


@pytest.fixture()
def operator_env(s3_endpoint: str) -> dict[str, str]:
    """The operator's own store credentials (different from the Secret the workers get)."""
    return {
        "AWS_ACCESS_KEY_ID": "operator-key",
        "AWS_SECRET_ACCESS_KEY": "operator-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture()
def operator_process(
    cluster: Cluster, tmp_path: Path, operator_env: dict[str, str]
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, tmp_path, operator_env)
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def second_operator(
    cluster: Cluster, tmp_path: Path, operator_env: dict[str, str]
) -> Iterator[OperatorProcess]:
    """Another replica of the operator (its own log and metrics port), for leader election."""
    workdir = tmp_path / "second"
    workdir.mkdir()
    process = OperatorProcess(cluster, workdir, operator_env)
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def kubelet_fake(cluster: Cluster, tmp_path: Path) -> Iterator[Kubelet]:
    """A kubelet that runs `selfaugment` as tests/operator/fake_worker.py (mechanics tests only)."""
    logs = tmp_path / "pods"
    logs.mkdir()
    instance = Kubelet(cluster, logs, {"selfaugment": [sys.executable, str(FAKE_WORKER)]})
    yield instance
    instance.close()


@pytest.fixture()
def kubelet_real(cluster: Cluster, tmp_path: Path) -> Iterator[Kubelet]:
    """A kubelet that runs the real `selfaugment` console script of this environment."""
    logs = tmp_path / "pods"
    logs.mkdir()
    instance = Kubelet(cluster, logs, {"selfaugment": [str(VENV_BIN / "selfaugment")]})
    yield instance
    instance.close()


@pytest.fixture()
def search_manifest() -> Callable[..., dict[str, Any]]:
    """fake_search: a tiny AugmentSearch (digits, 2 folds, 2 trials) for the fake worker."""
    return fake_search


def kubectl_binary() -> str:
    """The real kubectl (`make tools` puts one into the venv)."""
    local = VENV_BIN / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: run `make tools` (or install a kubectl on PATH)"
    return found


@pytest.fixture()
def kubectl(cluster: Cluster) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real kubectl against the emulated API server."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [kubectl_binary(), "--kubeconfig", str(cluster.kubeconfig), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    return run
