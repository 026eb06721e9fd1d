"""Status helpers and the reconcilers with an in-memory API (no cluster) and a local store."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from selfaugment.operator import names, status
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
