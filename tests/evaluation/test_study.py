"""`selfaugment study correlation` and `study compare` on real data (scikit-learn's digits).

Models are tiny (width-4 ResNet-18, 1 epoch on 160 images) so the study runs in seconds; the
figures are not meaningful, the mechanics are: one result per model, resume without retraining,
extra models with a policy file, Spearman's rho and p-value, the scatter plot, the comparison
table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scipy.stats import spearmanr

from selfaugment.cli import main
from selfaugment.trainer.config import ConfigError, parse_config
from selfaugment.trainer.evaluation.study import StudyConfig, spearman_with_p

TINY = {
    "dataset": {"uri": "sklearn:digits", "image_size": 16, "channels": 1, "limit": 160},
    "model": {"arch": "resnet18", "width": 4, "cifar_stem": True},
    "moco": {"dim": 16, "queue_size": 128, "head_batchnorm": True},
    "optim": {"epochs": 1, "batch_size": 64, "lr": 0.06},
    "probe": {"epochs": 1, "batch_size": 128},
    "runtime": {"seed": 0, "progress": False},
    "models": [
        {"name": "crop+flip", "policy": "none"},
        {"name": "no augmentation", "crop": False, "flip": False},
        {"name": "Solarize only", "base": "Solarize", "crop": False, "flip": False},
    ],
}


def test_study_trains_probes_correlates_and_resumes(tmp_path: Path) -> None:
    policy = tmp_path / "found.json"
    policy.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "name": "found",
                "sub_policies": [[{"op": "Contrast", "p": 0.8, "magnitude": 0.5}]],
            }
        )
    )
    config = {**TINY, "extra_models": [{"name": "found policy", "policy": str(policy)}]}
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    assert main(["study", "correlation", "-f", str(config_path), "-o", str(out)]) == 0

    summary = json.loads((out / "correlation.json").read_text())
    names = [entry["name"] for entry in summary["results"]]
    assert names == ["crop+flip", "no augmentation", "Solarize only", "found policy"]
    assert summary["models"] == 4
    for entry in summary["results"]:
        assert 0.0 <= entry["rotation_accuracy"] <= 1.0
        assert 0.0 <= entry["linear_accuracy"] <= 1.0
    found = summary["results"][-1]
    assert found["augment"]["policy"] == str(policy)
    rotation = [entry["rotation_accuracy"] for entry in summary["results"]]
    linear = [entry["linear_accuracy"] for entry in summary["results"]]
    expected = spearmanr(rotation, linear)
    assert summary["spearman_rho"] == pytest.approx(float(expected.statistic), nan_ok=True)
    assert summary["spearman_p"] == pytest.approx(float(expected.pvalue), nan_ok=True)
    assert (out / "correlation.png").stat().st_size > 1000
    assert json.loads((out / "study-config.json").read_text())["extra_models"][0]["name"] == (
        "found policy"
    )

    # Rerunning reuses every model's result instead of training again.
    results = sorted((out / "models").glob("*/result.json"))
    assert len(results) == 4
    stamps = {path: path.stat().st_mtime_ns for path in results}
    checkpoints = {path.parent / "checkpoint.pt" for path in results}
    for checkpoint in checkpoints:
        checkpoint.unlink()  # a retrained model would write its checkpoint again
    assert main(["study", "correlation", "-f", str(config_path), "-o", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in results} == stamps
    assert not any(checkpoint.exists() for checkpoint in checkpoints)
    assert json.loads((out / "correlation.json").read_text())["results"] == summary["results"]


def test_changed_probes_reprobe_without_retraining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {**TINY, "models": TINY["models"][:2]}
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    assert main(["study", "correlation", "-f", str(config_path), "-o", str(out)]) == 0
    checkpoints = sorted((out / "models").glob("*/checkpoint.pt"))
    stamps = {path: path.stat().st_mtime_ns for path in checkpoints}
    first = json.loads((out / "correlation.json").read_text())["results"]

    # More probe epochs: the stored results no longer match, the trained models still do.
    config["probe"] = {**config["probe"], "epochs": 3}
    config_path.write_text(yaml.safe_dump(config))
    assert main(["study", "correlation", "-f", str(config_path), "-o", str(out)]) == 0
    second = json.loads((out / "correlation.json").read_text())["results"]
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == stamps
    assert [entry["setup"]["probes"]["probe"]["epochs"] for entry in second] == [3, 3]
    assert [entry["final_loss"] for entry in second] == [entry["final_loss"] for entry in first]
    assert [entry["setup"]["training"] for entry in second] == [
        entry["setup"]["training"] for entry in first
    ]

    # Another seed is another model: refused in this folder (naming the model), not mixed in.
    config["runtime"] = {**config["runtime"], "seed": 1}
    config_path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["study", "correlation", "-f", str(config_path), "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert "models/crop-flip/checkpoint.pt: was written with a different config" in error
    assert "runtime.seed" in error


def test_model_names_must_give_distinct_result_folders() -> None:
    config = {**TINY, "extra_models": [{"name": "Crop+Flip", "policy": "mocov2"}]}
    with pytest.raises(
        ConfigError, match=r"models\[3\]\.name: 'Crop\+Flip' clashes with 'crop\+flip'"
    ):
        parse_config(StudyConfig, config, "study.yaml")


def test_spearman_with_p_matches_known_values() -> None:
    rho, p_value = spearman_with_p([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert rho == pytest.approx(0.8)
    assert p_value == pytest.approx(0.104, abs=1e-3)
    rho, _ = spearman_with_p([1, 2, 3], [3, 2, 1])
    assert rho == pytest.approx(-1.0)


def test_study_compare_puts_each_search_run_beside_its_study_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study"
    study.mkdir()
    results = [
        {"name": "base", "rotation_accuracy": 0.70, "linear_accuracy": 0.741},
        {"name": "mocov2-style", "rotation_accuracy": 0.78, "linear_accuracy": 0.77},
        {"name": "minimax", "rotation_accuracy": 0.75, "linear_accuracy": 0.765},
        {"name": "RandAugment N=1 M=5", "rotation_accuracy": 0.72, "linear_accuracy": 0.76},
    ]
    (study / "correlation.json").write_text(json.dumps({"results": results}))
    run = tmp_path / "run"
    run.mkdir()
    final = {"rotation_accuracy": 0.763, "linear_accuracy": 0.772}
    (run / "report.json").write_text(json.dumps({"final": final, "base_policy": "Solarize"}))
    output = tmp_path / "table.json"
    models = ["--model", "mocov2-style", "--model", "base", "--model", f"minimax={run}"]
    models += ["--model", "RandAugment N=1 M=5", "--model", f"RandAugment N=1 M=5={run}"]
    assert main(["study", "compare", str(study), *models, "-o", str(output)]) == 0
    summary = json.loads(output.read_text())
    policies = [row["policy"] for row in summary["rows"]]
    assert policies == ["mocov2-style", "base", "minimax", "RandAugment N=1 M=5"]
    assert summary["rows"][3]["run"] == run.as_posix()
    assert summary["rows"][2]["base_policy"] == "Solarize"
    lines = summary["markdown"].splitlines()
    assert lines[2] == "| mocov2-style | 78.0% | 77.0% | - |"
    assert lines[4] == "| minimax | 75.0% | 76.5% | 76.3% / 77.2% |"
    assert capsys.readouterr().out.strip() == summary["markdown"]

    # Unknown names and unfinished runs are refused, naming them.
    assert main(["study", "compare", str(study), "--model", "Mocov2"]) == 2
    assert "no study model named 'Mocov2' (models: base, mocov2-style, minimax, Rand" in (
        capsys.readouterr().err
    )
    assert main(["study", "compare", str(study), "--model", f"base={tmp_path}"]) == 2
    assert "report.json not found" in capsys.readouterr().err


def _fake_study(folder: Path, seed: int, figures: dict[str, tuple[float, float]]) -> Path:
    """A finished study folder as `study correlation` writes it (no training)."""
    folder.mkdir()
    results = [
        {
            "name": name,
            "setup": {"training": {"augment": name, "seed": seed}, "probes": {"epochs": 30}},
            "rotation_accuracy": rotation,
            "linear_accuracy": linear,
        }
        for name, (rotation, linear) in figures.items()
    ]
    (folder / "correlation.json").write_text(json.dumps({"results": results}))
    return folder


def test_study_pool_averages_seeds_and_reports_their_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed0 = _fake_study(
        tmp_path / "s0", 0, {"a": (0.70, 0.72), "b": (0.75, 0.74), "c": (0.80, 0.73)}
    )
    seed1 = _fake_study(
        tmp_path / "s1", 1, {"a": (0.72, 0.70), "b": (0.73, 0.79), "c": (0.82, 0.76)}
    )
    out = tmp_path / "pooled"
    assert main(["study", "pool", str(seed0), str(seed1), "-o", str(out)]) == 0
    summary = json.loads((out / "correlation.json").read_text())
    by_name = {entry["name"]: entry for entry in summary["results"]}
    assert by_name["c"]["linear_accuracy"] == pytest.approx(0.745)
    assert by_name["c"]["linear_std"] == pytest.approx(0.0212132, abs=1e-6)  # sample std
    assert by_name["a"]["seeds"] == [0, 1]
    assert summary["per_study_rho"] == {
        seed0.as_posix(): pytest.approx(0.5),
        seed1.as_posix(): pytest.approx(0.5),
    }
    # means: rotation a < b < c, linear a < c < b
    assert summary["spearman_rho"] == pytest.approx(0.5)
    assert (out / "correlation.png").stat().st_size > 1000
    # Every seed's model a point: rotation ranks 1 4 5 2 3 6, linear 2 4 3 1 6 5 (a0 b0 c0 a1
    # b1 c1), sum d^2 = 16, rho = 1 - 6 * 16 / (6 * 35).
    assert summary["rho_all_models"] == pytest.approx(1 - 96 / 210)
    # Deviations from each model's mean: rotation (-1 +1 | +1 -1 | -1 +1), linear
    # (+1 -1 | -2.5 +2.5 | -1.5 +1.5) points: r = (-2 - 5 + 3) / sqrt(6 * 19).
    assert summary["seed_deviation_pearson"] == pytest.approx(-4 / 114**0.5)
    printed = capsys.readouterr().out
    assert "Spearman rho of the means 0.500" in printed
    assert "every seed's model as a point (6 models): Spearman rho 0.543" in printed
    assert "correlation of the seed-to-seed deviations (rotation vs linear): -0.375" in printed
    # Two seeds with the same figures have no spread: the deviation correlation is undefined.
    same = {"a": (0.70, 0.72), "b": (0.75, 0.74), "c": (0.80, 0.73)}
    twins = [_fake_study(tmp_path / f"twin{seed}", seed, same) for seed in (0, 1)]
    assert main(["study", "pool", *map(str, twins), "-o", str(tmp_path / "twins")]) == 0
    assert "deviations (rotation vs linear): undefined (no spread)" in capsys.readouterr().out
    twins_summary = json.loads((tmp_path / "twins" / "correlation.json").read_text())
    assert twins_summary["seed_deviation_pearson"] is None
    # `study compare` reads a pooled folder too, with the spread between seeds, and pairs
    # models seed by seed (c - a: 0.73 - 0.72 and 0.76 - 0.70)
    assert main(["study", "compare", str(out), "--model", "c", "--against", "a"]) == 0
    assert "| c | 81.0% ± 1.4 | 74.5% ± 2.1 | +1.0 +6.0 (+3.5) | - |" in capsys.readouterr().out
    assert main(["study", "compare", str(out), "--model", "c", "--against", "z"]) == 2
    assert "no study model named 'z'" in capsys.readouterr().err

    # Studies that differ in more than the seed, or in their models, are not pooled.
    other = _fake_study(tmp_path / "s2", 2, {"a": (0.7, 0.7), "b": (0.7, 0.7), "d": (0.7, 0.7)})
    assert main(["study", "pool", str(seed0), str(other), "-o", str(out)]) == 2
    assert "has other models than" in capsys.readouterr().err
    changed = json.loads((seed1 / "correlation.json").read_text())
    changed["results"][0]["setup"]["probes"]["epochs"] = 5
    (seed1 / "correlation.json").write_text(json.dumps(changed))
    assert main(["study", "pool", str(seed0), str(seed1), "-o", str(out)]) == 2
    assert "model 'a': the studies differ in more than the seed" in capsys.readouterr().err
