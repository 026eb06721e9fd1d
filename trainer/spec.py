"""The AugmentSearch and Pretrain specs: one typed model for the CLI and the custom resources.

`selfaugment search -f search.yaml` reads an :class:`AugmentSearchSpec`; the operator reads the
same model from an AugmentSearch's `spec`, and the CRD schema in crds/ is generated from it.
Paper defaults (Reed et al. 2021, Appendix A): K = 5 folds, T = 2 repeats, P = 10 top policies,
B = 200 trials, N_T = 5 sub-policies, N_tau = 2 ops per sub-policy, minimax objective.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from selfaugment.trainer.config import (
    SCHEMA_VERSION,
    AugmentConfig,
    DatasetConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    Quantity,
    RuntimeConfig,
    StrictModel,
)

BASE_CANDIDATES_ALL = "all"
Objective = Literal["minimax", "min_rotation", "min_infonce", "max_infonce", "supervised"]


class ObjectiveWeights(StrictModel):
    """Weights of the minimax objective: w_rot * L_rot / E[L_rot] - w_nce * L_nce / E[L_nce]."""

    rotation: float = Field(1.0, ge=0.0, description="Weight of the normalised rotation loss.")
    infonce: float = Field(1.0, ge=0.0, description="Weight of the normalised InfoNCE loss.")


class RandAugmentGrid(StrictModel):
    """SelfRandAugment grid (paper: N in {1, 2, 3}, M in {4, 5, 7, 9, 11} on RandAugment's 0..30)."""

    n: list[int] = Field(default_factory=lambda: [1, 2, 3], description="Ops per image, N.")
    m: list[int] = Field(
        default_factory=lambda: [4, 5, 7, 9, 11], description="Magnitudes M on the 0..30 scale."
    )

    @model_validator(mode="after")
    def _check_grid(self) -> RandAugmentGrid:
        if not self.n or not self.m:
            raise ValueError("randaugment grid needs at least one n and one m")
        if any(value < 1 or value > 15 for value in self.n):
            raise ValueError(f"randaugment.n values must be within [1, 15], got {self.n}")
        if any(value < 0 or value > 30 for value in self.m):
            raise ValueError(f"randaugment.m values must be within [0, 30], got {self.m}")
        return self


class BaseSelection(StrictModel):
    """How the base transform is chosen among the candidates (when `basePolicy` is 'auto').

    `exhaustive` trains every candidate for `baseEpochs` (the paper's setting).
    `successive_halving` trains every candidate for a short first rung, keeps the best 1/eta
    by held-out rotation accuracy (the paper's criterion), continues those from their own
    checkpoints to the next rung, and so on to `baseEpochs` (as ASHA/Hyperband do). The
    learning-rate schedule is that of `baseEpochs`, so a candidate that survives every rung
    trains exactly as it would in the exhaustive stage.
    """

    method: Literal["exhaustive", "successive_halving"] = Field(
        "successive_halving",
        description=(
            "'successive_halving' (default: on Fashion-MNIST it chose the same base as the "
            "paper's stage at half the candidate-epochs, docs/results/search-cost-fmnist-reduced)"
            " or 'exhaustive' (the paper's setting)."
        ),
    )
    eta: int = Field(
        2, ge=2, le=8, description="Successive halving keeps the best 1/eta of each rung."
    )
    min_epochs: int = Field(
        1, ge=1, description="Successive halving: the fewest epochs a rung trains for."
    )
    seeds: int = Field(
        1,
        ge=1,
        le=10,
        description=(
            "Training seeds per candidate of the last rung: with 2 or more, each is trained "
            "again from scratch with other seeds, its score is the mean over them and its "
            "uncertainty their spread (training seeds move rotation accuracy far more than "
            "the held-out images do)."
        ),
    )


class RacingConfig(StrictModel):
    """Racing the TPE candidates: each is scored on a growing share of the held-out images and
    stopped as soon as its objective, minus `z` standard errors over the images seen, is worse
    than the current P-th best (P = topPolicies; those are always scored in full). TPE gets
    the estimate. Off by default until its effect on the found policies is measured."""

    enabled: bool = Field(False, description="Race the candidates (see above).")
    z: float = Field(
        2.0, gt=0.0, le=10.0, description="Standard errors of margin before a candidate stops."
    )
    min_fraction: float = Field(
        0.25, gt=0.0, le=1.0, description="The share of held-out images always scored."
    )


class SearchConfig(StrictModel):
    """The policy search (Algorithm 1 of the SelfAugment paper)."""

    algorithm: Literal["selfaugment", "selfrandaugment"] = Field(
        "selfaugment",
        description="TPE policy search, or a RandAugment (N, M) grid scored by rotation.",
    )
    base_policy: str = Field(
        "auto",
        description=(
            "'auto' selects the base transform by a short MoCo run per single transform; otherwise "
            "a policy name or file used as the base augmentation (e.g. 'RandomResizedCrop')."
        ),
    )
    base_candidates: list[str] | Literal["all"] = Field(
        "all",
        description="Transforms tried for the base policy: 'all' (15 ops + RandomResizedCrop) or a list.",
    )
    base_epochs: int = Field(
        20,
        ge=1,
        description="MoCo epochs per base candidate (paper: about 10% of a full schedule).",
    )
    base_selection: BaseSelection = Field(default_factory=BaseSelection)
    fold_epochs: int = Field(200, ge=1, description="MoCo epochs per fold with the base policy.")
    folds: int = Field(5, ge=1, le=20, description="K: data splits (paper: 5).")
    repeats: int = Field(2, ge=1, description="T: TPE repeats per fold (paper: 2).")
    trials: int = Field(200, ge=1, description="B: candidate policies per repeat (paper: 200).")
    sub_policies: int = Field(5, ge=1, description="N_T: sub-policies per candidate (paper: 5).")
    ops_per_sub_policy: int = Field(
        2, ge=1, le=5, description="N_tau: ops per sub-policy (paper: 2)."
    )
    top_policies: int = Field(
        10, ge=1, description="P: best candidates kept per repeat (paper: 10)."
    )
    objective: Objective = Field(
        "minimax",
        description=(
            "minimax (recommended), min_rotation, min_infonce, max_infonce, or supervised "
            "(needs labels; an oracle for comparison)."
        ),
    )
    weights: ObjectiveWeights = Field(default_factory=ObjectiveWeights)
    randaugment: RandAugmentGrid = Field(default_factory=RandAugmentGrid)
    startup_trials: int = Field(
        20,
        ge=1,
        description=(
            "Random trials before TPE starts modelling (hyperopt's n_startup_jobs; capped at trials)."
        ),
    )
    score_batch_size: int = Field(256, ge=2, description="Batch size when scoring candidates.")
    racing: RacingConfig = Field(default_factory=RacingConfig)
    score_images: int | None = Field(
        None,
        ge=16,
        description=(
            "Score candidates on at most this many held-out images (a seeded subset of each "
            "fold's held-out part); all of them when unset, as in the paper."
        ),
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the splits, the TPE sampler and all training runs.",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.base_selection.min_epochs > self.base_epochs:
            raise ValueError(
                f"baseSelection.minEpochs ({self.base_selection.min_epochs}) cannot exceed "
                f"baseEpochs ({self.base_epochs})"
            )
        if self.top_policies > self.trials:
            raise ValueError(
                f"topPolicies ({self.top_policies}) cannot exceed trials ({self.trials})"
            )
        return self


class RetrainConfig(StrictModel):
    """Final retraining from scratch on all data with the found policy."""

    epochs: int = Field(
        800, ge=1, description="MoCo epochs of the final model (paper CIFAR: 750+)."
    )
    batch_size: int | None = Field(None, ge=2, description="Overrides optim.batch_size when set.")
    lr: float | None = Field(None, gt=0.0, description="Overrides optim.lr when set.")


class Toleration(StrictModel):
    """A Kubernetes toleration (subset of core/v1 Toleration)."""

    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; all effects when unset."
    )


class VolumeMount(StrictModel):
    """Where a volume of `resources.volumes` appears in the worker container (core/v1 VolumeMount)."""

    name: str = Field(..., min_length=1, description="Name of an entry of `resources.volumes`.")
    mount_path: str = Field(..., pattern=r"^/", description="Absolute path in the container.")
    read_only: bool = Field(False, description="Mount read-only (datasets should be).")
    sub_path: str | None = Field(None, description="Mount only this path inside the volume.")

    def manifest(self) -> dict[str, Any]:
        """The core/v1 VolumeMount object."""
        mount: dict[str, Any] = {"name": self.name, "mountPath": self.mount_path}
        if self.read_only:
            mount["readOnly"] = True
        if self.sub_path:
            mount["subPath"] = self.sub_path
        return mount


#: Volumes every worker pod has (scratch space on a read-only root filesystem, /dev/shm).
RESERVED_VOLUMES = ("scratch", "dshm")
RESERVED_MOUNT_PATHS = ("/tmp", "/dev/shm")


class ResourcesConfig(StrictModel):
    """What each worker gets (used by the operator; the local runner reads `gpus`)."""

    gpus: int = Field(0, ge=0, le=16, description="GPUs per worker.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    cpu: Quantity = Field(
        "2", description="CPU request per worker (Kubernetes quantity: 4, '4', '500m')."
    )
    memory: Quantity = Field(
        "8Gi", description="Memory request per worker (Kubernetes quantity: '8Gi', '512Mi')."
    )
    image: str | None = Field(None, description="Worker image; the operator default when unset.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Worker nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Worker tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Worker affinity (core/v1 Affinity).")
    priority_class: str | None = Field(None, description="priorityClassName of worker pods.")
    queue: str | None = Field(
        None, description="Kueue LocalQueue name: Jobs are created suspended for Kueue to admit."
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Extra pod volumes (core/v1 Volume objects, e.g. a PersistentVolumeClaim holding the "
            "dataset); mount them with `volumeMounts`."
        ),
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, description="Where `volumes` appear in the worker container."
    )
    shared_memory: Quantity | None = Field(
        "1Gi",
        description=(
            "Size of the in-memory /dev/shm of worker pods (data loader workers and NCCL need "
            "more than the container runtime's 64Mi); null keeps the runtime's default."
        ),
    )
    active_deadline_seconds: dict[
        Literal[
            "prepare",
            "base",
            "folds",
            "search",
            "merge",
            "retrain",
            "report",
            "randaugment",
            "pretrain",
        ],
        PositiveInt,
    ] = Field(
        default_factory=dict,
        description=(
            "Longest a task's Job may run, per stage (`pretrain`: a standalone Pretrain), as "
            "the Job's activeDeadlineSeconds: a hung worker (NCCL, data loader) is stopped and "
            "the run fails with reason DeadlineExceeded. Stages left out get the operator's "
            "defaults (operator only)."
        ),
    )

    @model_validator(mode="after")
    def _check_volumes(self) -> ResourcesConfig:
        declared: list[str] = []
        for index, volume in enumerate(self.volumes):
            name = volume.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"volumes[{index}].name: required (a non-empty string)")
            if name in RESERVED_VOLUMES:
                raise ValueError(
                    f"volumes[{index}].name: {name!r} is reserved for the worker pod "
                    f"(reserved: {', '.join(RESERVED_VOLUMES)})"
                )
            if name in declared:
                raise ValueError(f"volumes[{index}].name: {name!r} is declared twice")
            declared.append(name)
        for index, mount in enumerate(self.volume_mounts):
            if mount.name not in declared:
                allowed = ", ".join(declared) or "none declared"
                raise ValueError(
                    f"volumeMounts[{index}].name: {mount.name!r} is not in volumes "
                    f"(declared: {allowed})"
                )
            path = mount.mount_path.rstrip("/") or "/"
            if path in RESERVED_MOUNT_PATHS or path == "/":
                raise ValueError(
                    f"volumeMounts[{index}].mountPath: {mount.mount_path!r} is used by the "
                    f"worker pod (reserved: /, {', '.join(RESERVED_MOUNT_PATHS)})"
                )
        return self


class ParallelismConfig(StrictModel):
    """How many tasks run at once."""

    max_workers: int = Field(2, ge=1, le=256, description="Concurrent workers (processes or Jobs).")
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a failed task before failing.")


class StorageConfig(StrictModel):
    """Artifact store: a local directory or s3://bucket/prefix (MinIO or S3)."""

    uri: str | None = Field(
        None,
        description="Local directory or s3://bucket/prefix; locally defaults to the -o directory.",
    )
    endpoint: str | None = Field(
        None, description="S3 endpoint URL (MinIO); else AWS_ENDPOINT_URL or AWS's default."
    )
    region: str | None = Field(None, description="S3 region.")
    secret_ref: str | None = Field(
        None,
        description=(
            "Kubernetes Secret (in the run's namespace) with AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY: the run's workers get them as environment variables, and the "
            "operator reads and writes the run's store with them alone (operator only)."
        ),
    )


class AugmentSearchSpec(StrictModel):
    """Spec of an AugmentSearch: everything `selfaugment search` and the operator need."""

    schema_version: int = Field(SCHEMA_VERSION, description="Spec schema version.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    optim: OptimConfig = Field(
        default_factory=OptimConfig,
        description="Optimiser of every MoCo run; epochs come from the search and retrain stages.",
    )
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(policy="none"),
        description="Crop/flip settings of MoCo views; the policy field is set by each stage.",
    )
    evaluation: ProbeConfig = Field(
        default_factory=ProbeConfig, description="Rotation (and linear) head training."
    )
    evaluation_dataset: DatasetConfig | None = Field(
        None,
        description=(
            "Held-out images on which the final model's probes are measured (e.g. a test split); "
            "without it, `evaluation.holdoutFraction` of the training images is held out."
        ),
    )
    search: SearchConfig = Field(default_factory=SearchConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check_candidates(self) -> AugmentSearchSpec:
        chosen = self.search.base_candidates
        if self.dataset.channels == 1 and chosen != BASE_CANDIDATES_ALL and "Color" in chosen:
            raise ValueError(
                "search.baseCandidates: Color is the identity on 1-channel images "
                "(dataset.channels: 1), so it cannot be a base policy; leave it out"
            )
        return self
