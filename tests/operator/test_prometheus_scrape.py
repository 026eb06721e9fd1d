"""A real Prometheus (Debian package `prometheus`) scrapes the real operator's /metrics while
the example search (examples/augmentsearch.yaml, shrunk for the fake worker) runs on the
emulated cluster; its HTTP API then has the expected series, the chart's alerting rules load
and evaluate cleanly, and every dashboard query runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "selfaugment-operator"
RELEASE, OPERATOR_NAMESPACE = "selfaugment", "selfaugment-system"  # as in the quickstart
JOB = f"{RELEASE}-selfaugment-operator-metrics"  # the ServiceMonitor's job label
SEARCH = "cifar10-selfaugment"

pytestmark = pytest.mark.cluster


def _tool(name: str) -> str:
    tool = REPO / ".ci" / "install_tools.py"
    found = subprocess.run(
        [sys.executable, str(tool), "--which", name], capture_output=True, text=True
    )
    if found.returncode != 0:
        raise RuntimeError(f"cannot install {name} with {tool}: {found.stderr}")
    return found.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chart_rules(path: Path) -> Path:
    """The chart's alerting rules, rendered as the quickstart's release would get them."""
    result = subprocess.run(
        [
            _tool("helm"),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    groups = yaml.safe_load(result.stdout)["spec"]["groups"]
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


class Prometheus:
    """A Prometheus server scraping one target every second, with an HTTP API client."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: install the Debian package `prometheus`")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(chart_rules(workdir / "rules.yaml"))],
            "scrape_configs": [
                {
                    # What the chart's ServiceMonitor yields: job = the metrics Service,
                    # namespace = the operator's, and the series' own labels honoured.
                    "job_name": JOB,
                    "honor_labels": True,
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{target_port}"],
                            "labels": {"namespace": OPERATOR_NAMESPACE},
                        }
                    ],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture()
def prometheus(operator_process: Any, tmp_path: Path) -> Iterator[Prometheus]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = Prometheus(workdir, operator_process.metrics_port)
    yield server
    server.stop()


def example_search(endpoint: str) -> dict[str, Any]:
    """examples/augmentsearch.yaml with a test-sized search and the local S3 endpoint."""
    body = yaml.safe_load((REPO / "examples" / "augmentsearch.yaml").read_text())
    body["spec"]["search"].update(
        basePolicy="RandomResizedCrop",
        folds=2,
        repeats=1,
        trials=2,
        topPolicies=1,
        startupTrials=1,
    )
    body["spec"]["storage"]["endpoint"] = endpoint
    return body


def kubectl_apply(cluster: Any, manifest: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    result = subprocess.run(
        [_tool("kubectl"), "apply", "--validate=false", "-f", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "dashboards" / "selfaugment.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in (("$__rate_interval", "1m"), ("$namespace", ".*")):
                expr = expr.replace(variable, value)
            out.append((panel["title"], expr.replace("$search", ".*")))
    return out


def test_prometheus_scrapes_the_operator_during_a_search(
    cluster, operator_process, kubelet_fake, s3_endpoint, prometheus, tmp_path
):
    search = example_search(s3_endpoint)
    cluster.create_secret(search["spec"]["storage"]["secretRef"], {
        "AWS_ACCESS_KEY_ID": "worker-key", "AWS_SECRET_ACCESS_KEY": "worker-secret",
    })  # fmt: skip
    kubelet_fake.extra_env["FAKE_SLEEP"] = "2"  # long enough to scrape running tasks' epochs
    manifest = tmp_path / "augmentsearch.yaml"
    manifest.write_text(yaml.safe_dump(search))
    kubectl_apply(cluster, manifest)
    labels = f'namespace="default", search="{SEARCH}"'

    # While it runs: the target is up and the search's progress is scraped.
    cluster.wait_for(
        "the operator's target up",
        lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1,
        30,
    )
    body = cluster.wait_for(
        "the search to finish",
        lambda: (
            (s := cluster.search(SEARCH))
            and (s.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and s
        ),
        150,
    )
    assert body["status"]["phase"] == "Succeeded", body["status"]

    # After the last scrape: final values of the search's series.
    cluster.wait_for(
        "progress 1 in Prometheus",
        lambda: prometheus.value(f"selfaugment_search_progress_ratio{{{labels}}}") == 1.0,
        30,
    )
    assert prometheus.value(f'selfaugment_search_stage{{{labels}, stage="done"}}') == 1
    assert prometheus.value(f'selfaugment_search_stage{{{labels}, stage="search"}}') == 0
    assert prometheus.value('selfaugment_searches{phase="Succeeded"}') == 1
    assert prometheus.value(f'selfaugment_tasks{{{labels}, state="succeeded"}}') == 7
    assert prometheus.value(f"selfaugment_trials_done{{{labels}}}") > 0
    best = prometheus.value(f"selfaugment_best_objective{{{labels}}}")
    assert best == pytest.approx(body["status"]["bestObjective"])
    # Job-derived series: counters exported (no failure here), last progress stamped.
    assert prometheus.value(f"selfaugment_task_failures_total{{{labels}}}") == 0
    assert prometheus.value(f"selfaugment_task_retries_total{{{labels}}}") == 0
    stamped = prometheus.value(f"selfaugment_search_last_progress_timestamp_seconds{{{labels}}}")
    assert stamped is not None and time.time() - 300 < stamped <= time.time()
    # Running tasks had epoch/loss series while they ran, and none are left now.
    trained = prometheus.query(f"max_over_time(selfaugment_train_epoch{{{labels}}}[10m])")
    assert trained, "no selfaugment_train_epoch series scraped while tasks ran"
    assert {series["metric"]["task"] for series in trained} <= {
        "fold-0", "fold-1", "search-f0-r0", "search-f1-r0", "merge", "retrain", "report",
    }  # fmt: skip
    assert prometheus.query(f"selfaugment_train_loss{{{labels}}}") == []
    reconciles = prometheus.value(
        'sum(selfaugment_reconcile_duration_seconds_count{kind="AugmentSearch"})'
    )
    assert reconciles is not None and reconciles >= 3

    # Scraped while running: some sample lies strictly between 0 and 1.
    history = prometheus.query(f"selfaugment_search_progress_ratio{{{labels}}}[10m]")
    values = [float(value) for _, value in history[0]["values"]]
    assert any(0 < value < 1 for value in values), values
    assert values == sorted(values)  # progress never goes back

    # The operator's own namespace label did not overwrite the search's (honor_labels).
    assert not prometheus.query("{exported_namespace!=''}")

    # The chart's alert rules load and evaluate without errors, and none fires.
    groups = prometheus.api("rules", type="alert")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {
        "SelfAugmentSearchFailed",
        "SelfAugmentSearchStalled",
        "SelfAugmentOperatorDown",
    }
    cluster.wait_for(
        "the rules evaluated",
        lambda: all(
            rule.get("lastEvaluation", "0001").startswith("20")
            for group in prometheus.api("rules", type="alert")["groups"]
            for rule in group["rules"]
        ),
        15,
    )
    for group in prometheus.api("rules", type="alert")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
            assert rule["state"] == "inactive", rule

    # Every dashboard query runs; those of metrics the operator sets return series.
    for title, expr in dashboard_queries():
        result = prometheus.query(expr)  # raises on a PromQL error
        if title in ("Searches by phase", "Progress", "Stage per search", "Tasks by state",
                     "Trials done", "Best objective", "Reconcile latency",
                     "Time since last progress", "Task failures and retries"):  # fmt: skip
            assert result, f"dashboard panel {title!r}: no series for {expr}"
