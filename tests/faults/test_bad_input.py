"""Bad input fails fast, once, with the field named: checked before any task starts (the spec
model and the preflight), and a worker that fails on its input is not retried.

Each case runs the real CLI (`selfaugment search`) in this process on the bundled digits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfaugment.cli import main
from selfaugment.trainer.search.planner import all_tasks
from selfaugment.trainer.search.runner import (
    LocalRunner,
    RunningTask,
    TaskFailedError,
    WorkerProcess,
)
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store

REPO = Path(__file__).resolve().parents[2]


def _smoke() -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "examples" / "search-smoke.yaml").read_text())
    raw["dataset"]["limit"] = 400
    return raw


def _one_error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI: it must exit 2 with exactly one `selfaugment: error:` line and no traceback."""
    code = main(list(argv))
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error, error
    (line,) = [line for line in error.splitlines() if line.startswith("selfaugment: error:")]
    return line


CASES = {
    "negative seed": (("search", "seed", -1), "search.seed"),
    "seed beyond 2**32": (("search", "seed", 2**64), "search.seed"),
    "empty dataset uri": (("dataset", "uri", ""), "dataset.uri"),
    "missing dataset path": (("dataset", "uri", "/nonexistent/images"), "/nonexistent/images"),
    "batch larger than a fold": (("optim", "batchSize", 512), "optim.batch_size=512"),
    "huge queue": (("moco", "queueSize", 2**40), "moco.queueSize"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_any_task_naming_the_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (section, field, value), named = CASES[case]
    raw = _smoke()
    raw.setdefault(section, {})[field] = value
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    line = _one_error_line(capsys, "search", "-f", str(config), "-o", str(tmp_path / "run"))
    assert named in line, line
    assert not (tmp_path / "run" / "tasks").exists()  # no task started


@pytest.mark.parametrize("serving", [False, True], ids=["fresh worker", "serving worker"])
@pytest.mark.parametrize(("exit_code", "retried"), [(2, False), (1, True)])
def test_a_task_that_fails_on_its_input_is_not_retried(
    exit_code: int, retried: bool, serving: bool, tmp_path: Path
) -> None:
    """Exit code 2 (`selfaugment` on a SelfAugmentError) stops the run at once; any other
    failure is retried up to parallelism.max_retries. A fresh worker says so by its exit
    status, a serving one by its answer (trainer/search/serve.py); a stand-in process plays
    the worker."""
    spec = AugmentSearchSpec.model_validate(_smoke())
    assert spec.parallelism.max_retries >= 1
    runner = LocalRunner(
        spec, open_store(tmp_path / "run"), workers=1, log_dir=tmp_path / "logs", progress=False
    )
    task = all_tasks(spec)[0]
    log_path = tmp_path / "worker.log"
    log = log_path.open("ab")
    if serving:
        answer = json.dumps({"task": task.id, "code": exit_code})
        script = f"import sys; print({answer!r}, flush=True); sys.exit({exit_code})"
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        process.wait()
    else:
        script = f"import sys; print('bad input'); sys.exit({exit_code})"
        process = subprocess.Popen([sys.executable, "-c", script], stdout=log)
        process.wait()
    worker = WorkerProcess(process, None, log, serving)
    runner.running[task.id] = RunningTask(task, worker, log_path, time.monotonic())
    runner.attempts[task.id] = 1
    if retried:
        runner._reap()  # logged, to be started again
        assert task.id not in runner.running
    else:
        with pytest.raises(
            TaskFailedError, match="failed on its input \\(not retried\\)"
        ) as failed:
            runner._reap()
        # a serving worker's own log (what it printed outside its tasks) is named too
        assert (f"its worker's own: {log_path}" in str(failed.value)) is serving
    assert log.closed and not runner.idle  # a worker whose task failed is not kept


UNREADABLE = {
    "boolean as a number": (b"search:\n  trials: true\n", "search: trials: expected a number"),
    "boolean schema version": (b"schema_version: true\n", "schema_version: expected a number"),
    "repeated key": (b"search:\n  trials: 3\n  trials: 4\n", "line 3: key 'trials' appears twice"),
    "not UTF-8": (b"search:\n  trials: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 18)"),
    "nested too deeply": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    "number of 5,000 digits": (b"search:\n  trials: " + b"9" * 5000 + b"\n", "4300 digits"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_config_is_one_line_naming_the_file(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, named = UNREADABLE[case]
    config = tmp_path / "search.yaml"
    config.write_bytes(text)
    line = _one_error_line(capsys, "search", "-f", str(config), "-o", str(tmp_path / "run"))
    assert str(config) in line and named in line, line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (b'{"schema_version": 1, "name": "a", "name": "b", "sub_policies": []}', "appears twice"),
        (b'{"name": "\xff"}', "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"schema_version": ' + b"1" * 5000 + b"}", "4300 digits"),
    ],
    ids=["repeated key", "not UTF-8", "nested too deeply", "number of 5,000 digits"],
)
def test_unreadable_policies_are_named_and_validation_goes_on(
    text: bytes, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy validate` of several files reports each bad one in a line and checks the rest."""
    bad, good = tmp_path / "bad.json", REPO / "examples" / "mocov2-policy.json"
    bad.write_bytes(text)
    code = main(["policy", "validate", str(bad), str(good)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code != 0 and "Traceback" not in output, output
    assert any(str(bad) in line and named in line for line in output.splitlines()), output
    assert str(good) in output  # the good file after the bad one was still validated


def test_a_changed_spec_is_refused_naming_the_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfaugment.trainer.store.layout import prepare_run

    stored = AugmentSearchSpec.model_validate(_smoke())
    prepare_run(open_store(tmp_path / "run"), stored)
    changed = _smoke()
    changed["search"]["trials"] = 40
    changed["moco"]["temperature"] = 0.1
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(changed))
    line = _one_error_line(capsys, "search", "-f", str(config), "-o", str(tmp_path / "run"))
    assert "search.trials: stored 20, given 40" in line
    assert "moco.temperature: stored 0.2, given 0.1" in line


def test_a_stored_spec_that_no_longer_validates_is_named_by_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text('{"search": {"folds": 0}}')
    line = _one_error_line(capsys, "status", str(run))
    assert "spec.json" in line and "search.folds" in line


class Payload:
    """An arbitrary Python object inside a .pt file."""


def test_eval_of_a_file_that_is_not_a_checkpoint_never_suggests_unsafe_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    pickled = tmp_path / "objects.pt"
    torch.save({"kind": "other", "payload": Payload()}, pickled)  # a class weights_only refuses
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    for path in (pickled, text):
        code = main(["eval", "--checkpoint", str(path), "-o", str(tmp_path / "out")])
        error = capsys.readouterr().err
        assert code == 2, error
        (line,) = [line for line in error.splitlines() if line.startswith("selfaugment: error:")]
        assert str(path) in line and "not a SelfAugment checkpoint" in line, error
        assert "weights_only" not in error and "Traceback" not in error


@pytest.mark.parametrize("option", ["--images", "--samples"])
def test_policy_render_needs_at_least_one_image_and_sample(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = REPO / "examples" / "mocov2-policy.json"
    with pytest.raises(SystemExit) as exited:
        main(["policy", "render", str(policy), "-o", str(tmp_path / "grid.png"), option, "0"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {option}: must be at least 1, got 0" in error
    assert not (tmp_path / "grid.png").exists()


def test_linear_evaluation_of_a_one_class_dataset_is_refused() -> None:
    """Any head scores 100% on one class: an error that says so, not linear accuracy 1.0."""
    import torch

    from selfaugment.trainer.config import ModelConfig, ProbeConfig
    from selfaugment.trainer.evaluation.probes import ProbeError, train_probe
    from selfaugment.trainer.moco.models import build_backbone

    images = torch.randint(0, 256, (48, 1, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(48, dtype=torch.long)
    with pytest.raises(ProbeError, match="needs at least 2 classes, but scans has 1"):
        train_probe(
            build_backbone(ModelConfig(width=8), 1),
            "linear",
            images[:32],
            images[32:],
            ProbeConfig(epochs=1),
            train_labels=labels[:32],
            test_labels=labels[32:],
            dataset_name="scans",
        )
