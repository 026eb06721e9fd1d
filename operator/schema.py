"""Pydantic JSON schema -> the structural OpenAPI v3 subset that Kubernetes CRDs accept.

Kubernetes wants a *structural* schema (apiextensions.k8s.io/v1): no `$ref`, a `type` on every
node, `nullable: true` instead of `anyOf [X, null]`, OpenAPI 3.0 boolean `exclusiveMinimum`,
no `properties` beside `additionalProperties`, no `title`/`const`/`prefixItems`. Unions of
different types (e.g. `list[str] | "all"`) cannot be expressed structurally: such a node keeps
its description and is marked `x-kubernetes-preserve-unknown-fields`; the operator validates it
with the pydantic model and reports the field by name. The one union Kubernetes has a word for,
`int | str` (a quantity such as `cpu: 4` or `cpu: 500m`), becomes `x-kubernetes-int-or-string`.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from selfaugment.errors import SelfAugmentError

#: Keywords copied unchanged from the JSON schema (everything Kubernetes validates itself).
_KEPT = (
    "description",
    "enum",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
)


class SchemaError(SelfAugmentError, ValueError):
    """A model uses a JSON-schema construct that has no structural equivalent."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`, keeping the referring node's own keys (description, default) on top."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    if name not in defs:
        raise SchemaError(f"unresolvable $ref {node['$ref']!r}")
    merged = dict(defs[name])
    merged.update({key: value for key, value in node.items() if key != "$ref"})
    return merged


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:
        return _convert_union(node, defs, path)
    out: dict[str, Any] = {}
    if "const" in node:
        out["enum"] = [node["const"]]
    for key in _KEPT:
        if key in node:
            out[key] = copy.deepcopy(node[key])
    for key in node:  # Kubernetes extensions a model asks for (list-type map on conditions)
        if key.startswith("x-kubernetes-"):
            out[key] = copy.deepcopy(node[key])
    if "format" in out and out["format"] not in ("int32", "int64", "float", "double", "date-time"):
        del out["format"]  # pydantic formats such as 'uri' are not Kubernetes formats
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node:  # JSON schema 2020 (a number) -> OpenAPI 3.0 (a flag beside the bound)
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
            out[key] = True
    kind = node.get("type")
    if kind is None:
        raise SchemaError(f"{path}: no type (and no supported anyOf); cannot make it structural")
    out["type"] = kind
    if kind == "object":
        _convert_object(node, out, defs, path)
    elif kind == "array":
        if "prefixItems" in node:  # fixed-length tuple: all items must share one type
            items = [_convert(item, defs, f"{path}[]") for item in node["prefixItems"]]
            if any(item != items[0] for item in items):
                raise SchemaError(f"{path}: tuples of mixed item types are not structural")
            out["items"] = items[0]
        elif "items" in node:
            out["items"] = _convert(node["items"], defs, f"{path}[]")
        else:
            out["items"] = {"x-kubernetes-preserve-unknown-fields": True}
    if "default" in node and node["default"] is not None:
        out["default"] = copy.deepcopy(node["default"])
    return out


def _convert_object(
    node: dict[str, Any], out: dict[str, Any], defs: dict[str, Any], path: str
) -> None:
    properties = node.get("properties")
    extra = node.get("additionalProperties")
    keys = (node.get("propertyNames") or {}).get("enum")
    if not properties and isinstance(extra, dict) and keys:
        # dict[Literal[...], X]: an object with those keys only, so the API server refuses a
        # misspelt key (structural schemas have no propertyNames).
        properties = {str(key): extra for key in keys}
    if properties:
        out["properties"] = {
            name: _convert(child, defs, f"{path}.{name}") for name, child in properties.items()
        }
        required = [name for name in node.get("required", []) if name in properties]
        if required:
            out["required"] = required
    elif isinstance(extra, dict):
        out["additionalProperties"] = _convert(extra, defs, f"{path}.*")
    else:  # a free-form mapping (dict[str, Any]): keep what the user wrote
        out["x-kubernetes-preserve-unknown-fields"] = True


def _convert_union(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    options = [_resolve(option, defs) for option in node["anyOf"]]
    non_null = [option for option in options if option.get("type") != "null"]
    nullable = len(non_null) < len(options)
    kinds = sorted(str(option.get("type")) for option in non_null)
    if kinds == ["integer", "string"]:  # a quantity: `cpu: 4` or `cpu: 500m`
        out = _int_or_string(node, non_null)
    elif len(non_null) == 1:
        merged = dict(non_null[0])
        merged.update({key: value for key, value in node.items() if key != "anyOf"})
        out = _convert(merged, defs, path)
    else:  # e.g. list[str] | Literal['all']: not structural; validated by the operator
        out = {"x-kubernetes-preserve-unknown-fields": True}
        if "description" in node:
            out["description"] = node["description"]
        if node.get("default") is not None:
            out["default"] = copy.deepcopy(node["default"])
    if nullable:
        out["nullable"] = True
    return out


def _int_or_string(node: dict[str, Any], options: list[dict[str, Any]]) -> dict[str, Any]:
    """`x-kubernetes-int-or-string` (as core/v1 resource quantities), with the string's pattern."""
    out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
    string = next(option for option in options if option.get("type") == "string")
    if "pattern" in string:
        out["pattern"] = string["pattern"]
    if "description" in node:
        out["description"] = node["description"]
    if node.get("default") is not None:
        out["default"] = copy.deepcopy(node["default"])
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The openAPIV3Schema of `model` (by field name, as written in YAML)."""
    schema = model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    return _convert(schema, defs, model.__name__)
