"""The chart's alerting rules, rendered by helm, checked and unit-tested with promtool
(Debian package `prometheus`): each alert fires when it should and stays quiet otherwise."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "selfaugment-operator"
RELEASE, NAMESPACE = "sa", "ml-ops"
JOB = f"{RELEASE}-selfaugment-operator-metrics"  # the metrics Service's name: ServiceMonitor job
STALL_MINUTES = 30


def helm() -> str:
    tool = REPO / ".ci" / "install_tools.py"
    found = subprocess.run(
        [sys.executable, str(tool), "--which", "helm"], capture_output=True, text=True
    )
    if found.returncode != 0:
        raise RuntimeError(f"cannot install helm with {tool}: {found.stderr}")
    return found.stdout.strip().splitlines()[-1]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool not found: install the Debian package `prometheus`")
    return path


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    """The `groups` of the rendered PrometheusRule (alerts on, stall window 30 minutes)."""
    result = subprocess.run(
        [
            helm(),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            f"prometheusRule.stallAfterMinutes={STALL_MINUTES}",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {"groups": yaml.safe_load(result.stdout)["spec"]["groups"]}


@pytest.fixture()
def rules_file(rules: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def alert(rules: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)


def expected(rules: dict[str, Any], name: str, **labels: str) -> dict[str, Any]:
    """An exp_alerts entry: the rule's labels plus `labels`, annotations with labels filled in."""
    rule = alert(rules, name)

    def fill(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {key: fill(value) for key, value in rule["annotations"].items()},
    }


def promtool_test(rules_file: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    spec = {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": tests}
    test_file = rules_file.with_name("tests.yaml")
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run(
        [promtool(), "test", "rules", test_file.name],
        capture_output=True,
        text=True,
        cwd=rules_file.parent,
        timeout=60,
    )


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_promtool_check_rules_accepts_the_rendered_rules(rules_file):
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(rules, tmp_path):
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = yaml.safe_load(yaml.safe_dump(rules))
    broken["groups"][0]["rules"][0]["expr"] = "max by (namespace (selfaugment_tasks"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True)
    assert result.returncode != 0


def test_search_failed_fires_only_for_the_failed_search(rules, rules_file):
    labels = {"namespace": "ml", "state": "failed"}
    test = {
        "interval": "1m",
        "input_series": [
            series("selfaugment_tasks", "0 0 1x20", search="broken", **labels),
            series("selfaugment_tasks", "0x22", search="fine", **labels),
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "SelfAugmentSearchFailed", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "SelfAugmentSearchFailed",
                "exp_alerts": [
                    expected(rules, "SelfAugmentSearchFailed", namespace="ml", search="broken")
                ],
            },
        ],
    }
    result = promtool_test(rules_file, [test])
    assert result.returncode == 0, result.stdout + result.stderr


def test_search_stalled_fires_only_for_a_search_without_progress(rules, rules_file):
    """Stuck for an hour: fires. Moving, young, finished, failed, or still scoring trials: not."""
    stuck = "0.1 0.2 0.3x70"  # no change after minute 2
    moving = " ".join(str(round(i / 100, 2)) for i in range(72))
    test = {
        "interval": "1m",
        "input_series": [
            series("selfaugment_search_progress_ratio", stuck, namespace="ml", search="stuck"),
            series("selfaugment_search_progress_ratio", moving, namespace="ml", search="moving"),
            # created at minute 45: quiet for less than the stall window
            series(
                "selfaugment_search_progress_ratio", "_x45 0.1x26", namespace="ml", search="young"
            ),
            series("selfaugment_search_progress_ratio", "1x72", namespace="ml", search="finished"),
            series(
                "selfaugment_search_stage", "1x72", namespace="ml", search="finished", stage="done"
            ),
            series("selfaugment_search_progress_ratio", stuck, namespace="ml", search="failed"),
            series("selfaugment_tasks", "1x72", namespace="ml", search="failed", state="failed"),
            # task progress flat, but TPE trials keep finishing: not stalled
            series("selfaugment_search_progress_ratio", stuck, namespace="ml", search="trials"),
            series("selfaugment_trials_done", "0+1x72", namespace="ml", search="trials"),
            # the local runner's progress timestamp: last progress at t=0
            series(
                "selfaugment_search_last_progress_timestamp_seconds",
                "0x72",
                namespace="local",
                search="run",
            ),
            # ...and a finished local run (no progress since, but done)
            series(
                "selfaugment_search_last_progress_timestamp_seconds",
                "0x72",
                namespace="local",
                search="done-run",
            ),
            series(
                "selfaugment_search_stage",
                "1x72",
                namespace="local",
                search="done-run",
                stage="done",
            ),
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "SelfAugmentSearchStalled", "exp_alerts": []},
            {
                "eval_time": "70m",
                "alertname": "SelfAugmentSearchStalled",
                "exp_alerts": [
                    expected(rules, "SelfAugmentSearchStalled", namespace="ml", search="stuck"),
                    expected(rules, "SelfAugmentSearchStalled", namespace="local", search="run"),
                ],
            },
        ],
    }
    result = promtool_test(rules_file, [test])
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_down_fires_when_scrapes_fail_or_vanish(rules, rules_file):
    down_alert = "SelfAugmentOperatorDown"
    target = {"job": JOB, "namespace": NAMESPACE}
    scraped_then_down = {
        "interval": "1m",
        "input_series": [series("up", "1x10 0x20", instance="10.0.0.5:8080", **target)],
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": down_alert, "exp_alerts": []},
            {
                "eval_time": "25m",
                "alertname": down_alert,
                "exp_alerts": [expected(rules, down_alert, **target)],
            },
        ],
    }
    never_scraped = {
        "interval": "1m",
        "input_series": [series("up", "1x30", job="other", namespace=NAMESPACE)],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": down_alert,
                "exp_alerts": [expected(rules, down_alert, **target)],
            }
        ],
    }
    result = promtool_test(rules_file, [scraped_then_down, never_scraped])
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_down_with_two_replicas_fires_only_when_both_are_down(rules, rules_file):
    """replicaCount 2 with leader election: one replica down (its pod crash-looping, or
    drained) leaves the other to take the lease, so no page; both down pages once, per
    (job, namespace), not per replica."""
    down_alert = "SelfAugmentOperatorDown"
    target = {"job": JOB, "namespace": NAMESPACE}
    one_of_two_down = {
        "interval": "1m",
        "input_series": [
            series("up", "1x5 0x40", instance="10.0.0.5:8080", pod="op-a", **target),
            series("up", "1x45", instance="10.0.0.6:8080", pod="op-b", **target),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": down_alert, "exp_alerts": []},
        ],
    }
    both_down = {
        "interval": "1m",
        "input_series": [
            series("up", "1x5 0x40", instance="10.0.0.5:8080", pod="op-a", **target),
            series("up", "1x20 0x25", instance="10.0.0.6:8080", pod="op-b", **target),
        ],
        "alert_rule_test": [
            # the second replica went down at 21m: not yet for 5m
            {"eval_time": "24m", "alertname": down_alert, "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": down_alert,
                "exp_alerts": [expected(rules, down_alert, **target)],
            },
        ],
    }
    back_up = {
        "interval": "1m",
        "input_series": [
            series("up", "0x45", instance="10.0.0.5:8080", pod="op-a", **target),
            series("up", "0x20 1x25", instance="10.0.0.6:8080", pod="op-b", **target),
        ],
        "alert_rule_test": [
            {
                "eval_time": "15m",
                "alertname": down_alert,
                "exp_alerts": [expected(rules, down_alert, **target)],
            },
            {"eval_time": "30m", "alertname": down_alert, "exp_alerts": []},
        ],
    }
    result = promtool_test(rules_file, [one_of_two_down, both_down, back_up])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_old_per_target_rule_would_page_for_one_replica(rules, rules_file):
    """The test above can fail: a per-target rule (`up == 0`, as before leader election)
    fires for one of two replicas, and promtool says so."""
    rule = alert(rules, "SelfAugmentOperatorDown")
    per_target = {**rules}
    per_target["groups"] = [
        {
            **group,
            "rules": [
                {**r, "expr": r["expr"].replace("max by (job, namespace) (", "(")}
                if r is rule
                else r
                for r in group["rules"]
            ],
        }
        for group in rules["groups"]
    ]
    rules_file.write_text(yaml.safe_dump(per_target, sort_keys=False))
    target = {"job": JOB, "namespace": NAMESPACE}
    test = {
        "interval": "1m",
        "input_series": [
            series("up", "1x5 0x40", instance="10.0.0.5:8080", pod="op-a", **target),
            series("up", "1x45", instance="10.0.0.6:8080", pod="op-b", **target),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "SelfAugmentOperatorDown", "exp_alerts": []}
        ],
    }
    result = promtool_test(rules_file, [test])
    assert result.returncode != 0 and "SelfAugmentOperatorDown" in result.stdout + result.stderr


def test_a_wrong_expectation_fails_promtool(rules, rules_file):
    """The unit tests above can fail: expecting no alert for a failed search is refused."""
    test = {
        "interval": "1m",
        "input_series": [
            series("selfaugment_tasks", "1x20", namespace="ml", search="broken", state="failed")
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "SelfAugmentSearchFailed", "exp_alerts": []}
        ],
    }
    result = promtool_test(rules_file, [test])
    assert result.returncode != 0
