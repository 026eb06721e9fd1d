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
    with pytest.raises(ConfigError, match=r"topPolicies \(20\) cannot exceed trials \(10\)"):
        parse_config(AugmentSearchSpec, {"search": {"trials": 10, "topPolicies": 20}})
    with pytest.raises(ConfigError, match="randaugment.m values"):
        parse_config(AugmentSearchSpec, {"search": {"randaugment": {"m": [40]}}})
    with pytest.raises(ConfigError, match="augment: .*cropScale must satisfy"):
        parse_config(AugmentSearchSpec, {"augment": {"cropScale": [0.9, 0.1]}})


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
    with pytest.raises(ConfigError, match=r"dataset.memoryBudget: '4 GB' is not a quantity"):
        parse_config(AugmentSearchSpec, {"dataset": {"memoryBudget": "4 GB"}})
    with pytest.raises(ConfigError, match=r"dataset.memoryBudget: 0 must be at least one byte"):
        parse_config(AugmentSearchSpec, {"dataset": {"memoryBudget": 0}})
    assert (
        parse_config(
            AugmentSearchSpec, {"dataset": {"memoryBudget": 2**30}}
        ).dataset.memory_budget_bytes
        == 2**30
    )
    with pytest.raises(
        ConfigError, match=r"storageSize \(64\) must be at least .*imageSize \(96\)"
    ):
        parse_config(AugmentSearchSpec, {"dataset": {"image_size": 96, "storage_size": 64}})


def test_memory_budget_changes_no_result() -> None:
    from selfaugment.trainer.store.layout import spec_digest

    small = parse_config(AugmentSearchSpec, {"dataset": {"memory_budget": "1Mi"}})
    default = parse_config(AugmentSearchSpec, {})
    assert spec_digest(small) == spec_digest(default)
    other = parse_config(AugmentSearchSpec, {"dataset": {"storage_size": 512}})
    assert spec_digest(other) != spec_digest(default)


def test_camel_case_is_the_spelling_and_snake_case_still_loads(tmp_path: Path) -> None:
    """Manifests and examples are camelCase; a config file written with the Python names
    (snake_case) loads to the same spec, with the same digest, so old files and runs work."""
    from selfaugment.trainer.store.layout import spec_digest

    camel = {
        "dataset": {"imageSize": 16, "onCorrupt": "fail"},
        "search": {"baseEpochs": 3, "baseSelection": {"minEpochs": 2}, "topPolicies": 1},
        "resources": {"nodeSelector": {"gpu_type": "a100"}, "activeDeadlineSeconds": {"base": 9}},
        "storage": {"secretRef": "creds"},
    }
    snake = {
        "dataset": {"image_size": 16, "on_corrupt": "fail"},
        "search": {"base_epochs": 3, "base_selection": {"min_epochs": 2}, "top_policies": 1},
        "resources": {
            "node_selector": {"gpu_type": "a100"},
            "active_deadline_seconds": {"base": 9},
        },
        "storage": {"secret_ref": "creds"},
    }
    one, two = parse_config(AugmentSearchSpec, camel), parse_config(AugmentSearchSpec, snake)
    assert one == two and spec_digest(one) == spec_digest(two)
    assert one.search.base_selection.min_epochs == 2
    assert one.resources.node_selector == {"gpu_type": "a100"}  # user data keys unchanged
    dumped = one.model_dump(mode="json", by_alias=True)
    assert dumped["search"]["baseEpochs"] == 3 and dumped["storage"]["secretRef"] == "creds"
    assert dumped["resources"]["nodeSelector"] == {"gpu_type": "a100"}
    assert "base_epochs" in one.model_dump(mode="json")["search"]  # the store's spelling
    path = tmp_path / "old.yaml"
    path.write_text("search:\n  base_epochs: 4\n  fold_epochs: 2\n")
    assert load_config(AugmentSearchSpec, path).search.base_epochs == 4


def test_errors_name_the_field_as_written() -> None:
    for written in ("topPolicies", "top_policies"):
        with pytest.raises(ConfigError) as error:
            parse_config(AugmentSearchSpec, {"search": {written: "many"}}, "s.yaml")
        assert f"s.yaml: search.{written}: " in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"search": {"baseEpochs": 3, "base_epochs": 4}}, "s.yaml")
    assert "baseEpochs: given twice, as baseEpochs and as base_epochs" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"search": {"topPolicies": True}}, "s.yaml")
    assert "topPolicies: expected a number, got the boolean True" in str(error.value)


def test_overrides_take_either_spelling(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("search:\n  baseEpochs: 20\n  fold_epochs: 30\n")
    spec = load_config(
        AugmentSearchSpec,
        path,
        ["search.base_epochs=3", "search.foldEpochs=4", "resources.nodeSelector.pool_name=x"],
    )
    assert (spec.search.base_epochs, spec.search.fold_epochs) == (3, 4)
    assert spec.resources.node_selector == {"pool_name": "x"}


def test_quantities_are_int_or_string() -> None:
    spec = parse_config(AugmentSearchSpec, {"resources": {"cpu": 4, "memory": "16Gi"}})
    assert (spec.resources.cpu, spec.resources.memory) == (4, "16Gi")
    assert parse_config(AugmentSearchSpec, {"resources": {"cpu": "500m"}}).resources.cpu == "500m"
    with pytest.raises(ConfigError) as error:
        parse_config(AugmentSearchSpec, {"resources": {"cpu": "4 cores"}}, "s.yaml")
    assert "s.yaml: resources.cpu: " in str(error.value) and "not a Kubernetes quantity" in str(
        error.value
    )
    with pytest.raises(ConfigError, match="resources.sharedMemory"):
        parse_config(AugmentSearchSpec, {"resources": {"sharedMemory": -1}})


MANIFEST = """apiVersion: selfaugment.io/v1alpha1
kind: {kind}
metadata:
  name: run
spec:
  search:
    folds: 3
"""


def test_a_whole_manifest_or_its_spec(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(MANIFEST.format(kind="AugmentSearch"))
    spec = load_config(AugmentSearchSpec, path, ["search.trials=17"], kind="AugmentSearch")
    assert (spec.search.folds, spec.search.trials) == (3, 17)
    path.write_text(MANIFEST.format(kind="Pretrain"))
    with pytest.raises(ConfigError, match="kind: 'Pretrain' is not AugmentSearch"):
        load_config(AugmentSearchSpec, path, kind="AugmentSearch")
    path.write_text(MANIFEST.format(kind="AugmentSearch").replace("selfaugment.io", "batch"))
    with pytest.raises(ConfigError, match="apiVersion: 'batch/v1alpha1' is not selfaugment.io"):
        load_config(AugmentSearchSpec, path, kind="AugmentSearch")
    path.write_text(MANIFEST.format(kind="AugmentSearch").replace("    folds: 3", "    fodls: 3"))
    with pytest.raises(ConfigError, match=r"search.yaml: spec: search.fodls: unknown field"):
        load_config(AugmentSearchSpec, path, kind="AugmentSearch")


def test_a_pretrain_manifest_gives_its_training_settings(tmp_path: Path) -> None:
    from selfaugment.trainer.pretrain_spec import load_pretrain_config

    path = tmp_path / "pretrain.yaml"
    path.write_text(
        "apiVersion: selfaugment.io/v1alpha1\nkind: Pretrain\nmetadata: {name: p}\n"
        "spec:\n  initFrom: s3://b/ckpt.pt\n  optim: {batchSize: 32}\n"
        "  storage: {uri: s3://b/p}\n"
    )
    config = load_pretrain_config(path, ["optim.epochs=3"])
    assert (config.init_from, config.optim.batch_size, config.optim.epochs) == (
        "s3://b/ckpt.pt",
        32,
        3,
    )
    path.write_text(path.read_text() + "  searchRef: cifar\n")
    with pytest.raises(ConfigError, match="spec.searchRef: the retrain stage"):
        load_pretrain_config(path, None)
    path.write_text("optim:\n  batch_size: 16\n")  # a bare PretrainConfig, snake_case
    assert load_pretrain_config(path, None).optim.batch_size == 16


def test_the_prepare_stage_takes_a_deadline() -> None:
    spec = parse_config(
        AugmentSearchSpec, {"resources": {"activeDeadlineSeconds": {"prepare": 3600}}}
    )
    assert spec.resources.active_deadline_seconds == {"prepare": 3600}


def test_a_manifest_names_its_run(tmp_path: Path) -> None:
    from selfaugment.trainer.config import run_name

    manifest = tmp_path / "search.yaml"
    manifest.write_text(
        "apiVersion: selfaugment.io/v1alpha1\nkind: AugmentSearch\n"
        "metadata: {name: fmnist-minimax}\nspec: {}\n"
    )
    bare = tmp_path / "bare.yaml"
    bare.write_text("search: {trials: 10, topPolicies: 5}\n")
    assert run_name(manifest, "search") == "fmnist-minimax"
    assert run_name(bare, "search") == "bare"
    assert run_name(None, "search") == "search"
