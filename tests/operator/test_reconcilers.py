"""Status helpers and the reconcilers with an in-memory API (no cluster) and a local store."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from selfaugment.operator import names, status
from selfaugment.operator import observe as observe_module
from selfaugment.operator.observe import SearchGauges, SearchObservation, job_attempts
from selfaugment.operator.pretrain import PretrainReconciler
from selfaugment.operator.runtime import Deps
from selfaugment.operator.search import SearchReconciler, changed_sections, parse_search_spec
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.metrics import create_metrics
from selfaugment.trainer.search.planner import all_tasks
from selfaugment.trainer.store import LocalStore


class MemoryKube:
    """The subset of operator.kube.Kube the reconcilers use, over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.created: list[str] = []
        self.deleted: list[tuple[str, str]] = []  # (name, propagation)
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.status_patches: list[dict[str, Any]] = []

    def get(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        return self.objects.get((plural, namespace, name))

    def list(
        self, api_version: str, plural: str, namespace: str, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        return [
            obj
            for (kind, ns, _), obj in self.objects.items()
            if kind == plural
            and ns == namespace
            and labels.items() <= obj["metadata"].get("labels", {}).items()
        ]

    def create(self, body: dict[str, Any]) -> bool:
        plural = {"Job": "jobs", "Pretrain": "pretrains", "Service": "services"}[body["kind"]]
        key = (plural, body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self.objects:
            return False
        self.objects[key] = json.loads(json.dumps(body))
        self.objects[key]["metadata"].setdefault("uid", f"uid-{len(self.created)}")
        self.created.append(body["metadata"]["name"])
        return True

    def patch(
        self, api_version: str, plural: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.patches.append((name, body))
        obj = self.objects[(plural, namespace, name)]
        merged = status.merge_patch(obj, body)
        obj.clear()
        obj.update(merged)
        return obj

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        propagation: str = "Background",
    ) -> None:
        self.deleted.append((name, propagation))
        self.objects.pop((plural, namespace, name), None)

    def patch_status(
        self, api_version: str, plural: str, namespace: str, name: str, value: dict[str, Any]
    ) -> None:
        self.status_patches.append(value)
        obj = self.objects[(plural, namespace, name)]
        obj["status"] = status.merge_patch(obj.get("status") or {}, value)

    def finish(
        self,
        name: str,
        ok: bool = True,
        reason: str = "BackoffLimitExceeded",
        message: str = "",
    ) -> None:
        job = self.objects[("jobs", "default", name)]
        kind = "Complete" if ok else "Failed"
        condition = {"type": kind, "status": "True", "reason": reason, "message": message}
        job["status"] = {"succeeded" if ok else "failed": 1, "conditions": [condition]}


def make(tmp_path: Path, **spec: Any) -> tuple[MemoryKube, Deps, list[tuple[str, str]], LocalStore]:
    kube = MemoryKube()
    events: list[tuple[str, str]] = []
    deps = Deps(
        kube,
        OperatorSettings(),
        create_metrics(),
        lambda body, kind, reason, msg: events.append((reason, msg)),
    )  # type: ignore[arg-type]
    body = {
        "apiVersion": names.API_VERSION,
        "kind": names.SEARCH_KIND,
        "metadata": {"name": "s", "namespace": "default", "uid": "u", "generation": 1},
        "spec": {
            "search": {
                "base_policy": "Rotate",
                "folds": 3,
                "repeats": 1,
                "trials": 2,
                "top_policies": 1,
            },
            "parallelism": {"max_workers": 2},
            "storage": {"uri": str(tmp_path / "store")},
            **spec,
        },
    }
    kube.objects[(names.SEARCH_PLURAL, "default", "s")] = body
    return kube, deps, events, LocalStore(tmp_path / "store")


def reconcile(kube: MemoryKube, deps: Deps) -> dict[str, Any]:
    SearchReconciler(kube.objects[(names.SEARCH_PLURAL, "default", "s")], deps).run()
    return kube.objects[(names.SEARCH_PLURAL, "default", "s")]["status"]


def test_search_respects_concurrency_and_never_duplicates(tmp_path: Path) -> None:
    kube, deps, events, store = make(tmp_path)
    first = reconcile(kube, deps)
    assert kube.created == ["s-fold-0", "s-fold-1"]  # max_workers 2 of 3 ready folds
    assert first["phase"] == "Running" and first["stage"] == "folds"
    assert first["progress"] == {
        "done": 0,
        "total": 9,
        "running": 2,
        "percent": 0,
        "trialsDone": 0,
        "trialsTotal": 6,
    }
    assert json.loads((tmp_path / "store" / "spec.json").read_text())["search"]["folds"] == 3
    patches = len(kube.status_patches)
    reconcile(kube, deps)  # nothing changed: no new Job, no status patch
    assert kube.created == ["s-fold-0", "s-fold-1"] and len(kube.status_patches) == patches
    store.write_json("tasks/fold-0/result.json", {"base_policy": "Rotate"})
    kube.finish("s-fold-0")
    again = reconcile(kube, deps)
    assert kube.created[-1] == "s-fold-2" and again["progress"]["done"] == 1
    assert again["progress"]["eta"] is not None and again["basePolicy"] == "Rotate"
    assert ("StageStarted", "stage folds: 0/9 tasks done") in events


def test_failed_job_fails_the_search_naming_the_task(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    reconcile(kube, deps)
    kube.finish("s-fold-1", ok=False)
    result = reconcile(kube, deps)
    assert result["phase"] == "Failed" and result["failedTask"] == "fold-1"
    failed = {c["type"]: c for c in result["conditions"]}["Failed"]
    assert failed["status"] == "True" and "fold-1" in failed["message"]
    assert "BackoffLimitExceeded" in failed["message"]
    assert [reason for reason, _ in events].count("TaskFailed") == 1
    reconcile(kube, deps)  # terminal: no further Jobs, no repeated Event
    assert "s-fold-2" not in kube.created
    assert [reason for reason, _ in events].count("TaskFailed") == 1


def test_succeeded_job_without_result_is_a_failure(tmp_path: Path) -> None:
    kube, deps, _, _ = make(tmp_path)
    reconcile(kube, deps)
    kube.finish("s-fold-0")
    result = reconcile(kube, deps)
    assert result["phase"] == "Failed"
    failed = {c["type"]: c for c in result["conditions"]}["Failed"]
    assert "wrote no tasks/fold-0/result.json" in failed["message"]


def test_invalid_spec_names_the_field(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path, model={"arch": "vgg"})
    result = reconcile(kube, deps)
    assert result["phase"] == "Failed"
    condition = {c["type"]: c for c in result["conditions"]}["SpecValid"]
    assert condition["status"] == "False" and "model.arch" in condition["message"]
    assert events[0][0] == "InvalidSpec" and "model.arch" in events[0][1]
    assert kube.created == []


def test_immutable_change_keeps_the_started_spec(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    reconcile(kube, deps)
    body = kube.objects[(names.SEARCH_PLURAL, "default", "s")]
    body["spec"]["search"]["folds"] = 5
    body["spec"]["parallelism"]["max_workers"] = 3  # mutable: takes effect
    body["metadata"]["generation"] = 2
    result = reconcile(kube, deps)
    condition = {c["type"]: c for c in result["conditions"]}["SpecImmutable"]
    assert condition["status"] == "True" and "spec.search" in condition["message"]
    assert result["progress"]["total"] == 9  # still 3 folds
    assert kube.created == ["s-fold-0", "s-fold-1", "s-fold-2"]
    assert any(reason == "ImmutableFieldChanged" for reason, _ in events)


def test_changed_sections_ignores_mutable_ones() -> None:
    base = {"storage": {"uri": "s3://b"}}
    started = parse_search_spec(base)
    live = parse_search_spec({**base, "resources": {"gpus": 4}, "retrain": {"epochs": 3}})
    assert changed_sections(live, started) == ["retrain"]


def test_pretrain_writes_config_and_reports_result(tmp_path: Path) -> None:
    kube = MemoryKube()
    events: list[str] = []
    deps = Deps(
        kube, OperatorSettings(), create_metrics(), lambda b, k, reason, m: events.append(reason)
    )  # type: ignore[arg-type]
    body = {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {"name": "p", "namespace": "default", "uid": "u", "generation": 1},
        "spec": {
            "trainable": "batchnorm",
            "init_from": "/ckpt.pt",
            "storage": {"uri": str(tmp_path)},
        },
    }
    kube.objects[(names.PRETRAIN_PLURAL, "default", "p")] = body
    PretrainReconciler(body, deps).run()
    config = json.loads((tmp_path / "pretrains/p/config.json").read_text())
    assert config["trainable"] == "batchnorm" and "storage" not in config
    assert kube.created == [names.pretrain_job_name("p")]
    LocalStore(tmp_path).write_json(
        "pretrains/p/result.json", {"rotation_accuracy": 0.75, "loss": 3.0}
    )
    PretrainReconciler(body, deps).run()
    assert body["status"]["phase"] == "Succeeded" and body["status"]["rotationAccuracy"] == 0.75
    assert body["status"]["checkpoint"].endswith("pretrains/p/checkpoint.pt")
    assert events == ["JobCreated", "Succeeded"]


def test_job_state_and_conditions() -> None:
    assert status.job_state({}) == status.JOB_ACTIVE
    assert status.job_state({"spec": {"suspend": True}}) == status.JOB_SUSPENDED
    assert (
        status.job_state({"spec": {"completions": 2}, "status": {"succeeded": 1}})
        == status.JOB_ACTIVE
    )
    assert status.job_state({"status": {"succeeded": 1}}) == status.JOB_SUCCEEDED
    failed = {
        "status": {
            "failed": 3,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        }
    }
    assert status.job_state(failed) == status.JOB_FAILED
    assert status.job_failure(failed) == "BackoffLimitExceeded (3 failed attempts)"
    first = status.set_condition([], "Ready", False, "A", "", 1)
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = status.set_condition(first, "Ready", False, "B", "m", 2)
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["reason"] == "B"
    flipped = status.set_condition(same, "Ready", True, "C", "", 2)
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z" and len(flipped) == 1


def test_merge_patch_and_eta() -> None:
    assert status.merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"a": None, "b": {"c": 5}}) == {
        "b": {"c": 5, "d": 3}
    }
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    eta = status.Eta(start, done=2, total=6)
    now = start + dt.timedelta(seconds=100)
    assert eta.seconds_left(now) == 200.0
    assert eta.at(now) == "2024-01-01T00:05:00Z"
    assert status.Eta(start, 0, 6).at(now) is None


# -- metrics the reconciler feeds (as handlers.reconcile_search does) --------------------------
LABELS = {"namespace": "default", "search": "s"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def observe(kube: MemoryKube, deps: Deps, gauges: SearchGauges) -> SearchReconciler:
    reconciler = SearchReconciler(kube.objects[(names.SEARCH_PLURAL, "default", "s")], deps)
    reconciler.run()
    gauges.record("default", "s", {**reconciler.old, **reconciler.status}, reconciler.observed)
    return reconciler


def sample(deps: Deps, name: str, **labels: str) -> float | None:
    return deps.metrics.registry.get_sample_value(name, {**LABELS, **labels})


def attempts(deps: Deps) -> tuple[float | None, float | None]:
    return (
        sample(deps, "selfaugment_task_failures_total"),
        sample(deps, "selfaugment_task_retries_total"),
    )


def test_failures_and_retries_follow_job_status(tmp_path: Path) -> None:
    kube, deps, _, _ = make(tmp_path)  # max_retries 2: backoffLimit 2
    gauges = SearchGauges(deps.metrics)
    observe(kube, deps, gauges)
    assert attempts(deps) == (0.0, 0.0)  # exported before the first failure
    job = kube.objects[("jobs", "default", "s-fold-1")]
    assert job["spec"]["backoffLimit"] == 2
    job["status"] = {"active": 1, "failed": 1}  # one pod failed, the controller retries it
    observe(kube, deps, gauges)
    assert attempts(deps) == (1.0, 1.0)
    observe(kube, deps, gauges)  # nothing new: no double counting
    assert attempts(deps) == (1.0, 1.0)
    job["status"] = {"active": 1, "failed": 2}
    observe(kube, deps, gauges)
    assert attempts(deps) == (2.0, 2.0)
    kube.finish("s-fold-1", ok=False)
    job["status"]["failed"] = 3  # 1 try + 2 retries, then failed for good
    reconciler = observe(kube, deps, gauges)
    assert reconciler.status["phase"] == "Failed"
    assert attempts(deps) == (3.0, 2.0)
    terminal = observe(kube, deps, gauges)  # terminal: no Jobs looked at, counters kept
    assert terminal.observed is None and attempts(deps) == (3.0, 2.0)


def test_a_recreated_job_counts_afresh(tmp_path: Path) -> None:
    kube, deps, _, _ = make(tmp_path)
    gauges = SearchGauges(deps.metrics)
    observe(kube, deps, gauges)
    job = kube.objects[("jobs", "default", "s-fold-0")]
    job["metadata"]["uid"] = "first"
    job["status"] = {"active": 1, "failed": 2}
    observe(kube, deps, gauges)
    assert attempts(deps) == (2.0, 2.0)
    # Deleted and created again under the same name (new uid): its count starts at 0.
    job["metadata"]["uid"] = "second"
    job["status"] = {"active": 1, "failed": 1}
    observe(kube, deps, gauges)
    assert attempts(deps) == (3.0, 3.0)


def test_job_attempts_from_status() -> None:
    def job(failed: int, limit: int, final: bool) -> dict[str, Any]:
        conditions = [{"type": "Failed", "status": "True"}] if final else []
        return {
            "spec": {"backoffLimit": limit},
            "status": {"failed": failed, "conditions": conditions},
        }

    assert job_attempts({}) == (0, 0)
    assert job_attempts(job(2, 3, final=False)) == (2, 2)
    assert job_attempts(job(4, 3, final=True)) == (4, 3)
    # Failed before the limit (e.g. a podFailurePolicy FailJob rule): the last one is no retry.
    assert job_attempts(job(1, 3, final=True)) == (1, 0)
    # The count is already past the limit but the Failed condition is not set yet.
    assert job_attempts(job(4, 3, final=False)) == (4, 3)


def test_last_progress_is_stamped_when_tasks_or_trials_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(observe_module, "_now", clock)
    kube, deps, _, store = make(tmp_path)
    gauges = SearchGauges(deps.metrics)
    name = "selfaugment_search_last_progress_timestamp_seconds"
    observe(kube, deps, gauges)
    assert sample(deps, name) == 1000.0  # first seen by this operator process
    clock.now = 1100.0
    observe(kube, deps, gauges)
    assert sample(deps, name) == 1000.0  # no task finished: unchanged
    store.write_json("tasks/fold-0/result.json", {"base_policy": "Rotate"})
    kube.finish("s-fold-0")
    observe(kube, deps, gauges)
    assert sample(deps, name) == 1100.0
    clock.now = 1200.0
    progress = {"done": 1, "total": 9, "running": 2, "trialsDone": 0}
    gauges.record("default", "s", {"phase": "Running", "progress": progress})
    assert sample(deps, name) == 1100.0
    gauges.record("default", "s", {"phase": "Running", "progress": {**progress, "trialsDone": 1}})
    assert sample(deps, name) == 1200.0  # a trial finished within a running task


def test_train_epoch_and_loss_of_running_tasks(tmp_path: Path) -> None:
    kube, deps, _, store = make(tmp_path)
    gauges = SearchGauges(deps.metrics)
    assert observe(kube, deps, gauges).observed == SearchObservation([], {})  # no Jobs yet
    store.write_json("tasks/fold-0/progress.json", {"epoch": 3, "epochs": 10, "loss": 5.5})
    store.write_json("tasks/fold-2/progress.json", {"epoch": 1, "loss": 9.0})  # not started
    reconciler = observe(kube, deps, gauges)
    assert reconciler.observed is not None
    assert reconciler.observed.training == {"fold-0": {"epoch": 3.0, "loss": 5.5}}
    assert sample(deps, "selfaugment_train_epoch", task="fold-0") == 3.0
    assert sample(deps, "selfaugment_train_loss", task="fold-0") == 5.5
    assert sample(deps, "selfaugment_train_epoch", task="fold-1") is None  # no progress yet
    assert sample(deps, "selfaugment_train_epoch", task="fold-2") is None  # no Job yet
    store.write_json("tasks/fold-0/progress.json", {"epoch": 4, "epochs": 10, "loss": 5.1})
    store.write_json("tasks/fold-1/progress.json", {"epoch": 0, "epochs": 10})
    observe(kube, deps, gauges)
    assert sample(deps, "selfaugment_train_epoch", task="fold-0") == 4.0
    assert sample(deps, "selfaugment_train_loss", task="fold-0") == 5.1
    assert sample(deps, "selfaugment_train_epoch", task="fold-1") == 0.0
    assert sample(deps, "selfaugment_train_loss", task="fold-1") is None  # no loss before epoch 1
    store.write_json("tasks/fold-0/result.json", {"base_policy": "Rotate"})
    kube.finish("s-fold-0")
    observe(kube, deps, gauges)  # fold-0 done: its series go; fold-2's Job is created
    assert sample(deps, "selfaugment_train_epoch", task="fold-0") is None
    assert sample(deps, "selfaugment_train_loss", task="fold-0") is None
    assert sample(deps, "selfaugment_train_epoch", task="fold-1") == 0.0
    assert sample(deps, "selfaugment_train_epoch", task="fold-2") is None
    observe(kube, deps, gauges)  # fold-2's Job is active now
    assert sample(deps, "selfaugment_train_epoch", task="fold-2") == 1.0


def test_suspended_jobs_have_no_training_series(tmp_path: Path) -> None:
    kube, deps, _, store = make(tmp_path, resources={"queue": "team-a"})
    gauges = SearchGauges(deps.metrics)
    observe(kube, deps, gauges)
    store.write_json("tasks/fold-0/progress.json", {"epoch": 2, "loss": 6.0})
    reconciler = observe(kube, deps, gauges)
    assert reconciler.observed is not None and reconciler.observed.training == {}
    assert sample(deps, "selfaugment_train_epoch", task="fold-0") is None


def test_forget_removes_every_series_of_a_deleted_search(tmp_path: Path) -> None:
    kube, deps, _, store = make(tmp_path)
    gauges = SearchGauges(deps.metrics)
    observe(kube, deps, gauges)
    store.write_json("tasks/fold-0/progress.json", {"epoch": 1, "loss": 7.0})
    kube.objects[("jobs", "default", "s-fold-1")]["status"] = {"active": 1, "failed": 1}
    observe(kube, deps, gauges)
    gauges.record("default", "other", {"phase": "Running", "progress": {"done": 1, "total": 2}})

    def series(search: str) -> set[str]:
        return {
            s.name
            for metric in deps.metrics.registry.collect()
            for s in metric.samples
            if s.labels.get("search") == search
        }

    exported = series("s")
    for name in (
        "selfaugment_search_last_progress_timestamp_seconds",
        "selfaugment_task_failures_total",
        "selfaugment_task_retries_total",
        "selfaugment_train_epoch",
        "selfaugment_train_loss",
        "selfaugment_tasks",
        "selfaugment_search_stage",
    ):
        assert name in exported, name
    assert deps.metrics.registry.get_sample_value("selfaugment_searches", {"phase": "Running"}) == 2
    gauges.forget("default", "s")
    assert series("s") == set()
    assert "selfaugment_search_progress_ratio" in series("other")  # others are untouched
    assert deps.metrics.registry.get_sample_value("selfaugment_searches", {"phase": "Running"}) == 1
    assert not gauges.progress_seen.get(("default", "s"))
    assert ("default", "s") not in gauges.attempts_seen
    # Seen again later (re-created with the same name): counters start from zero.
    observe(kube, deps, gauges)
    assert sample(deps, "selfaugment_task_failures_total") == 1.0


def test_stuck_pods_name_the_pod_its_job_the_reason_and_the_image() -> None:
    def pod(name: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
        state = {"waiting": {"reason": reason, "message": message}}
        return {
            "metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": "s-fold-0"}},
            "spec": {"containers": [{"name": "worker", "image": "reg/worker:typo"}]},
            "status": {"containerStatuses": [{"name": "worker", "state": state}], **extra},
        }

    pods = [
        pod("b", "ErrImagePull", "rpc error: not found"),
        pod("a", "CreateContainerConfigError", 'secret "creds" not found'),
        pod("c", "ContainerCreating", ""),  # starting normally
        pod("d", "ImagePullBackOff", "x", phase="Failed"),  # over
    ]
    stuck = status.stuck_pods(pods)
    lines = [p.line() for p in stuck]
    assert lines == [
        'pod a of Job s-fold-0: CreateContainerConfigError: secret "creds" not found',
        "pod b of Job s-fold-0: ErrImagePull: rpc error: not found (image reg/worker:typo)",
    ]
    # Pull retries (ErrImagePull <-> ImagePullBackOff) are one fault of a pod.
    assert status.reported_faults("; ".join(lines)) == {
        ("a", "CreateContainerConfigError"),
        ("b", "ImagePull"),
    }


def test_the_secret_check_is_skipped_without_the_right_to_get_secrets(tmp_path: Path) -> None:
    from selfaugment.operator.kube import KubeError

    kube, deps, events, _ = make(
        tmp_path, storage={"uri": str(tmp_path / "store"), "secret_ref": "creds"}
    )

    def forbidden(*_: Any) -> None:
        raise KubeError("GET /api/v1/namespaces/default/secrets/creds: 403 Forbidden", 403)

    kube.get_metadata = forbidden  # type: ignore[attr-defined]
    first = reconcile(kube, deps)
    storage = {c["type"]: c for c in first["conditions"]}["StorageReady"]
    assert storage["status"] == "True" and kube.created == ["s-fold-0", "s-fold-1"]
    kube.get_metadata = lambda *_: None  # type: ignore[attr-defined]  # allowed, and missing
    second = reconcile(kube, deps)
    conditions = {c["type"]: c for c in second["conditions"]}
    assert conditions["StorageReady"]["reason"] == "SecretNotFound"
    assert conditions["Progressing"]["reason"] == "SecretNotFound"
    store = str(tmp_path / "store")
    reconcile(kube, deps)  # nothing new: no second Event
    assert [reason for reason, _ in events].count("SecretNotFound") == 1
    kube.get_metadata = lambda *_: {"name": "creds"}  # type: ignore[attr-defined]
    third = reconcile(kube, deps)
    storage = {c["type"]: c for c in third["conditions"]}["StorageReady"]
    assert storage["status"] == "True" and storage["message"] == (
        f"store {store} is reachable; Secret creds exists"
    )
    assert ("StorageReady", storage["message"]) in events


def conditions_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result["conditions"]}


def annotate_retry(kube: MemoryKube, plural: str, name: str, token: str) -> None:
    body = kube.objects[(plural, "default", name)]
    body["metadata"].setdefault("annotations", {})[names.RETRY_ANNOTATION] = token


RULE_MATCH = "Container worker for pod default/{pod} failed with exit code {code} matching FailJob rule at index {index}"


def test_a_deadline_fails_the_search_with_its_own_condition_and_event(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    reconcile(kube, deps)
    kube.objects[("jobs", "default", "s-fold-0")]["spec"]["activeDeadlineSeconds"] = 60
    kube.finish("s-fold-0", ok=False, reason="DeadlineExceeded", message="Job was active longer")
    result = reconcile(kube, deps)
    conditions = conditions_of(result)
    assert result["phase"] == "Failed" and result["failedTask"] == "fold-0"
    failed = conditions["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded"
    assert "deadline of 60 s" in failed["message"] and "fold-0" in failed["message"]
    assert [reason for reason, _ in events].count("DeadlineExceeded") == 1
    # What generic tools wait on: Finished on either outcome, Succeeded says which.
    assert (
        conditions["Finished"]["status"] == "True" and conditions["Finished"]["reason"] == "Failed"
    )
    assert conditions["Succeeded"]["status"] == "False"


def test_bad_input_is_named_and_not_retried(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    reconcile(kube, deps)
    message = RULE_MATCH.format(pod="s-fold-1-abc", code=2, index=1)
    kube.finish("s-fold-1", ok=False, reason="PodFailurePolicy", message=message)
    result = reconcile(kube, deps)
    failed = conditions_of(result)["Failed"]
    assert failed["reason"] == "BadInput" and "exit code 2" in failed["message"]
    assert "kubectl logs job/s-fold-1" in failed["message"]
    assert ("BadInput", failed["message"]) in events


def test_terminal_conditions_while_running(tmp_path: Path) -> None:
    kube, deps, _, _ = make(tmp_path)
    conditions = conditions_of(reconcile(kube, deps))
    assert conditions["Finished"]["status"] == "False"
    assert conditions["Finished"]["reason"] == "InProgress"
    assert conditions["Succeeded"]["status"] == "False"


def test_a_retry_annotation_starts_failed_tasks_again_once_per_value(tmp_path: Path) -> None:
    """A new value of selfaugment.io/retry: the failed Job is deleted and created again, the
    finished tasks stay (their results are in the store); the same value again does nothing."""
    kube, deps, events, store = make(tmp_path)
    reconcile(kube, deps)
    store.write_json("tasks/fold-0/result.json", {"base_policy": "Rotate"})
    kube.finish("s-fold-0")
    kube.finish("s-fold-1", ok=False)
    assert reconcile(kube, deps)["phase"] == "Failed"
    annotate_retry(kube, names.SEARCH_PLURAL, "s", "1")
    retried = reconcile(kube, deps)
    assert kube.deleted == [("s-fold-1", "Background")]
    assert retried["phase"] == "Running" and "failedTask" not in retried
    assert retried["retryToken"] == "1"
    assert conditions_of(retried)["Failed"]["status"] == "False"
    assert conditions_of(retried)["Finished"]["status"] == "False"
    assert any(reason == "Retry" and "fold-1" in message for reason, message in events)
    reconcile(kube, deps)  # the Job's deletion (a watch event) brings the next pass
    assert kube.created.count("s-fold-1") == 2
    assert kube.created.count("s-fold-0") == 1  # finished: never again
    kube.finish("s-fold-1", ok=False)
    assert reconcile(kube, deps)["phase"] == "Failed"
    reconcile(kube, deps)  # the same token: acted on already
    assert len(kube.deleted) == 1 and kube.objects[("jobs", "default", "s-fold-1")]
    annotate_retry(kube, names.SEARCH_PLURAL, "s", "2")
    assert reconcile(kube, deps)["retryToken"] == "2" and len(kube.deleted) == 2


def test_a_retry_of_a_running_search_is_recorded_and_does_nothing(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    reconcile(kube, deps)
    annotate_retry(kube, names.SEARCH_PLURAL, "s", "early")
    result = reconcile(kube, deps)
    assert result["retryToken"] == "early" and result["phase"] == "Running"
    assert kube.deleted == [] and any(reason == "Retry" for reason, _ in events)


def pretrain_deps(tmp_path: Path, **spec: Any) -> tuple[MemoryKube, Deps, list[tuple[str, str]]]:
    kube = MemoryKube()
    events: list[tuple[str, str]] = []
    deps = Deps(
        kube,
        OperatorSettings(),
        create_metrics(),
        lambda b, k, reason, m: events.append((reason, m)),
    )  # type: ignore[arg-type]
    kube.objects[(names.PRETRAIN_PLURAL, "default", "p")] = {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {"name": "p", "namespace": "default", "uid": "u", "generation": 1},
        "spec": {"storage": {"uri": str(tmp_path)}, **spec},
    }
    return kube, deps, events


def run_pretrain(kube: MemoryKube, deps: Deps) -> dict[str, Any]:
    body = kube.objects[(names.PRETRAIN_PLURAL, "default", "p")]
    PretrainReconciler(body, deps).run()
    return dict(body["status"])


def test_a_failed_rank_restarts_all_ranks_counted_once_up_to_max_retries(tmp_path: Path) -> None:
    kube, deps, events = pretrain_deps(tmp_path, distributed={"nodes": 2}, max_retries=1)
    job = names.pretrain_job_name("p")
    run_pretrain(kube, deps)
    first_uid = kube.objects[("jobs", "default", job)]["metadata"]["uid"]
    rank_failed = RULE_MATCH.format(pod=f"{job}-1-x", code=1, index=2)
    kube.finish(job, ok=False, reason="PodFailurePolicy", message=rank_failed)
    restarted = run_pretrain(kube, deps)
    assert restarted["restarts"] == 1 and restarted["restartedJobUid"] == first_uid
    assert restarted["phase"] == "Running"
    assert conditions_of(restarted)["Ready"]["reason"] == "Restarting"
    assert kube.deleted == [(job, "Foreground")]  # its pods go before the name is free
    assert [reason for reason, _ in events].count("RanksRestarted") == 1
    # The API still lists the Job while its pods go (foreground): nothing is counted again.
    kube.objects[("jobs", "default", job)] = {
        "metadata": {"name": job, "uid": first_uid, "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {},
        "status": {"conditions": [{"type": "Failed", "status": "True"}]},
    }
    again = run_pretrain(kube, deps)
    assert again["restarts"] == 1 and len(kube.deleted) == 1
    del kube.objects[("jobs", "default", job)]
    run_pretrain(kube, deps)
    # all ranks again, as one new Job (the headless Service of that name stays)
    assert kube.created.count(job) == 3 and ("jobs", "default", job) in kube.objects
    kube.finish(job, ok=False, reason="PodFailurePolicy", message=rank_failed)
    final = run_pretrain(kube, deps)
    failed = conditions_of(final)["Failed"]
    assert final["phase"] == "Failed" and final["restarts"] == 1
    assert failed["reason"] == "JobFailed" and "after 1 restarts of all ranks" in failed["message"]
    assert conditions_of(final)["Finished"]["status"] == "True"


def test_a_deadline_or_bad_input_is_final_for_a_group_too(tmp_path: Path) -> None:
    kube, deps, events = pretrain_deps(tmp_path, distributed={"nodes": 2}, max_retries=3)
    job = names.pretrain_job_name("p")
    run_pretrain(kube, deps)
    kube.finish(job, ok=False, reason="DeadlineExceeded", message="Job was active longer")
    final = run_pretrain(kube, deps)
    assert final["phase"] == "Failed" and final.get("restarts", 0) == 0
    assert conditions_of(final)["Failed"]["reason"] == "DeadlineExceeded"
    assert (
        kube.deleted == []
        and ("DeadlineExceeded", conditions_of(final)["Failed"]["message"]) in events
    )


def test_a_retry_of_a_failed_pretrain_starts_its_job_again(tmp_path: Path) -> None:
    kube, deps, events = pretrain_deps(tmp_path)
    job = names.pretrain_job_name("p")
    run_pretrain(kube, deps)
    kube.finish(job, ok=False)
    assert run_pretrain(kube, deps)["phase"] == "Failed"
    annotate_retry(kube, names.PRETRAIN_PLURAL, "p", "a")
    retried = run_pretrain(kube, deps)
    assert retried["retryToken"] == "a" and retried["phase"] == "Pending"
    assert kube.deleted == [(job, "Background")]
    run_pretrain(kube, deps)
    assert (
        kube.created.count(job) == 2
        and ("Retry", f"selfaugment.io/retry=a: Job {job} starts again") in events
    )


def test_a_search_fails_when_its_retraining_fails_and_passes_a_retry_on(tmp_path: Path) -> None:
    """The retrain task's outcome is its Pretrain's phase (a group restart is not a failure);
    a retry of the search annotates the failed Pretrain, which starts its Job again."""
    kube, deps, events, store = make(tmp_path)
    body = kube.objects[(names.SEARCH_PLURAL, "default", "s")]
    spec = parse_search_spec(body["spec"])
    for task in all_tasks(spec):
        if task.kind not in ("retrain", "report"):
            store.write_json(f"tasks/{task.id}/result.json", {"base_policy": "Rotate"})
    reconcile(kube, deps)
    pretrain = kube.objects[(names.PRETRAIN_PLURAL, "default", "s-retrain")]
    pretrain["status"] = {"phase": "Running"}
    assert reconcile(kube, deps)["phase"] == "Running"
    pretrain["status"] = {
        "phase": "Failed",
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "late"}
        ],
    }
    failed = reconcile(kube, deps)
    assert failed["phase"] == "Failed" and failed["failedTask"] == "retrain"
    assert conditions_of(failed)["Failed"]["reason"] == "DeadlineExceeded"
    assert "Pretrain s-retrain failed: late" in conditions_of(failed)["Failed"]["message"]
    annotate_retry(kube, names.SEARCH_PLURAL, "s", "7")
    retried = reconcile(kube, deps)
    assert retried["phase"] == "Running"
    assert pretrain["metadata"]["annotations"][names.RETRY_ANNOTATION] == "7"
    assert reconcile(kube, deps)["phase"] == "Running"  # the Pretrain has not acted on it yet
    assert [reason for reason, _ in events].count("DeadlineExceeded") == 1


def test_jobs_held_by_kueue_show_as_queued_until_admitted(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path, resources={"queue": "team-a"})
    held = reconcile(kube, deps)
    queued = conditions_of(held)["Queued"]
    assert queued["status"] == "True" and queued["reason"] == "WaitingForAdmission"
    assert "s-fold-0, s-fold-1" in queued["message"] and "team-a" in queued["message"]
    assert held["phase"] == "Pending"
    reconcile(kube, deps)
    assert [reason for reason, _ in events].count("Queued") == 1  # once, not per reconcile
    for name in ("s-fold-0", "s-fold-1"):  # Kueue admits the Jobs: spec.suspend false
        kube.objects[("jobs", "default", name)]["spec"]["suspend"] = False
    admitted = reconcile(kube, deps)
    assert conditions_of(admitted)["Queued"]["status"] == "False"
    assert conditions_of(admitted)["Queued"]["reason"] == "Admitted"
    plain_kube, plain_deps, _, _ = make(tmp_path / "plain")
    plain = reconcile(plain_kube, plain_deps)
    assert conditions_of(plain)["Queued"] == {**conditions_of(plain)["Queued"], "status": "False"}


def test_a_pretrain_job_held_by_kueue_is_queued(tmp_path: Path) -> None:
    kube, deps, _ = pretrain_deps(tmp_path, resources={"queue": "team-a"})
    held = run_pretrain(kube, deps)
    assert conditions_of(held)["Queued"]["status"] == "True"
    kube.objects[("jobs", "default", names.pretrain_job_name("p"))]["spec"]["suspend"] = False
    assert conditions_of(run_pretrain(kube, deps))["Queued"]["status"] == "False"


class RefusingKube(MemoryKube):
    """The API server refuses Jobs as invalid (422), as for a field it does not accept."""

    def create(self, body: dict[str, Any]) -> bool:
        from selfaugment.operator.kube import KubeError

        if body["kind"] == "Job":
            raise KubeError(
                "POST /apis/batch/v1/namespaces/default/jobs: 422 Unprocessable Entity: Job.batch "
                '"x" is invalid: spec.template.spec.volumes[2].name: Invalid value: "Data"',
                422,
            )
        return super().create(body)


def test_an_invalid_job_fails_the_search_with_a_condition_not_retries(tmp_path: Path) -> None:
    kube, deps, events, _ = make(tmp_path)
    refusing = RefusingKube()
    refusing.objects = kube.objects
    deps = Deps(refusing, deps.settings, deps.metrics, deps.post_event)  # type: ignore[arg-type]
    failed = reconcile(refusing, deps)
    assert failed["phase"] == "Failed" and failed["failedTask"] == "fold-0"
    condition = conditions_of(failed)["Failed"]
    assert condition["reason"] == "InvalidJob" and "volumes[2].name" in condition["message"]
    assert conditions_of(failed)["Finished"]["status"] == "True"
    assert ("InvalidJob", condition["message"]) in events
    reconcile(refusing, deps)  # same generation: nothing is tried again
    assert [reason for reason, _ in events].count("InvalidJob") == 1


def test_an_invalid_pretrain_job_fails_the_pretrain(tmp_path: Path) -> None:
    kube, deps, _ = pretrain_deps(tmp_path)
    refusing = RefusingKube()
    refusing.objects = kube.objects
    deps = Deps(refusing, deps.settings, deps.metrics, deps.post_event)  # type: ignore[arg-type]
    failed = run_pretrain(refusing, deps)
    assert failed["phase"] == "Failed"
    assert conditions_of(failed)["Failed"]["reason"] == "InvalidJob"


def test_the_retraining_pretrain_gets_its_job_in_the_same_reconciliation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """handlers.reconcile_search starts the Job of the retraining Pretrain it created at once,
    without waiting for the watch to deliver the new Pretrain (a slow watch left it to the
    resync: bench_operator measured the retrain Job as the slowest to start). No watch runs
    here: only the handler's own calls can have created that Job."""
    from selfaugment.operator import handlers

    kube, deps, _, store = make(tmp_path)
    monkeypatch.setattr(handlers.RUNTIME, "deps", deps, raising=False)
    monkeypatch.setattr(handlers.RUNTIME, "gauges", SearchGauges(deps.metrics), raising=False)
    monkeypatch.setattr(handlers.RUNTIME, "turns", {}, raising=False)
    body = kube.objects[(names.SEARCH_PLURAL, "default", "s")]
    spec = parse_search_spec(body["spec"])
    for task in all_tasks(spec):
        if task.kind not in ("retrain", "report"):
            store.write_json(f"tasks/{task.id}/result.json", {"base_policy": "Rotate"})
    handlers.reconcile_search(body)
    assert (names.PRETRAIN_PLURAL, "default", "s-retrain") in kube.objects
    job = names.pretrain_job_name("s-retrain")
    assert ("jobs", "default", job) in kube.objects
    assert kube.created.index(job) > kube.created.index("s-retrain")
    handlers.reconcile_search(body)  # later passes create nothing twice
    assert kube.created.count(job) == 1
