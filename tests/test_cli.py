"""The command line, in-process: pretrain -> eval, policy commands, clear errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from selfaugment.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = [
    "dataset.image_size=16",
    "dataset.channels=1",
    "dataset.limit=192",
    "model.width=4",
    "moco.dim=16",
    "moco.queue_size=64",
    "optim.epochs=1",
    "optim.batch_size=64",
    "evaluation.probe.epochs=2",
    "runtime.progress=false",
]


def _sets(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def test_pretrain_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pretrain"
    overrides = [*TINY, "augment.policy=mocov2", "optim.epochs=2", "runtime.progress=true"]
    assert main(["pretrain", "-o", str(out), *_sets(overrides)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]  # one line per epoch
    assert "img/s" in lines[0] and lines[-1].endswith("eta 0m00s")
    result = json.loads((out / "pretrain.json").read_text())
    assert result["schema_version"] == 1
    assert 0.0 <= result["evaluation"]["rotation"]["accuracy"] <= 1.0
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()

    evaluation = tmp_path / "eval"
    overrides = ["dataset.image_size=16", "dataset.channels=1", "dataset.limit=192"]
    overrides += ["evaluation.tasks=[rotation, linear, jigsaw]", "evaluation.probe.epochs=2"]
    code = main(
        [
            "eval",
            "--checkpoint",
            str(out / "checkpoint.pt"),
            "-o",
            str(evaluation),
            *_sets(overrides),
        ]
    )
    assert code == 0
    report = json.loads((evaluation / "eval.json").read_text())
    assert report["schema_version"] == 1
    assert set(report["tasks"]) == {"rotation", "linear", "jigsaw"}


def test_bad_config_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  epochs: 0\nmodel:\n  arch: resnet9\n")
    assert main(["pretrain", "-f", str(config), "-o", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "optim.epochs" in error and "model.arch" in error and "'resnet18'" in error
    assert "Traceback" not in error


def test_pretrain_and_search_read_a_whole_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-f` takes the resource's manifest as well as a bare spec: a camelCase Pretrain runs
    locally (its operator-only fields are validated, not used); a manifest of the other kind,
    or with a bad field, is one clear error naming it."""
    manifest = {
        "apiVersion": "selfaugment.io/v1alpha1",
        "kind": "Pretrain",
        "metadata": {"name": "tiny"},
        "spec": {
            "dataset": {"imageSize": 16, "channels": 1, "limit": 128},
            "model": {"width": 4},
            "moco": {"dim": 16, "queueSize": 64},
            "optim": {"epochs": 1, "batchSize": 64},
            "evaluation": {"probe": {"epochs": 1}},
            "runtime": {"progress": False},
            "resources": {"cpu": 4, "memory": "2Gi"},
            "storage": {"uri": "s3://selfaugment/pretrains/tiny"},
        },
    }
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    assert (
        main(["pretrain", "-f", str(config), "-o", str(out), "--set", "model.cifarStem=true"]) == 0
    )
    assert (out / "checkpoint.pt").exists()
    assert main(["search", "-f", str(config), "-o", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err
    assert "kind: 'Pretrain' is not AugmentSearch" in error and "Traceback" not in error
    search = yaml.safe_load((EXAMPLES / "augmentsearch.yaml").read_text())
    search["spec"]["search"]["trails"] = 10
    config.write_text(yaml.safe_dump(search))
    assert main(["search", "-f", str(config), "-o", str(tmp_path / "s")]) == 2
    assert f"{config}: spec: search.trails: unknown field" in capsys.readouterr().err


def test_policy_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policies = sorted(EXAMPLES.glob("*policy*.json"))
    assert policies
    assert main(["policy", "validate", *map(str, policies)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"schema_version": 1, "sub_policies": [[{"op": "Rotat", "p": 1.5, "magnitude": 0.2}]]}'
    )
    assert main(["policy", "validate", str(bad)]) == 1
    assert "Rotat" in capsys.readouterr().err

    assert main(["policy", "show", "mocov2"]) == 0
    assert "Brightness" in capsys.readouterr().out

    grid = tmp_path / "grid.png"
    args = ["policy", "render", "mocov2", "-o", str(grid), "--images", "3", "--samples", "4"]
    assert main([*args, "--image-size", "16"]) == 0
    with Image.open(grid) as image:
        assert image.width >= 5 * 64 and image.height >= 3 * 64


def test_verbose_logging_never_shows_credentials(s3_server: str) -> None:
    """`selfaugment -v status` on a run in S3 (moto): our debug logs, but no access key ID,
    secret or request signature (HTTP client libraries may log request headers at DEBUG)."""
    import boto3

    from selfaugment.trainer.spec import AugmentSearchSpec
    from selfaugment.trainer.store import open_store
    from selfaugment.trainer.store.layout import prepare_run

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    raw = yaml.safe_load((EXAMPLES / "search-smoke.yaml").read_text())
    prepare_run(open_store("s3://runs/verbose"), AugmentSearchSpec.model_validate(raw))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "selfaugment"), "-v", "status", "s3://runs/verbose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "stage: base" in done.stdout
    for secret in ("test-access-key", "test-secret-key", "Signature=", "AWS4-HMAC-SHA256"):
        assert secret not in done.stdout + done.stderr, secret
