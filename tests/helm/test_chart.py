"""The Helm chart with the real helm binary: lint, template with default and other values,
schema rejections, RBAC, and the copies of the CRDs and the dashboard it carries."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfaugment.operator import names
from selfaugment.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "selfaugment-operator"
RELEASE, NAMESPACE = "sa", "ml-ops"
FULLNAME = f"{RELEASE}-selfaugment-operator"

# Non-default values: namespaced mode, monitors, alerts, scheduling, worker defaults, MinIO.
CUSTOM_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/sa/operator", "tag": "1.2.3"},
    "imagePullSecrets": [{"name": "regcred"}],
    "watch": {"scope": "namespaced", "namespaces": ["team-a", "team-b"]},
    "operator": {"verbose": True, "timerInterval": 12.5},
    "workers": {
        "image": "registry.example.com/sa/worker:1.2.3",
        "imagePullPolicy": "Always",
        "serviceAccount": "sa-worker",
        "gpuResource": "amd.com/gpu",
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "jobTTLSeconds": 3600,
        "runAsUser": None,
        "activeDeadlineSeconds": {"folds": 7200, "retrain": 86400},
    },
    "replicaCount": 2,
    "leaderElection": {"enabled": True, "leaseDurationSeconds": 30},
    "storage": {
        "endpoint": "http://minio.minio.svc:9000",
        "region": "us-east-1",
        "credentialsSecret": "minio-credentials",
    },
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "system", "operator": "Equal", "value": "x", "effect": "NoExecute"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
    "metrics": {
        "port": 9100,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
    },
    "prometheusRule": {"enabled": True, "stallAfterMinutes": 45},
    "rbac": {"userRoles": False},
    "dashboard": {"namespace": "monitoring", "folder": "ML"},
}


def helm() -> str:
    """The helm binary (installed into the venv by .ci/install_tools.py if missing)."""
    tool = REPO / ".ci" / "install_tools.py"
    found = subprocess.run(
        [sys.executable, str(tool), "--which", "helm"], capture_output=True, text=True
    )
    if found.returncode != 0:
        raise RuntimeError(f"cannot install helm with {tool}: {found.stderr}")
    return found.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def render(tmp_path: Path, values: dict[str, Any] | None = None, *extra: str) -> list[dict]:
    """`helm template` of the chart; the parsed documents (CRDs included)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    result = run_helm(*args, *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def container_env(deployment: dict) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_helm_lint_passes_with_default_and_custom_values(tmp_path):
    assert run_helm("lint", "--strict", str(CHART)).returncode == 0
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump(CUSTOM_VALUES))
    result = run_helm("lint", "--strict", str(CHART), "-f", str(custom))
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_render_has_the_expected_objects(tmp_path):
    docs = render(tmp_path)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * 2
        + ["ClusterRole"] * 4  # operator, crd-reader, editor, viewer
        + ["ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding"]  # leader election: one Lease in the release namespace
        + ["ServiceAccount", "Service", "Deployment", "ConfigMap"]
    ), kinds
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
    crd_names = {doc["metadata"]["name"] for doc in by_kind(docs, "CustomResourceDefinition")}
    assert crd_names == {
        f"{names.SEARCH_PLURAL}.{names.GROUP}",
        f"{names.PRETRAIN_PLURAL}.{names.GROUP}",
    }


def test_deployment_is_hardened_and_probed(tmp_path):
    deployment = one(render(tmp_path), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    # Leader election: the new pod stands by until the old one gives the Lease up.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["command"] == ["python", "-m", "selfaugment.operator"]
    assert "args" not in container  # cluster-wide: no --namespace
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "ghcr.io/selfaugment/operator:0.1.0"  # the appVersion
    (port,) = container["ports"]
    # Liveness: what a restart fixes (API, watch); readiness: every check, the store too.
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    env = container_env(deployment)
    assert env["SELFAUGMENT_METRICS_PORT"] == str(port["containerPort"])
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["SELFAUGMENT_LEASE_NAME"] == FULLNAME
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}  # writable scratch


def test_operator_reads_the_settings_the_chart_sets(tmp_path, monkeypatch):
    """The Deployment's env, fed to OperatorSettings.from_env, gives the chart's values."""
    deployment = one(render(tmp_path, CUSTOM_VALUES), "Deployment")
    env = container_env(deployment)
    for key in list(__import__("os").environ):
        if key.startswith("SELFAUGMENT_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    settings = OperatorSettings.from_env()
    workers = CUSTOM_VALUES["workers"]
    assert settings.worker_image == workers["image"]
    assert settings.image_pull_policy == workers["imagePullPolicy"]
    assert settings.service_account == workers["serviceAccount"]
    assert settings.job_ttl_seconds == workers["jobTTLSeconds"]
    assert settings.metrics_port == 9100
    assert settings.timer_interval == 12.5
    # Worker defaults that a resource's spec overrides.
    assert settings.gpu_resource == workers["gpuResource"] == "amd.com/gpu"
    assert settings.worker_node_selector == workers["nodeSelector"]
    assert list(settings.worker_tolerations) == workers["tolerations"]
    assert settings.s3_endpoint == env["AWS_ENDPOINT_URL"] == CUSTOM_VALUES["storage"]["endpoint"]
    assert settings.s3_secret == CUSTOM_VALUES["storage"]["credentialsSecret"]
    assert settings.worker_run_as_user is None  # null: the platform assigns the UID
    assert settings.active_deadlines["folds"] == 7200
    assert settings.active_deadlines["retrain"] == 86400
    assert settings.active_deadlines["merge"] == OperatorSettings().active_deadlines["merge"]
    assert settings.leader_election is True
    assert settings.lease_name == FULLNAME and settings.lease_duration == 30
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # no credentials of its own
        assert key not in env, key


def test_default_values_give_the_operator_defaults(tmp_path, monkeypatch):
    """With the chart's defaults (empty JSON, no store settings) from_env parses cleanly."""
    env = container_env(one(render(tmp_path), "Deployment"))
    for key in list(__import__("os").environ):
        if key.startswith("SELFAUGMENT_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    # The Lease is named after the release, so that two releases never share one.
    assert OperatorSettings.from_env() == dataclasses.replace(
        OperatorSettings(), lease_name=FULLNAME
    )


def test_custom_values_render_namespaced_mode_monitors_and_scheduling(tmp_path):
    docs = render(tmp_path, CUSTOM_VALUES)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example.com/sa/operator:1.2.3"
    assert container["args"] == ["--verbose", "--namespace=team-a", "--namespace=team-b"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == CUSTOM_VALUES["tolerations"]
    assert pod["affinity"] == CUSTOM_VALUES["affinity"]
    assert container["ports"][0]["containerPort"] == 9100

    # Namespaced mode: a Role and RoleBinding per watched namespace, no cluster-wide operator role.
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == FULLNAME]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == FULLNAME]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    cluster_roles = {r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")}
    assert cluster_roles == {f"{FULLNAME}-crd-reader"}  # userRoles off, no operator ClusterRole

    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    pod_monitor = one(docs, "PodMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {
        "SelfAugmentSearchFailed",
        "SelfAugmentSearchStalled",
        "SelfAugmentOperatorDown",
    }
    assert "[45m]" in alerts["SelfAugmentSearchStalled"]["expr"]
    assert "> 2700" in alerts["SelfAugmentSearchStalled"]["expr"]

    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_service_selects_the_operator_pod(tmp_path):
    docs = render(tmp_path)
    service, deployment = one(docs, "Service"), one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PodMonitor")
    assert not by_kind(docs, "PrometheusRule")


# What the operator does (operator/kube.py callers and kopf): (group, resource) -> verbs.
NEEDED = {
    # patch: kopf removes the finalizer of earlier versions; a retry annotates the Pretrain.
    ("selfaugment.io", "augmentsearches"): {"get", "list", "watch", "patch"},
    ("selfaugment.io", "pretrains"): {"get", "list", "watch", "patch", "create"},
    ("selfaugment.io", "augmentsearches/status"): {"patch"},
    ("selfaugment.io", "pretrains/status"): {"patch"},
    # blockOwnerDeletion on children, under OwnerReferencesPermissionEnforcement (OpenShift)
    ("selfaugment.io", "augmentsearches/finalizers"): {"update"},
    ("selfaugment.io", "pretrains/finalizers"): {"update"},
    # delete: a retry, and all ranks of a multi-node Pretrain started again
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "services"): {"get", "create"},
    ("", "events"): {"create"},
    ("", "pods"): {"list"},  # pods of Jobs that cannot start (WorkersHealthy)
}


def granted(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_operator_rbac_is_sufficient_and_least_privilege(tmp_path, scope):
    docs = render(tmp_path, {"watch": {"scope": scope}})
    kind = "ClusterRole" if scope == "cluster" else "Role"
    role = one(docs, kind, FULLNAME)
    rights = granted(role["rules"])
    for key, verbs in NEEDED.items():
        assert verbs <= rights.get(key, set()), (key, rights.get(key))
    for (group, resource), verbs in rights.items():
        assert "*" not in verbs and "*" not in group and "*" not in resource
        assert resource not in ("pods/exec", "pods/log", "configmaps"), resource
        assert resource != "secrets", verbs  # by default, no right on Secrets at all
        if group == "" and resource == "pods":
            assert verbs == NEEDED[(group, resource)], (resource, verbs)
        if group == "selfaugment.io":
            assert "delete" not in verbs  # users delete their resources, not the operator
    reader = one(docs, "ClusterRole", f"{FULLNAME}-crd-reader")
    assert granted(reader["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}
    }
    if scope == "namespaced":
        assert one(docs, "Role", FULLNAME)["metadata"]["namespace"] == NAMESPACE  # release ns
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args == [f"--namespace={NAMESPACE}"]


def test_leader_election_gets_one_lease_in_the_release_namespace(tmp_path):
    """create on leases (it cannot be narrowed by name), get and patch only on the Lease."""
    docs = render(tmp_path)
    role = one(docs, "Role", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [FULLNAME],
            "verbs": ["get", "patch"],
        },
    ]
    binding = one(docs, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["subjects"][0]["name"] == FULLNAME
    off = render(tmp_path, {"leaderElection": {"enabled": False, "leaseDurationSeconds": 15}})
    assert not by_kind(off, "Role")
    deployment = one(off, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container_env(deployment)["SELFAUGMENT_LEADER_ELECTION"] == "false"


def test_two_replicas_need_leader_election(tmp_path):
    docs = render(tmp_path, {"replicaCount": 2})
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    result = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.enabled=false",
    )
    assert result.returncode != 0 and "leaderElection.enabled" in result.stderr


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_secrets_are_readable_only_by_name_and_only_with_get(tmp_path, scope):
    """The operator reads runs' credentials Secrets: `get` (never list or watch) on the names
    storage.credentialsSecret and rbac.secretNames only; every name only with rbac.allSecrets."""
    kind = "ClusterRole" if scope == "cluster" else "Role"

    def secret_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
        docs = render(tmp_path, {"watch": {"scope": scope}, **values})
        rules = one(docs, kind, FULLNAME)["rules"]
        return [rule for rule in rules if "secrets" in rule["resources"]]

    named = secret_rules(
        {"storage": {"credentialsSecret": "minio-credentials"}, "rbac": {"secretNames": ["team"]}}
    )
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["team", "minio-credentials"],
            "verbs": ["get"],
        }
    ]
    assert secret_rules({"storage": {"credentialsSecret": "minio-credentials"}})[0][
        "resourceNames"
    ] == ["minio-credentials"]
    assert secret_rules({}) == []  # no name: no right on Secrets at all (never every name)
    every = secret_rules({"rbac": {"allSecrets": True}})
    assert every == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


def test_editor_and_viewer_roles_for_users(tmp_path):
    docs = render(tmp_path)
    editor = one(docs, "ClusterRole", f"{FULLNAME}-editor")
    viewer = one(docs, "ClusterRole", f"{FULLNAME}-viewer")
    edit_rights, view_rights = granted(editor["rules"]), granted(viewer["rules"])
    for plural in (names.SEARCH_PLURAL, names.PRETRAIN_PLURAL):
        assert {"create", "delete", "patch", "update"} <= edit_rights[(names.GROUP, plural)]
        assert view_rights[(names.GROUP, plural)] == {"get", "list", "watch"}
        assert "patch" not in edit_rights[(names.GROUP, f"{plural}/status")]
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"


BAD_VALUES = [
    ("replicaCount=-1", "replicaCount"),
    ("leaderElection.leaseDurationSeconds=1", "leaderElection.leaseDurationSeconds"),
    ("workers.activeDeadlineSeconds.fold=60", "workers.activeDeadlineSeconds"),
    ("workers.activeDeadlineSeconds.folds=0", "workers.activeDeadlineSeconds.folds"),
    ("watch.scope=everywhere", "watch.scope"),
    ("watch.namespaces={Team_A}", "watch.namespaces"),
    ("image.pullPolicy=Sometimes", "image.pullPolicy"),
    ("workers.gpuResource=gpu", "workers.gpuResource"),
    ("workers.jobTTLSeconds=-5", "workers.jobTTLSeconds"),
    ("workers.tolerations[0].operator=Maybe", "workers.tolerations.0.operator"),
    ("storage.endpoint=minio:9000", "storage.endpoint"),
    ("metrics.port=70000", "metrics.port"),
    ("prometheusRule.stalledFor=ten minutes", "prometheusRule.stalledFor"),
    ("prometheusRule.stallAfterMinutes=0", "prometheusRule.stallAfterMinutes"),
    ("replicas=1", "replicas"),  # a typo of replicaCount: unknown keys are rejected
]


@pytest.mark.parametrize(("setting", "field"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_field(setting, field):
    result = run_helm("template", RELEASE, str(CHART), "--set", setting)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr, result.stderr


def test_service_monitor_without_service_is_refused():
    result = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.service.enabled=false",
    )
    assert result.returncode != 0 and "metrics.service.enabled" in result.stderr


def test_chart_crds_are_the_generated_crds():
    top = {path.name: path.read_bytes() for path in (REPO / "crds").glob("*.yaml")}
    chart = {path.name: path.read_bytes() for path in (CHART / "crds").glob("*.yaml")}
    assert top, "no CRDs in crds/"
    assert chart == top, "helm/selfaugment-operator/crds/ differs from crds/: copy crds/*.yaml"


def test_dashboard_configmap_carries_the_repository_dashboard(tmp_path):
    source = REPO / "dashboards" / "selfaugment.json"
    copy = CHART / "files" / "selfaugment.json"
    assert copy.read_bytes() == source.read_bytes(), (
        "helm/selfaugment-operator/files/selfaugment.json differs: cp dashboards/selfaugment.json"
    )
    config_map = one(render(tmp_path), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["selfaugment.json"]) == json.loads(source.read_text())


def quickstart_commands(source: str) -> list[list[str]]:
    """The shell commands of a quickstart's code blocks, split into words."""
    text = (REPO / source).read_text()
    if source == "README.md":
        text = text.split("## Cluster quickstart", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


@pytest.mark.parametrize("source", ["docs/cluster-quickstart.md", "README.md"])
def test_cluster_quickstart_helm_install_renders_and_uses_the_examples(tmp_path, source):
    commands = quickstart_commands(source)
    installs = [c for c in commands if c[:2] == ["helm", "install"]]
    assert len(installs) == 1, installs
    install = installs[0]
    chart_arg = next(a for a in install[3:] if not a.startswith("-"))
    assert (REPO / chart_arg).resolve() == CHART
    flags = [a for a in install[3:] if a != chart_arg and a != "--create-namespace"]
    result = run_helm("template", install[2], str(CHART), *flags)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    env = container_env(one(docs, "Deployment"))

    applied = [c[-1] for c in commands if c[:2] == ["kubectl", "apply"]]
    assert "examples/augmentsearch.yaml" in applied and "examples/pretrain.yaml" in applied
    search = yaml.safe_load((REPO / "examples" / "augmentsearch.yaml").read_text())
    storage = search["spec"]["storage"]
    secret = storage.get("secretRef") or storage["secret_ref"]
    # The operator's defaults (endpoint, Secret) are the ones the example search uses.
    assert env["AWS_ENDPOINT_URL"] == storage["endpoint"]
    assert env["SELFAUGMENT_S3_SECRET"] == secret
    # The store Secret exists where the example search runs, and only there: the operator
    # has no store credentials of its own (it reads a run's store with the run's Secret).
    secret_namespaces = {
        c[c.index("-n") + 1]
        for c in commands
        if c[:3] == ["kubectl", "create", "secret"] and secret in c and "-n" in c
    }
    release_namespace = next(
        install[i + 1] for i, arg in enumerate(install) if arg in ("-n", "--namespace")
    )
    assert secret_namespaces == {search["metadata"]["namespace"]} != {release_namespace}
    rules = one(docs, "ClusterRole", f"{install[2]}-selfaugment-operator")["rules"]
    secret_rules = [rule for rule in rules if "secrets" in rule["resources"]]
    assert [rule.get("resourceNames") for rule in secret_rules] == [[secret]]
    gets = [c for c in commands if c[:2] == ["kubectl", "get"]]
    assert any(names.SEARCH_PLURAL in c for c in gets)


def test_alert_runbook_links_point_at_sections_of_the_operations_guide(tmp_path):
    rule = one(render(tmp_path, {"prometheusRule": {"enabled": True}}), "PrometheusRule")
    text = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, re.M)
    }
    for alert in rule["spec"]["groups"][0]["rules"]:
        url = alert["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/operations.md"), url
        assert url.split("#")[1] in anchors, url
