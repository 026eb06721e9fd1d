"""`selfaugment worker serve`: one worker process runs several tasks of a local search in turn.

A task started in a fresh process pays for the interpreter, torch's import (and torch._dynamo's,
which torch.optim imports), numba's kernels and the dataset before its first epoch: about 3 s
of process start and 1.5 s of setup at the example's scale, where a base task's two epochs take
3 s (docs/cost.md). So the local runner keeps its workers: it writes a task on a worker's stdin,
the worker runs it with its output going to that task's log, and answers with one line on its
stdout. The protocol is one JSON object per line:

    runner -> worker   {"task": "base-r0-Rotate", "log": "/path/to/logs/base-r0-Rotate.log"}
    worker -> runner   {"task": "base-r0-Rotate", "code": 0}

``code`` is the exit status `selfaugment worker run` would have had (0, EXIT_BAD_INPUT for bad
input, 1 for any other error). A task that fails ends its worker, so that a retry starts in a
fresh process; the end of stdin ends it too. Each task starts from the torch seed a fresh process
has (tasks seed what they draw, this only keeps an unseeded draw from depending on the tasks
before it). The operator's Jobs run one task per pod (`worker run`), as before.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from selfaugment.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, error_line
from selfaugment.trainer.store import ArtifactStore


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (the file descriptors: logging, print, native
    libraries) to the end of ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def run_one(store: ArtifactStore, task_id: str, log: Path, torch_seed: int) -> int:
    """Run ``task_id`` with its output appended to ``log``; its exit status as `worker run`'s."""
    import torch

    from selfaugment.trainer.search.tasks import run_task

    torch.manual_seed(torch_seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    with _output_to(log):
        try:
            run_task(store, task_id)
            code = 0
        except BAD_INPUT_ERRORS as error:
            print(error_line(error), file=sys.stderr)
            code = EXIT_BAD_INPUT
        except Exception:  # reported in the task's log, as `worker run` would report it
            traceback.print_exc()
            code = 1
    gc.collect()
    if torch.cuda.is_initialized():  # hand the task's cached blocks back for the next one
        torch.cuda.empty_cache()
    return code


def serve(store: ArtifactStore, requests: IO[str], answers: IO[str]) -> int:
    """Run the tasks named on ``requests`` until it ends or one fails; answer each on
    ``answers``. Returns the last task's exit status (0 at the end of ``requests``)."""
    import torch

    torch_seed = torch.initial_seed()  # what an unseeded fresh process starts from
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        code = run_one(store, str(request["task"]), Path(request["log"]), torch_seed)
        answers.write(json.dumps({"task": request["task"], "code": code}) + "\n")
        answers.flush()
        if code != 0:
            return code
    return 0


def serve_stdio(store: ArtifactStore) -> int:
    """``serve`` on this process's stdin and stdout. Answers go to a copy of the stdout
    descriptor, and stdout itself to stderr (the worker's own log), so that nothing a library
    prints between tasks can break a line of the protocol."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    with answers:
        return serve(store, sys.stdin, answers)
