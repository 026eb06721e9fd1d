"""`selfaugment study correlation`: does rotation accuracy rank representations like labels do?

Trains one MoCo model per policy in a diverse list (single ops, a RandAugment grid, the base
augmentation, a MoCo v2-style policy, found policies), evaluates each frozen backbone with the
label-free rotation probe and the supervised linear probe, and reports the Spearman rank
correlation of the two (the paper reports rho = 0.95 to 0.99, Reed et al. 2021, Section 3).
Each model's result is written as soon as it exists, so an interrupted study resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from selfaugment.trainer.config import (
    SCHEMA_VERSION,
    AugmentConfig,
    ConfigError,
    DatasetConfig,
    EvaluationConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    RuntimeConfig,
    StrictModel,
    load_config,
)


class StudyModel(StrictModel):
    """One model of the study: a name and the augmentation it trains with."""

    name: str = Field(..., description="Label in tables and plots.")
    policy: str = Field("none", description="Policy applied after crop and flip (as in pretrain).")
    base: str = Field("none", description="Base transform before the policy.")
    crop: bool = Field(True, description="RandomResizedCrop.")
    flip: bool = Field(True, description="Horizontal flip.")


def default_models() -> list[StudyModel]:
    """A diverse set: weak to strong, colour and geometric, RandAugment grid, MoCo v2-like."""
    models = [
        StudyModel(name="crop+flip (base)", policy="none"),
        StudyModel(name="mocov2-style", policy="mocov2"),
        StudyModel(name="no augmentation", policy="none", crop=False, flip=False),
    ]
    for op in ("Rotate", "Contrast", "Invert", "Equalize", "Cutout", "TranslateX", "Solarize"):
        models.append(StudyModel(name=f"{op} only", base=op, crop=False, flip=False))
    for n, m in ((1, 5), (2, 9), (3, 13), (2, 20)):
        models.append(StudyModel(name=f"RandAugment N={n} M={m}", policy=f"randaugment:{n}:{m}"))
    return models


class StudyConfig(StrictModel):
    """Configuration of the correlation study."""

    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Training images.")
    test_dataset: DatasetConfig | None = Field(
        None, description="Held-out images for both probes (else a hold-out of `dataset`)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Crop scale shared by every model."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Linear-head training.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: list[StudyModel] = Field(default_factory=default_models, description="Models.")
    extra_models: list[StudyModel] = Field(
        default_factory=list,
        description="Models appended to `models` (e.g. the policies a search found).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> StudyConfig:
        seen: dict[str, str] = {}
        for index, model in enumerate(self.all_models()):
            slug = _slug(model.name)
            if slug in seen:
                raise ValueError(
                    f"models[{index}].name: {model.name!r} clashes with {seen[slug]!r} "
                    "(each model needs its own result folder)"
                )
            seen[slug] = model.name
        return self

    def all_models(self) -> list[StudyModel]:
        return [*self.models, *self.extra_models]


def _slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(part for part in keep.split("-") if part)


def model_setup(cfg: StudyConfig, augment: AugmentConfig) -> dict[str, Any]:
    """What one model's figures depend on: a stored result is reused only when it matches.

    Training: data, network, MoCo, optimiser, augmentation (with a policy file's digest, so an
    edited file counts as a new policy) and seed. Probes: their settings and the test images.
    """
    training = {
        "dataset": cfg.dataset.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "moco": cfg.moco.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "seed": cfg.runtime.seed,
    }
    for field in ("policy", "base"):
        path = Path(getattr(augment, field))
        if path.suffix == ".json" and path.is_file():
            training[f"{field}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    probes = {
        "probe": cfg.probe.model_dump(mode="json"),
        "test_dataset": None
        if cfg.test_dataset is None
        else cfg.test_dataset.model_dump(mode="json"),
    }
    return {"training": training, "probes": probes}


def _train_and_probe(study: dict[str, Any], entry: dict[str, Any], out: str) -> dict[str, Any]:
    """Worker: train one model, run rotation and linear probes, write result.json."""
    import torch

    from selfaugment.trainer.data import load_dataset
    from selfaugment.trainer.evaluation.pretrained import run_pretrain
    from selfaugment.trainer.evaluation.probes import evaluate_tasks
    from selfaugment.trainer.moco.checkpoint import load_backbone
    from selfaugment.trainer.runtime import resolve_device

    torch.set_num_threads(int(os.environ.get("SELFAUGMENT_THREADS", "1")))
    cfg = StudyConfig.model_validate(study)
    model = StudyModel.model_validate(entry)
    directory = Path(out) / "models" / _slug(model.name)
    result_path = directory / "result.json"
    augment = cfg.augment.model_copy(
        update={"policy": model.policy, "base": model.base, "crop": model.crop, "flip": model.flip}
    )
    setup = model_setup(cfg, augment)
    if result_path.exists():
        stored = dict(json.loads(result_path.read_text()))
        if stored.get("setup") == setup:
            return stored
        # Otherwise measure again: a finished checkpoint with the same training config is
        # resumed at its last epoch (only the probes run); a different one is an error.
    pretrain_cfg = PretrainConfig(
        dataset=cfg.dataset,
        model=cfg.model,
        moco=cfg.moco,
        optim=cfg.optim,
        augment=augment,
        runtime=cfg.runtime.model_copy(update={"progress": False}),
        evaluation=EvaluationConfig(tasks=[]),
    )
    train = load_dataset(cfg.dataset, seed=cfg.runtime.seed)
    pretrain = run_pretrain(pretrain_cfg, directory, images=train)
    backbone, _ = load_backbone(directory / "checkpoint.pt")
    test = load_dataset(cfg.test_dataset, seed=cfg.runtime.seed) if cfg.test_dataset else None
    evaluation = EvaluationConfig(tasks=["rotation", "linear"], probe=cfg.probe)
    probes = evaluate_tasks(
        backbone,
        train,
        test,
        evaluation,
        device=resolve_device(cfg.runtime.device),
        seed=cfg.runtime.seed,
    )
    result = {
        "name": model.name,
        "setup": setup,
        "augment": augment.model_dump(mode="json"),
        "final_loss": pretrain.get("final_loss"),
        "rotation_accuracy": probes["rotation"].accuracy,
        "rotation_loss": probes["rotation"].loss,
        "linear_accuracy": probes["linear"].accuracy,
        "linear_loss": probes["linear"].loss,
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def spearman(x: list[float], y: list[float]) -> float:
    return spearman_with_p(x, y)[0]


def spearman_with_p(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (no correlation as the null hypothesis)."""
    from scipy.stats import spearmanr

    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _scatter(results: list[dict[str, Any]], rho: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5), dpi=110)
    xs = [100 * r["rotation_accuracy"] for r in results]
    ys = [100 * r["linear_accuracy"] for r in results]
    if all("rotation_std" in r for r in results):  # pooled over seeds: one std error bars
        x_err = [100 * r["rotation_std"] for r in results]
        y_err = [100 * r["linear_std"] for r in results]
        axes.errorbar(xs, ys, xerr=x_err, yerr=y_err, fmt="o", elinewidth=0.8, capsize=2)
    else:
        axes.scatter(xs, ys)
    for x, y, r in zip(xs, ys, results, strict=True):
        axes.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("rotation accuracy (%, label-free)")
    axes.set_ylabel("supervised linear accuracy (%)")
    title = f"Rotation vs supervised evaluation (Spearman rho = {rho:.3f})"
    if all("rotation_std" in r for r in results):
        title += f"\nmean and 1 std over {len(results[0]['seeds'])} seeds"
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_correlation_study(
    config_path: Path, output: Path, overrides: list[str], workers: int = 1
) -> int:
    cfg = load_config(StudyConfig, config_path, overrides)
    output.mkdir(parents=True, exist_ok=True)
    (output / "study-config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    study = cfg.model_dump(mode="json")
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    os.environ["SELFAUGMENT_THREADS"] = str(threads)
    entries = [model.model_dump(mode="json") for model in cfg.all_models()]
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for entry in entries:
            results.append(_train_and_probe(study, entry, str(output)))
            figures = {key: value for key, value in results[-1].items() if key.endswith("accuracy")}
            print(f"{entry['name']}: {json.dumps(figures)}", file=sys.stderr)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_train_and_probe, study, e, str(output)) for e in entries]
            results = [future.result() for future in futures]
    rho, p_value = spearman_with_p(
        [r["rotation_accuracy"] for r in results], [r["linear_accuracy"] for r in results]
    )
    _scatter(results, rho, output / "correlation.png")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "spearman_rho": rho,
        "spearman_p": p_value,
        "models": len(results),
        "results": results,
    }
    (output / "correlation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"Spearman rho (rotation vs linear) over {len(results)} models: {rho:.3f} "
        f"(p = {p_value:.3g})"
    )
    return 0


def load_study_results(study_dir: Path) -> dict[str, dict[str, Any]]:
    """The models of a finished study (or pooled studies) by name."""
    path = study_dir / "correlation.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a finished `study correlation` folder?)")
    return {entry["name"]: entry for entry in json.loads(path.read_text())["results"]}


def compare_runs(
    study_dir: Path,
    models: list[str],
    runs: dict[str, Path],
    output: Path | None = None,
    against: str | None = None,
) -> dict[str, Any]:
    """Table of rotation and supervised linear accuracy per policy at an equal budget.

    Each row is a model of the study at `study_dir` (same data, network, epochs, seed and
    probes for all), and, where `runs` maps its name to a search run, that run's own final
    model too (retrained by the search, probed on the search's evaluation images): two
    trainings of one policy, which shows how far figures move between runs.
    """
    by_name = load_study_results(study_dir)
    unknown = [
        name for name in [*models, *runs, *([against] if against else [])] if name not in by_name
    ]
    if unknown:
        known = ", ".join(by_name)
        raise ConfigError(f"{study_dir}: no study model named {unknown[0]!r} (models: {known})")
    rows = []
    for name in dict.fromkeys([*models, *runs]):
        entry = by_name[name]
        row: dict[str, Any] = {
            "policy": name,
            "rotation_accuracy": entry["rotation_accuracy"],
            "linear_accuracy": entry["linear_accuracy"],
        }
        for spread in ("rotation_std", "linear_std"):  # a pooled study: std over seeds
            if spread in entry:
                row[spread] = entry[spread]
        if against is not None:
            row["against"] = against
            row["linear_difference"] = _paired_difference(entry, by_name[against])
        if name in runs:
            report = json.loads((runs[name] / "report.json").read_text())
            row["run"] = runs[name].as_posix()
            row["base_policy"] = report.get("base_policy")
            row["run_rotation_accuracy"] = report["final"]["rotation_accuracy"]
            row["run_linear_accuracy"] = report["final"].get("linear_accuracy")
        rows.append(row)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "study": study_dir.as_posix(),
        "rows": rows,
        "markdown": comparison_table(rows),
    }
    if output is not None:
        output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _paired_difference(entry: dict[str, Any], reference: dict[str, Any]) -> list[float]:
    """Linear accuracy minus the reference's, seed by seed (one value for a single study).

    Models of one seed share its probe training, so the paired difference removes what a
    seed does to every model alike."""
    values = entry.get("per_seed_linear", [entry["linear_accuracy"]])
    base = reference.get("per_seed_linear", [reference["linear_accuracy"]])
    return [float(a - b) for a, b in zip(values, base, strict=True)]


def comparison_table(rows: list[dict[str, Any]]) -> str:
    def percent(value: float | None, spread: float | None = None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" + ("" if spread is None else f" ± {100 * spread:.1f}")

    against = next((row["against"] for row in rows if "against" in row), None)
    header = "| policy | rotation accuracy (label-free) | supervised linear accuracy "
    if against is not None:
        header += f"| linear vs {against}, per seed (mean) "
    lines = [header + "| search's own final model: rotation / linear |"]
    lines.append("|---" * (5 if against is not None else 4) + "|")
    for row in rows:
        own = "-"
        if "run" in row:
            own = f"{percent(row['run_rotation_accuracy'])} / {percent(row['run_linear_accuracy'])}"
        rotation = percent(row["rotation_accuracy"], row.get("rotation_std"))
        linear = percent(row["linear_accuracy"], row.get("linear_std"))
        cells = [row["policy"], rotation, linear]
        if against is not None:
            differences = row["linear_difference"]
            mean = sum(differences) / len(differences)
            cells.append(" ".join(f"{100 * d:+.1f}" for d in differences) + f" ({100 * mean:+.1f})")
        lines.append("| " + " | ".join([*cells, own]) + " |")
    return "\n".join(lines)


def run_compare(
    study_dir: Path, models: list[str], output: Path | None, against: str | None = None
) -> int:
    """`selfaugment study compare`: models as NAME or NAME=RUN_DIR."""
    known = load_study_results(study_dir)
    names: list[str] = []
    runs: dict[str, Path] = {}
    for item in models:
        # model names may hold '=' themselves ("RandAugment N=1 M=5"): the run follows the last
        name, run = item, ""
        if item not in known and "=" in item:
            name, _, run = item.rpartition("=")
        names.append(name)
        if run:
            if not (Path(run) / "report.json").is_file():
                raise ConfigError(f"--model {item}: {run}/report.json not found (a finished run?)")
            runs[name] = Path(run)
    summary = compare_runs(study_dir, names, runs, output, against)
    print(summary["markdown"])
    return 0


def pool_studies(studies: list[Path], output: Path) -> dict[str, Any]:
    """Pool studies that differ only in their seed: per model the mean and standard deviation
    of both accuracies, the correlation of the means, and each seed's own correlation.

    The spread between seeds says how much of a ranking is noise: two policies whose linear
    accuracies differ by less than about two standard deviations are not told apart. Two more
    figures read every seed's model as a representation of its own: `rho_all_models`, the rank
    correlation over all of them, and `seed_deviation_pearson`, the correlation between the
    two accuracies' deviations from their model's mean (near 1: when a seed makes a policy's
    model better or worse, rotation accuracy sees it as labels do; near 0: the seed moves
    rotation accuracy without a change the labels see, i.e. noise).
    """
    if len(studies) < 2:
        raise ConfigError("study pool: give at least two study folders (one per seed)")
    loaded = {study: load_study_results(study) for study in studies}
    first, *others = studies
    names = list(loaded[first])
    for study in others:
        if set(loaded[study]) != set(names):
            missing = sorted(set(names) ^ set(loaded[study]))
            raise ConfigError(f"{study}: has other models than {first} ({', '.join(missing)})")
    for name in names:
        setups = {study: _without_seed(loaded[study][name].get("setup")) for study in studies}
        if any(setup is None for setup in setups.values()):
            raise ConfigError(f"model {name!r}: no setup in its result (rerun the study)")
        if any(setup != setups[first] for setup in setups.values()):
            raise ConfigError(f"model {name!r}: the studies differ in more than the seed")

    import numpy as np

    per_study_rho = {}
    for study in studies:
        entries = [loaded[study][name] for name in names]
        per_study_rho[study.as_posix()] = spearman(
            [entry["rotation_accuracy"] for entry in entries],
            [entry["linear_accuracy"] for entry in entries],
        )
    results: list[dict[str, Any]] = []
    for name in names:
        rotation = np.array([loaded[study][name]["rotation_accuracy"] for study in studies])
        linear = np.array([loaded[study][name]["linear_accuracy"] for study in studies])
        results.append(
            {
                "name": name,
                "rotation_accuracy": float(rotation.mean()),
                "linear_accuracy": float(linear.mean()),
                "rotation_std": float(rotation.std(ddof=1)),
                "linear_std": float(linear.std(ddof=1)),
                "seeds": [loaded[study][name]["setup"]["training"]["seed"] for study in studies],
                "per_seed_rotation": rotation.tolist(),
                "per_seed_linear": linear.tolist(),
            }
        )
    rho, p_value = spearman_with_p(
        [r["rotation_accuracy"] for r in results], [r["linear_accuracy"] for r in results]
    )
    every_rotation = np.array([r["per_seed_rotation"] for r in results])  # models x seeds
    every_linear = np.array([r["per_seed_linear"] for r in results])
    rho_all, p_all = spearman_with_p(every_rotation.ravel().tolist(), every_linear.ravel().tolist())
    deviation_pearson = _pearson(
        (every_rotation - every_rotation.mean(1, keepdims=True)).ravel(),
        (every_linear - every_linear.mean(1, keepdims=True)).ravel(),
    )
    output.mkdir(parents=True, exist_ok=True)
    _scatter(results, rho, output / "correlation.png")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "pooled": [study.as_posix() for study in studies],
        "spearman_rho": rho,
        "spearman_p": p_value,
        "per_study_rho": per_study_rho,
        "rho_all_models": rho_all,
        "rho_all_models_p": p_all,
        "seed_deviation_pearson": deviation_pearson,
        "mean_linear_std": float(np.mean([r["linear_std"] for r in results])),
        "mean_rotation_std": float(np.mean([r["rotation_std"] for r in results])),
        "models": len(results),
        "results": results,
    }
    (output / "correlation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pearson(x: Any, y: Any) -> float | None:
    """Pearson correlation of two flat arrays; None when either is constant (undefined)."""
    import numpy as np

    if float(np.std(x)) == 0.0 or float(np.std(y)) == 0.0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _without_seed(setup: dict[str, Any] | None) -> dict[str, Any] | None:
    if setup is None:
        return None
    training = {key: value for key, value in setup["training"].items() if key != "seed"}
    return {**setup, "training": training}


def run_pool(studies: list[Path], output: Path) -> int:
    """`selfaugment study pool`."""
    summary = pool_studies(studies, output)
    for study, rho in summary["per_study_rho"].items():
        print(f"{study}: Spearman rho {rho:.3f}")
    print(
        f"pooled over {len(studies)} seeds: Spearman rho of the means {summary['spearman_rho']:.3f} "
        f"(p = {summary['spearman_p']:.3g}); mean std between seeds: linear "
        f"{100 * summary['mean_linear_std']:.2f} points, rotation "
        f"{100 * summary['mean_rotation_std']:.2f} points"
    )
    deviation = summary["seed_deviation_pearson"]
    print(
        f"every seed's model as a point ({len(studies) * summary['models']} models): Spearman "
        f"rho {summary['rho_all_models']:.3f} (p = {summary['rho_all_models_p']:.3g}); "
        "correlation of the seed-to-seed deviations (rotation vs linear): "
        + ("undefined (no spread)" if deviation is None else f"{deviation:.3f}")
    )
    return 0
