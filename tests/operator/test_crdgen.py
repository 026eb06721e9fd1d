"""CRDs: generated from the models without drift, structural, and validating the examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from selfaugment.operator import crdgen
from selfaugment.operator.schema import SchemaError, structural_schema
from selfaugment.trainer.config import ConfigError, StrictModel, parse_config
from selfaugment.trainer.pretrain_spec import PretrainSpec
from selfaugment.trainer.spec import AugmentSearchSpec

REPO = Path(__file__).resolve().parents[2]
CRDS = {"AugmentSearch": crdgen.search_crd(), "Pretrain": crdgen.pretrain_crd()}
MODELS: dict[str, type[StrictModel]] = {
    "AugmentSearch": AugmentSearchSpec,
    "Pretrain": PretrainSpec,
}


def test_checked_in_files_match_the_models() -> None:
    assert crdgen.main(["--root", str(REPO), "--check"]) == 0, "run `make crds`"


def test_check_reports_drift(tmp_path: Path) -> None:
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    stale = tmp_path / "crds" / "augmentsearches.yaml"
    stale.write_text(stale.read_text().replace("minimum: 1", "minimum: 2", 1))
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1


def _walk(node: Any, path: str, found: list[str]) -> None:
    if not isinstance(node, dict):
        return
    for bad in ("$ref", "anyOf", "oneOf", "allOf", "title", "const", "prefixItems", "$defs"):
        if bad in node:
            found.append(f"{path}: {bad}")
    untyped = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
    if "type" not in node and not any(node.get(key) for key in untyped):
        found.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        found.append(f"{path}: properties and additionalProperties")
    if (
        isinstance(node.get("exclusiveMinimum"), int | float)
        and node["exclusiveMinimum"] is not True
    ):
        found.append(f"{path}: numeric exclusiveMinimum")
    for name, child in node.get("properties", {}).items():
        _walk(child, f"{path}.{name}", found)
    for key in ("items", "additionalProperties"):
        _walk(node.get(key), f"{path}.{key}", found)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schemas_are_structural(kind: str) -> None:
    version = CRDS[kind]["spec"]["versions"][0]
    found: list[str] = []
    _walk(version["schema"]["openAPIV3Schema"], kind, found)
    assert found == []
    assert version["subresources"] == {"status": {}}
    columns = {column["name"] for column in version["additionalPrinterColumns"]}
    assert {"Phase", "Age"} <= columns
    names = CRDS[kind]["spec"]["names"]
    assert names["shortNames"] and names["categories"] == ["selfaugment"]


def test_search_printer_columns_answer_how_it_is_going() -> None:
    columns = CRDS["AugmentSearch"]["spec"]["versions"][0]["additionalPrinterColumns"]
    paths = {column["jsonPath"] for column in columns}
    assert {
        ".status.phase",
        ".status.stage",
        ".status.progress.percent",
        ".status.bestObjective",
    } <= paths


def test_conversion_keeps_constraints_and_nullable() -> None:
    schema = structural_schema(AugmentSearchSpec)["properties"]
    folds = schema["search"]["properties"]["folds"]
    assert (folds["type"], folds["minimum"], folds["maximum"], folds["default"]) == (
        "integer",
        1,
        20,
        5,
    )
    momentum = schema["moco"]["properties"]["momentum"]
    assert momentum["maximum"] == 1.0 and momentum["exclusiveMaximum"] is True
    limit = schema["dataset"]["properties"]["limit"]
    assert limit["nullable"] is True and limit["type"] == "integer" and limit["minimum"] == 1
    assert schema["search"]["properties"]["objective"]["enum"][0] == "minimax"
    assert schema["resources"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"]
    crop = schema["augment"]["properties"]["cropScale"]
    assert crop["items"] == {"type": "number"} and crop["minItems"] == crop["maxItems"] == 2


def test_conversion_rejects_what_kubernetes_cannot_express() -> None:
    class Mixed(StrictModel):
        pair: tuple[int, str] = (1, "a")

    with pytest.raises(SchemaError, match="pair"):
        structural_schema(Mixed)


def _json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes) -> JSON schema, strict about unknown fields as kubectl is."""
    if not isinstance(node, dict):
        return node
    out = {key: _json_schema(value) for key, value in node.items()}
    out.pop("x-kubernetes-preserve-unknown-fields", None)
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.pop(flag, False) is True:
            out[flag] = out.pop(bound)
    if out.pop("nullable", False):
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*kinds, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
        out["additionalProperties"] = False
    return out


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    crd = CRDS[manifest["kind"]]
    schema = _json_schema(copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(schema)
    return [
        ".".join(str(part) for part in list(error.absolute_path)[1:]) + f": {error.message}"
        for error in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("path", ["examples/augmentsearch.yaml", "examples/pretrain.yaml"])
def test_examples_pass_schema_and_model(path: str) -> None:
    manifest = yaml.safe_load((REPO / path).read_text())
    assert schema_errors(manifest) == []
    spec = parse_config(MODELS[manifest["kind"]], manifest["spec"], source=path)
    assert spec.storage.uri


BAD = sorted((REPO / "examples" / "bad").glob("*.yaml"))


def test_there_are_bad_examples_for_both_kinds() -> None:
    kinds = {yaml.safe_load(path.read_text())["kind"] for path in BAD}
    assert kinds == {"AugmentSearch", "Pretrain"} and len(BAD) >= 5


@pytest.mark.parametrize("path", BAD, ids=[path.name for path in BAD])
def test_bad_examples_are_rejected_naming_the_field(path: Path) -> None:
    text = path.read_text()
    expected = text.splitlines()[0].removeprefix("# expect:").strip()
    manifest = yaml.safe_load(text)
    messages = schema_errors(manifest)
    try:
        parse_config(MODELS[manifest["kind"]], manifest["spec"], source="spec")
    except ConfigError as error:
        messages.append(str(error))
    assert messages, f"{path.name} was accepted"
    assert any(expected in message for message in messages), messages


def test_reference_docs_cover_every_field() -> None:
    text = (REPO / "docs" / "reference" / "augmentsearch.md").read_text()
    for section in ("search", "resources", "storage", "parallelism"):
        model = AugmentSearchSpec.model_fields[section].annotation
        for name, field in model.model_fields.items():  # type: ignore[union-attr]
            assert f"`spec.{section}.{field.alias or name}`" in text
    for field in (
        "phase",
        "stage",
        "progress.eta",
        "conditions[].reason",
        "bestPolicy.uri",
        "observedGeneration",
    ):
        assert f"`status.{field}`" in text


def _snake_case_properties(node: dict[str, Any], path: str, found: list[str]) -> None:
    for name, child in node.get("properties", {}).items():
        if "_" in name:
            found.append(f"{path}.{name}")
        _snake_case_properties(child, f"{path}.{name}", found)
    if "items" in node:
        _snake_case_properties(node["items"], f"{path}[]", found)


def test_spec_fields_are_camel_case_and_storage_uri_is_required() -> None:
    for kind, crd in CRDS.items():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        found: list[str] = []
        _snake_case_properties(spec, kind, found)
        assert found == []
        assert "storage" in spec["required"]
        storage = spec["properties"]["storage"]
        assert storage["required"] == ["uri"] and storage["properties"]["uri"]["minLength"] == 1
    columns = CRDS["Pretrain"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"name": "Search", "type": "string", "jsonPath": ".spec.searchRef", "priority": 1} in (
        columns
    )


def _search(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "selfaugment.io/v1alpha1",
        "kind": "AugmentSearch",
        "metadata": {"name": "q"},
        "spec": {"storage": {"uri": "s3://b/q"}, **spec},
    }


def test_quantities_are_int_or_string_in_the_schema() -> None:
    resources = structural_schema(AugmentSearchSpec)["properties"]["resources"]["properties"]
    assert resources["cpu"]["x-kubernetes-int-or-string"] is True and "type" not in resources["cpu"]
    assert resources["sharedMemory"]["nullable"] is True
    assert schema_errors(_search({"resources": {"cpu": 4, "memory": "16Gi"}})) == []
    assert schema_errors(_search({"resources": {"cpu": "500m", "sharedMemory": None}})) == []
    assert schema_errors(_search({"dataset": {"memoryBudget": 2**32}})) == []
    assert schema_errors(_search({"resources": {"cpu": "4 cores"}})) != []
    assert schema_errors(_search({"resources": {"cpu": 1.5}})) != []
    assert schema_errors({**_search({}), "spec": {"search": {"folds": 2}}}) != []
