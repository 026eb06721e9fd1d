"""Spec validation: unknown or invalid fields give errors naming the field and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfaugment.trainer.config import ConfigError, load_config, parse_config
from selfaugment.trainer.spec import AugmentSearchSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_examples_are_valid() -> None:
    spec = load_config(AugmentSearchSpec, EXAMPLES / "search-smoke.yaml")
    assert spec.search.folds == 2 and spec.dataset.uri == "sklearn:digits"


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"search": {"fodls": 3}}, "search.yaml")
    assert "search.yaml: search.fodls: unknown field" in str(error.value)


def test_bad_enum_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"search": {"objective": "maxmin"}}, "s.yaml")
    message = str(error.value)
    assert "search.objective" in message and "'minimax'" in message and "'min_rotation'" in message


def test_range_and_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="search.folds"):
        parse_config(AugmentSearchSpec, {"search": {"folds": 0}})
    with pytest.raises(ConfigError, match=r"top_policies \(20\) cannot exceed trials \(10\)"):
        parse_config(AugmentSearchSpec, {"search": {"trials": 10, "top_policies": 20}})
    with pytest.raises(ConfigError, match="randaugment.m values"):
        parse_config(AugmentSearchSpec, {"search": {"randaugment": {"m": [40]}}})
    with pytest.raises(ConfigError, match="augment: .*crop_scale must satisfy"):
        parse_config(AugmentSearchSpec, {"augment": {"crop_scale": [0.9, 0.1]}})


def test_overrides_and_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("search:\n  folds: 3\n")
    spec = load_config(AugmentSearchSpec, path, ["search.trials=7", "search.top_policies=2"])
    assert (spec.search.folds, spec.search.trials, spec.search.top_policies) == (3, 7, 2)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(AugmentSearchSpec, path, ["search.trials"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(AugmentSearchSpec, tmp_path / "missing.yaml")
    path.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(AugmentSearchSpec, path)


def test_dataset_memory_budget_and_storage_size() -> None:
    spec = parse_config(AugmentSearchSpec, {"dataset": {"memory_budget": "512Mi"}})
    assert spec.dataset.memory_budget_bytes == 512 * 2**20
    assert spec.dataset.prepared_size == 256  # max(256, image_size 32)
    big = parse_config(AugmentSearchSpec, {"dataset": {"image_size": 300, "memory_budget": "2G"}})
    assert big.dataset.prepared_size == 300 and big.dataset.memory_budget_bytes == 2 * 10**9
    with pytest.raises(ConfigError, match=r"dataset.memory_budget: '4 GB' is not a quantity"):
        parse_config(AugmentSearchSpec, {"dataset": {"memory_budget": "4 GB"}})
    with pytest.raises(
        ConfigError, match=r"storage_size \(64\) must be at least .*image_size \(96\)"
    ):
        parse_config(AugmentSearchSpec, {"dataset": {"image_size": 96, "storage_size": 64}})


def test_memory_budget_changes_no_result() -> None:
    from selfaugment.trainer.store.layout import spec_digest

    small = parse_config(AugmentSearchSpec, {"dataset": {"memory_budget": "1Mi"}})
    default = parse_config(AugmentSearchSpec, {})
    assert spec_digest(small) == spec_digest(default)
    other = parse_config(AugmentSearchSpec, {"dataset": {"storage_size": 512}})
    assert spec_digest(other) != spec_digest(default)
