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
from selfaugment.trainer.store import LocalStore


class MemoryKube:
    """The subset of operator.kube.Kube the reconcilers use, over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.created: list[str] = []
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
        self.created.append(body["metadata"]["name"])
        return True

    def patch_status(
        self, api_version: str, plural: str, namespace: str, name: str, value: dict[str, Any]
    ) -> None:
        self.status_patches.append(value)
        obj = self.objects[(plural, namespace, name)]
        obj["status"] = status.merge_patch(obj.get("status") or {}, value)

    def finish(self, name: str, ok: bool = True) -> None:
        job = self.objects[("jobs", "default", name)]
        kind = "Complete" if ok else "Failed"
        job["status"] = {
            "succeeded" if ok else "failed": 1,
            "conditions": [{"type": kind, "status": "True", "reason": "BackoffLimitExceeded"}],
        }


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
