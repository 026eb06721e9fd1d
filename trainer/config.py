"""Typed configuration for the trainer: every default lives here, once.

Configs are pydantic models that forbid unknown fields, so a typo in a YAML file is an
error that names the field instead of a silently ignored setting. Defaults follow MoCo v2
(Chen et al. 2020, arXiv:2003.04297) and the SelfAugment paper (Reed et al. 2021); the
comment on each field says where a number comes from.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from selfaugment.errors import SelfAugmentError

SCHEMA_VERSION = 1


class ConfigError(SelfAugmentError, ValueError):
    """A configuration file or value is invalid; the message names the field and the source."""


class StrictModel(BaseModel):
    """Base for all configs: unknown fields are errors, assignment is validated, and a boolean
    is never read as a number (`trials: true` is an error, not 1).

    Field names are camelCase, as in every Kubernetes API (`baseEpochs`, `secretRef`); the
    Python (snake_case) spelling of a field is accepted too, so config files written before
    the rename, `--set` overrides and Python code keep working. Giving one field in both
    spellings is an error. Dumps are by Python name unless asked `by_alias=True` (the store's
    spec.json and the digests that name tasks do not depend on the spelling); what is written
    for Kubernetes is dumped by alias. Keys inside user data (a nodeSelector, volumes,
    affinity) are never renamed.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                alias = field.alias or name
                if alias != name and alias in data and name in data:
                    raise ValueError(f"{alias}: given twice, as {alias} and as {name}")
                written = alias if alias in data else name
                value = data.get(written)
                if isinstance(value, bool) and _is_numeric(field.annotation):
                    raise ValueError(f"{written}: expected a number, got the boolean {value}")
        return data


def field_alias(model: type[BaseModel], name: str) -> str:
    """The camelCase name of `model`'s field `name` (as a manifest writes it)."""
    field = model.model_fields[name]
    return field.alias or name


def _is_numeric(annotation: Any) -> bool:
    """int or float, alone or in an Optional/Union (not bool itself)."""
    if annotation in (int, float):
        return True
    return any(arg in (int, float) for arg in getattr(annotation, "__args__", ()))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML (and JSON) where a repeated key is an error instead of the last one winning."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_config_text(text: str | bytes, source: str) -> Any:
    """Parse YAML/JSON config text: ConfigError (one line, naming `source`) on bytes that are not
    UTF-8, repeated keys, nesting too deep to read, or invalid syntax."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                f"{error.start})"
            ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read") from None
    except ValueError as error:  # e.g. an integer of more than sys.get_int_max_str_digits()
        first = str(error).split(";")[0]
        raise ConfigError(f"{source}: a value cannot be read: {first}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML/JSON: {error}") from None


DatasetFormat = Literal["auto", "imagefolder", "idx", "npz", "digits", "cifar10", "svhn", "stl10"]


_QUANTITY_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kMGT]i?|Ki)?\s*$")


def parse_quantity(value: str | int, field: str) -> int:
    """Bytes of a Kubernetes-style quantity ('4Gi', '500M', '1048576'); ValueError naming `field`."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{field}: {value} must be at least one byte")
        return value
    match = _QUANTITY.match(value)
    if match is None or (match.group(2) or "") not in _QUANTITY_SUFFIXES:
        raise ValueError(
            f"{field}: {value!r} is not a quantity of bytes (for example '4Gi', '512Mi', '2G')"
        )
    number = int(float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2) or ""])
    if number < 1:
        raise ValueError(f"{field}: {value!r} must be at least one byte")
    return number


#: A Kubernetes resource quantity as the API server reads it ('4', '500m', '8Gi', '1.5', '2e3').
_K8S_QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([numkMGTPE]|[KMGTPE]i|[eE][+-]?[0-9]+)?$"


def _check_k8s_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} must not be negative")
        return value
    if not re.match(_K8S_QUANTITY, value):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity (for example 4, '500m', '8Gi', '512Mi')"
        )
    return value


#: A Kubernetes quantity, as in a pod's resources: a number (`cpu: 4`) or a string (`8Gi`).
#: The CRD says `x-kubernetes-int-or-string` with the quantity pattern.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_k8s_quantity),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _K8S_QUANTITY}]}
    ),
]


#: A number of bytes as a Kubernetes quantity (`4Gi`, `512Mi`, or a plain number of bytes);
#: checked by parse_quantity in the model that holds it (naming the field).
ByteQuantity = Annotated[
    int | str,
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]}),
]


class DatasetConfig(StrictModel):
    """Where the images come from and how they are shaped for the model."""

    uri: str = Field(
        "sklearn:digits",
        min_length=1,
        description=(
            "Local path, s3://bucket/prefix, or a built-in source: 'sklearn:digits' (bundled with "
            "scikit-learn), 'torchvision:cifar10|svhn|stl10' (read from the path in `root`)."
        ),
    )
    format: DatasetFormat = Field(
        "auto", description="Source format; 'auto' infers it from the uri (folder, .npz, IDX)."
    )
    split: Literal["train", "test"] = Field("train", description="Which split to read.")
    root: str | None = Field(
        None, description="Directory holding torchvision datasets (cifar10, svhn, stl10)."
    )
    download: bool = Field(
        False, description="Allow torchvision to download a dataset that is not under `root`."
    )
    image_size: int = Field(32, ge=8, le=1024, description="Images are resized to this side.")
    channels: Literal[1, 3] = Field(
        3, description="Channels fed to the model; grayscale data is repeated to 3 if asked."
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first `limit` images (after a seeded shuffle)."
    )
    on_corrupt: Literal["skip", "fail"] = Field(
        "skip",
        description="What to do with an unreadable image: skip it (reported by file name) or stop.",
    )
    memory_budget: ByteQuantity = Field(
        "4Gi",
        description=(
            "Decoded images a worker may hold in memory (and on its GPU), as a Kubernetes "
            "quantity: a dataset whose decoded size (N x C x imageSize^2 bytes) is larger is "
            "streamed from its prepared shards instead of decoded into memory."
        ),
    )
    storage_size: int | None = Field(
        None,
        ge=8,
        le=4096,
        description=(
            "Shorter side at which prepared shards store larger images (smaller ones are kept "
            "as they are); default max(256, image_size). At least image_size."
        ),
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> DatasetConfig:
        parse_quantity(self.memory_budget, "dataset.memoryBudget")
        if self.storage_size is not None and self.storage_size < self.image_size:
            raise ValueError(
                f"dataset.storageSize ({self.storage_size}) must be at least "
                f"dataset.imageSize ({self.image_size})"
            )
        return self

    @property
    def memory_budget_bytes(self) -> int:
        """`memoryBudget` in bytes."""
        return parse_quantity(self.memory_budget, "dataset.memoryBudget")

    @property
    def prepared_size(self) -> int:
        """The storage size of prepared shards: `storageSize`, or max(256, image_size)."""
        return self.storage_size if self.storage_size is not None else max(256, self.image_size)


class ModelConfig(StrictModel):
    """Backbone: a torchvision ResNet with optional CIFAR stem and width scaling."""

    arch: Literal["resnet18", "resnet50"] = Field("resnet18", description="Backbone architecture.")
    width: int = Field(
        64,
        ge=4,
        le=256,
        description="Channels of the first stage (64 in torchvision); small values give tiny CPU models.",
    )
    cifar_stem: bool = Field(
        True,
        description="3x3 stride-1 first conv and no max-pool, as usual for 32x32 images.",
    )


class MocoConfig(StrictModel):
    """MoCo v2 contrastive learner (defaults from MoCo v2, arXiv:2003.04297)."""

    dim: int = Field(128, ge=8, description="Output dimension of the projection head.")
    queue_size: int = Field(
        65536,
        ge=16,
        le=1_048_576,
        description=(
            "Number of negative keys kept in the queue (MoCo: 65536; at most 2^20, 512 MB at "
            "dim 128)."
        ),
    )
    momentum: float = Field(
        0.999, ge=0.0, lt=1.0, description="Momentum of the key-encoder update (MoCo: 0.999)."
    )
    temperature: float = Field(
        0.2, gt=0.0, description="Softmax temperature of InfoNCE (MoCo v2: 0.2)."
    )
    mlp: bool = Field(
        True, description="Two-layer MLP projection head (MoCo v2) instead of linear."
    )
    head_batchnorm: bool = Field(
        False,
        description=(
            "BatchNorm1d after the hidden layer of the MLP head (as in SimCLR and MoCo v3, not "
            "MoCo v2); lets very small models on small images escape the near-collapsed start."
        ),
    )


class OptimConfig(StrictModel):
    """SGD with a cosine schedule (MoCo v2 defaults: lr 0.03 at batch 256, wd 1e-4)."""

    epochs: int = Field(200, ge=1, description="Training epochs (MoCo v2: 200).")
    batch_size: int = Field(256, ge=2, description="Images per step (global, over all GPUs).")
    lr: float = Field(0.03, gt=0.0, description="Base learning rate (MoCo v2: 0.03 at batch 256).")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 weight decay (MoCo: 1e-4).")
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (MoCo: 0.9).")
    warmup_epochs: int = Field(
        0, ge=0, description="Linear warm-up epochs before the cosine decay."
    )


class AugmentConfig(StrictModel):
    """How the two MoCo views of an image are made."""

    policy: str = Field(
        "mocov2",
        description=(
            "Policy applied after crop and flip: a JSON policy file, or a built-in name "
            "('mocov2', 'none', 'randaugment:N:M', or an op name such as 'Rotate' for a "
            "single-transform policy with p = 1 and random magnitude)."
        ),
    )
    base: str = Field(
        "none",
        description=(
            "A base transform applied after crop/flip and before `policy` (a policy name as for "
            "`policy`; SelfAugment's selected base transform when it is not RandomResizedCrop)."
        ),
    )
    crop: bool = Field(True, description="RandomResizedCrop before the policy.")
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="Area range of RandomResizedCrop (MoCo v2: 0.2 to 1)."
    )
    flip: bool = Field(True, description="Random horizontal flip.")

    @model_validator(mode="after")
    def _check_scale(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"cropScale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


class RuntimeConfig(StrictModel):
    """Where and how computation runs."""

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' is bf16 autocast on CUDA and fp32 on CPU."
    )
    channels_last: bool | None = Field(
        None, description="Use channels_last memory format; default: on for CUDA, off for CPU."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for data order, augmentation and initialisation."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="Write a resumable checkpoint every N epochs."
    )
    checkpoint_steps: int | None = Field(
        1000,
        ge=1,
        description=(
            "Also write a resumable checkpoint every N optimizer steps inside an epoch, so a "
            "stopped run on a large (streamed) dataset resumes from that step; null: only at "
            "the end of an epoch (checkpointEvery)."
        ),
    )
    progress: bool = Field(True, description="Show progress bars.")


class ProbeConfig(StrictModel):
    """A linear head trained on the frozen backbone (rotation, supervised or jigsaw)."""

    epochs: int = Field(30, ge=1, description="Epochs of linear-head training.")
    batch_size: int = Field(256, ge=2, description="Images per step.")
    lr: float = Field(0.1, gt=0.0, description="Learning rate of the head (SGD, cosine schedule).")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay of the head.")
    holdout_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of images held out to report accuracy and loss (when no test split).",
    )


ProbeTask = Literal["rotation", "linear", "jigsaw"]


class EvaluationConfig(StrictModel):
    """Which frozen-backbone evaluations to run after pretraining."""

    tasks: list[ProbeTask] = Field(
        default_factory=lambda: list[ProbeTask](["rotation"]),
        description="'rotation' (label-free), 'linear' (needs labels), 'jigsaw' (2x2, 24-way).",
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Linear-head training.")


class PretrainConfig(StrictModel):
    """`selfaugment pretrain`: train MoCo v2 on a dataset with an augmentation policy."""

    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    init_from: str | None = Field(
        None, description="Checkpoint to start from (hierarchical pretraining)."
    )
    trainable: Literal["all", "batchnorm"] = Field(
        "all",
        description="Train all parameters, or only batch-norm ones (hierarchical pretraining).",
    )


class EvalConfig(StrictModel):
    """`selfaugment eval`: evaluate a checkpoint's frozen backbone."""

    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version.")
    checkpoint: str = Field(..., description="Path of a pretrain checkpoint.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    test_dataset: DatasetConfig | None = Field(
        None,
        description="Held-out split; without it `probe.holdoutFraction` of `dataset` is used.",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


ModelT = TypeVar("ModelT", bound=BaseModel)


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: field.path: message (got value)`."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "<root>"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "literal_error" and "expected" in problem.get("ctx", {}):
            message = f"must be one of {problem['ctx']['expected']}"
        elif problem["type"] == "value_error":
            # A model's own check: its message names the field and the value already.
            lines.append(f"{source}: {location}: {message.removeprefix('Value error, ')}")
            continue
        lines.append(f"{source}: {location}: {message} (got {problem.get('input')!r})")
    return "\n".join(lines)


def field_differences(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    ignored: Collection[str] = (),
    prefix: str = "",
) -> list[tuple[str, Any, Any]]:
    """(dotted name, stored value, current value) of every field that differs between two
    dumped configs, walking nested mappings; dotted names in `ignored` are skipped."""
    differences: list[tuple[str, Any, Any]] = []
    for key in sorted(set(stored) | set(current)):
        name = f"{prefix}{key}"
        if name in ignored:
            continue
        before, after = stored.get(key), current.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            differences += field_differences(before, after, ignored, f"{name}.")
        elif before != after:
            differences.append((name, before, after))
    return differences


def parse_config(model: type[ModelT], data: dict[str, Any], source: str = "config") -> ModelT:
    """Validate a mapping into `model`, raising ConfigError with field-named messages."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def _known_key(node: dict[str, Any], model: type[BaseModel] | None, part: str) -> tuple[str, Any]:
    """(key to use in `node`, model of its value) for the override path component `part`:
    a field of `model` given in either spelling takes the spelling `node` already has (else
    the one given); keys of user data (a nodeSelector, volumes) are used as given."""
    if model is None:
        return part, None
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if part in (name, alias):
            key = alias if alias in node else name if name in node else part
            return key, _model_of(field.annotation)
    return part, None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (alone or in an Optional), else None."""
    for option in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Return a copy of `data` with `a.b.c=value` overrides applied (values parsed as YAML).

    With `model`, a field may be named in either spelling (`search.baseEpochs` or
    `search.baseEpochs`) and replaces the value whichever spelling the file used."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key.path=value")
        key, raw_value = override.split("=", 1)
        node, current = result, model
        parts = key.strip().split(".")
        for part in parts[:-1]:
            part, current = _known_key(node, current, part)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a mapping")
            node = child
        last, _ = _known_key(node, current, parts[-1])
        node[last] = yaml.safe_load(raw_value)
    return result


#: API group of the custom resources whose manifests the CLI reads (operator/names.py GROUP).
MANIFEST_GROUP = "selfaugment.io"


def read_config_file(path: str | Path | None) -> tuple[Any, str]:
    """(parsed YAML/JSON document, its name for messages); an empty mapping without a path."""
    if path is None:
        return {}, "config"
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config file: {error.strerror}") from None
    loaded = read_config_text(raw, source)
    return (loaded if loaded is not None else {}), source


def is_manifest(data: Any) -> bool:
    """A whole Kubernetes manifest (apiVersion/kind/metadata/spec) rather than a bare spec."""
    return isinstance(data, dict) and ("apiVersion" in data or "kind" in data)


def run_name(path: str | Path | None, default: str) -> str:
    """A run's name: a manifest's `metadata.name` (as on the cluster), else the file's stem."""
    if path is None:
        return default
    data, _ = read_config_file(path)
    metadata = data.get("metadata") if is_manifest(data) else None
    if isinstance(metadata, dict):
        name = metadata.get("name")
        if isinstance(name, str) and name and "/" not in name and not name.startswith("."):
            return name
    return Path(path).stem


def manifest_spec(data: dict[str, Any], kind: str, source: str) -> dict[str, Any]:
    """The `spec` of a manifest of `kind` (selfaugment.io); ConfigError naming what is wrong."""
    api_version = data.get("apiVersion")
    if not isinstance(api_version, str) or api_version.split("/")[0] != MANIFEST_GROUP:
        raise ConfigError(
            f"{source}: apiVersion: {api_version!r} is not {MANIFEST_GROUP}/<version> "
            f"(expected an {kind} manifest or its bare spec)"
        )
    if data.get("kind") != kind:
        raise ConfigError(
            f"{source}: kind: {data.get('kind')!r} is not {kind} (this command reads an "
            f"{kind} manifest or its bare spec)"
        )
    unknown = sorted(set(data) - {"apiVersion", "kind", "metadata", "spec", "status"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown field of an {kind} manifest")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: spec: required (a mapping) in an {kind} manifest")
    return spec


def load_config(
    model: type[ModelT],
    path: str | Path | None,
    overrides: list[str] | None = None,
    kind: str | None = None,
) -> ModelT:
    """Read a YAML/JSON file (or nothing, for all defaults) into a validated config.

    With `kind` (AugmentSearch, Pretrain), the file may also be that resource's whole manifest:
    its `spec` is the config (metadata is not read), and overrides apply to the spec."""
    data, source = read_config_file(path)
    if kind is not None and is_manifest(data):
        data, source = manifest_spec(data, kind, source), f"{source}: spec"
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, model)
    return parse_config(model, data, source)
