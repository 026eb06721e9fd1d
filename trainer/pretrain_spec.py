"""Spec of the Pretrain custom resource: one MoCo training run as a Kubernetes workload.

A Pretrain is either standalone (its training settings are a PretrainConfig: dataset, model,
policy, hierarchical `initFrom`/`trainable`, ...) or the retrain stage of an AugmentSearch
(`searchRef` set by the operator): then the worker runs the search's `retrain` task and the
training settings come from the search's spec in the store.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from selfaugment.trainer.config import (
    ConfigError,
    PretrainConfig,
    StrictModel,
    apply_overrides,
    is_manifest,
    load_config,
    manifest_spec,
    parse_config,
    read_config_file,
)
from selfaugment.trainer.spec import ResourcesConfig, StorageConfig


class DistributedConfig(StrictModel):
    """Data-parallel training over several GPUs or nodes (torchrun)."""

    nodes: int = Field(
        1, ge=1, le=64, description="Nodes (pods of an indexed Job); more than 1 uses torchrun."
    )
    gpus_per_node: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Processes (GPUs) per node; defaults to resources.gpus (at least 1).",
    )
    port: int = Field(29500, ge=1024, le=65535, description="torchrun rendezvous port.")


class PretrainSpec(PretrainConfig):
    """Spec of a Pretrain: the PretrainConfig fields plus where and how it runs."""

    search_ref: str | None = Field(
        None,
        description=(
            "Name of the AugmentSearch (same namespace) whose retrain task this runs; set by the "
            "operator. The training settings then come from the search's spec."
        ),
    )
    prefix: str | None = Field(
        None,
        description="Key prefix of this run's artifacts in the store; default pretrains/<name>.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_retries: int = Field(
        2, ge=0, le=10, description="Pod retries before the Pretrain fails (Job backoffLimit)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check_storage(self) -> PretrainSpec:
        if not self.storage.uri:
            raise ValueError("storage.uri is required (a store the workers can reach, s3://...)")
        if self.prefix is not None and (self.prefix.startswith("/") or ".." in self.prefix):
            raise ValueError(f"prefix must be a relative key prefix, got {self.prefix!r}")
        return self

    def to_config(self) -> PretrainConfig:
        """The PretrainConfig the worker reads from `<prefix>/config.json`."""
        names = set(PretrainConfig.model_fields)
        return PretrainConfig.model_validate(self.model_dump(include=names))

    def gpus_per_node(self) -> int:
        """Worker processes per node."""
        return self.distributed.gpus_per_node or max(1, self.resources.gpus)


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None) -> PretrainConfig:
    """`selfaugment pretrain -f`: a PretrainConfig file, or a whole Pretrain manifest whose
    spec's training settings are used (its resources, distributed, storage and prefix are the
    operator's and are only validated here)."""
    data, source = read_config_file(path)
    if not is_manifest(data):
        return load_config(PretrainConfig, path, overrides)
    spec = manifest_spec(data, "Pretrain", source)
    if overrides:
        spec = apply_overrides(spec, overrides, PretrainSpec)
    parsed = parse_config(PretrainSpec, spec, f"{source}: spec")
    if parsed.search_ref:
        raise ConfigError(
            f"{source}: spec.searchRef: the retrain stage of AugmentSearch {parsed.search_ref} "
            "takes its settings from the search; it does not run alone"
        )
    return parsed.to_config()
