"""The Grafana dashboard (dashboards/selfaugment.json): every PromQL expression uses only
metrics (and labels) the project exports, it covers what a long run needs, and it is well formed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfaugment.trainer.metrics import create_metrics, exported_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "selfaugment.json"

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "atan2", "inf", "nan",
}  # fmt: skip
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def exported() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names exactly as /metrics exposes them, and each one's label names."""
    metrics = create_metrics()
    labels: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        names = getattr(value, "_labelnames", None)
        if names is None:
            continue
        value.labels(*["x"] * len(names))  # create a child so that its samples are exposed
        family = value._name
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            labels[family + suffix] = set(names) | ({"le"} if suffix == "_bucket" else set())
    names = exported_names(metrics)
    return names, {name: labels[name] for name in names if name in labels}


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows included) and templating query."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", text, re.S)
            yield f"variable {variable['name']!r}", match.group(1) if match else text


def metric_references(expr: str) -> list[tuple[str, set[str]]]:
    """Metric names in a PromQL expression, each with the label names it is matched on."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($__rate_interval, $search)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    found = []
    pattern = r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*(\{[^}]*\})?(\s*\()?"
    for match in re.finditer(pattern, text):
        name, matchers, call = match.group(1), match.group(2), match.group(3)
        if name and (call or name.lower() in KEYWORDS):
            continue  # a function or a keyword
        if not name and not matchers:
            continue
        # A bare {...} selector yields the name "": never exported, so the test flags it.
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        found.append((name or "", labels))
    return found


def test_metric_references_extracts_names_labels_and_skips_functions():
    expr = (
        'histogram_quantile(0.95, sum by (le, kind) (rate(foo_seconds_bucket{kind=~"a|b",'
        ' search=~"$search"}[$__rate_interval]))) / on (kind) group_left bar_total offset 5m'
        " > bool 3 and time() - baz"
    )
    assert metric_references(expr) == [
        ("foo_seconds_bucket", {"kind", "search"}),
        ("bar_total", set()),
        ("baz", set()),
    ]


def test_every_dashboard_expression_uses_only_exported_metrics_and_labels():
    names, labels = exported()
    assert "selfaugment_task_failures_total" in names  # counters as exposed, with _total
    assert "selfaugment_reconcile_duration_seconds_bucket" in names
    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for where, expr in expressions(dashboard):
        references = metric_references(expr)
        assert references, f"{where}: no metric in {expr!r}"
        for name, matched in references:
            assert name in names, f"{where}: {name!r} is not exported by trainer/metrics.py"
            unknown = matched - labels[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
        checked += 1
    assert checked >= 15


def test_a_dashboard_with_an_unknown_metric_or_label_is_caught():
    names, labels = exported()
    ((name, matched),) = metric_references('sum(selfaugment_searches{search="a"})')
    assert matched - labels[name] == {"search"}  # searches are counted by phase only
    bogus = {
        "panels": [{"title": "x", "targets": [{"refId": "A", "expr": "rate(nope_total[5m])"}]}]
    }
    (_, expr), *_ = expressions(bogus)
    assert [name for name, _ in metric_references(expr) if name not in names] == ["nope_total"]


def test_dashboard_covers_what_a_long_run_needs():
    used = {
        name
        for _, expr in expressions(json.loads(DASHBOARD.read_text()))
        for name, _ in metric_references(expr)
    }
    families = {
        "selfaugment_searches",  # searches by phase
        "selfaugment_search_stage",
        "selfaugment_search_progress_ratio",
        "selfaugment_search_eta_seconds",
        "selfaugment_trials_done",
        "selfaugment_best_objective",
        "selfaugment_train_loss",
        "selfaugment_train_epoch",
        "selfaugment_task_failures_total",
        "selfaugment_task_retries_total",
        "selfaugment_reconcile_errors_total",
        "selfaugment_reconcile_duration_seconds_bucket",
        "selfaugment_search_last_progress_timestamp_seconds",
        "selfaugment_tasks",
    }
    assert families <= used, sorted(families - used)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "SelfAugment"
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    all_panels = panels(dashboard)
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        assert panel.get("title"), panel
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        own = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
               for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not own & cells, f"panel {panel['title']!r} overlaps another"
        cells |= own
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize("name", ["selfaugment_search_progress_ratio", "selfaugment_search_stage"])
def test_search_panels_filter_by_the_dashboard_variables(name):
    dashboard = json.loads(DASHBOARD.read_text())
    for where, expr in expressions(dashboard):
        for metric, matched in metric_references(expr):
            if metric == name and where.startswith("panel"):
                assert {"namespace", "search"} <= matched, where
