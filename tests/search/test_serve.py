"""`selfaugment worker serve` (trainer/search/serve.py) on its own: the protocol, the logs, and
the end of a worker after a failed task. In-process, on a real local store."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfaugment.errors import EXIT_BAD_INPUT
from selfaugment.trainer.config import load_config
from selfaugment.trainer.search.serve import serve
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.layout import prepare_run, result_key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@contextlib.contextmanager
def real_output(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """pytest's capture off (the worker redirects the real file descriptors 1 and 2), and the
    package's log records to stderr, as `selfaugment`'s CLI sets them up."""
    with capsys.disabled():
        handler = logging.StreamHandler(sys.stderr)
        logger = logging.getLogger("selfaugment")
        logger.addHandler(handler)
        level, logger.level = logger.level, logging.INFO
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _store(tmp_path: Path):
    spec = load_config(AugmentSearchSpec, EXAMPLES / "search-smoke.yaml", [])
    store = open_store(tmp_path / "run")
    prepare_run(store, spec)
    return store


def _requests(tmp_path: Path, *tasks: str) -> io.StringIO:
    lines = [json.dumps({"task": task, "log": str(tmp_path / f"{task}.log")}) for task in tasks]
    return io.StringIO("\n".join(lines) + "\n")


def test_a_task_that_cannot_start_is_answered_and_ends_the_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task whose inputs are missing answers EXIT_BAD_INPUT (what `worker run` exits with),
    its error goes to its own log, and the worker takes no further task (a retry gets a fresh
    process)."""
    store, answers = _store(tmp_path), io.StringIO()
    with real_output(capsys):
        code = serve(store, _requests(tmp_path, "fold-0", "no-such-task"), answers)
    assert code == EXIT_BAD_INPUT
    assert [json.loads(line) for line in answers.getvalue().splitlines()] == [
        {"task": "fold-0", "code": EXIT_BAD_INPUT}
    ]
    log = (tmp_path / "fold-0.log").read_text()
    assert "selfaugment: error: task fold-0 cannot start: unfinished" in log
    assert not (tmp_path / "no-such-task.log").exists()


def test_tasks_run_in_turn_until_the_requests_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tasks in turn in one worker, each answered 0 with its output in its own log; the end
    of the requests ends the worker with 0. (The tasks are finished ones, which a worker
    answers from their results.)"""
    store, answers = _store(tmp_path), io.StringIO()
    finished = ("base-r0-rotate", "base-r0-invert")
    for task in finished:
        store.write_json(result_key(task), {"task": task, "rotation_accuracy": 0.5})
    with real_output(capsys):
        code = serve(store, _requests(tmp_path, *finished, finished[0]), answers)
    assert code == 0
    assert [json.loads(line) for line in answers.getvalue().splitlines()] == [
        {"task": task, "code": 0} for task in (*finished, finished[0])
    ]
    for task in finished:
        log = (tmp_path / f"{task}.log").read_text()
        assert f"task {task} is already done" in log
        assert finished[1 - finished.index(task)] not in log
    assert (tmp_path / "base-r0-rotate.log").read_text().count("already done") == 2
