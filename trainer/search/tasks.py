"""Workers: run one task of a search (`selfaugment worker run --task ID`).

A worker reads the spec and its inputs from the artifact store, works in a local directory
(the store's own directory when the store is local, so a killed training run resumes from its
last checkpoint), uploads its artifacts and writes `result.json` last: the result's existence
is what marks the task done. What each kind of task does is in stages.py.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from selfaugment import RESULT_SCHEMA_VERSION
from selfaugment.trainer.data import StreamedImages
from selfaugment.trainer.search.context import (
    ProgressWriter,
    TaskContext,
    TaskInputError,
    skipped_record,
    work_directory,
)
from selfaugment.trainer.search.planner import task_by_id
from selfaugment.trainer.search.scratch import SCRATCH_CHECKPOINT
from selfaugment.trainer.search.stages import RUNNERS
from selfaugment.trainer.store import ArtifactStore
from selfaugment.trainer.store.artifacts import remove_temporary_files
from selfaugment.trainer.store.layout import (
    done_task_ids,
    load_spec,
    progress_key,
    result_key,
    spec_digest,
    task_key,
)
from selfaugment.trainer.store.records import TaskFields

log = logging.getLogger(__name__)


def run_task(store: ArtifactStore, task_id: str) -> dict[str, Any]:
    """Run one task of the search stored in `store` and write its result."""
    spec = load_spec(store)
    try:
        task = task_by_id(spec, task_id)
    except KeyError as error:
        raise TaskInputError(str(error.args[0])) from None
    done = done_task_ids(store)
    if task.id in done:
        log.info("task %s is already done", task.id)
        return dict(store.read_json(result_key(task.id)))
    missing = [dep for dep in task.depends_on if dep not in done]
    if missing:
        raise TaskInputError(f"task {task.id} cannot start: unfinished {', '.join(missing)}")
    workdir = work_directory(store, f"tasks/{task.id}/work", spec_digest(spec))
    for leftover in remove_temporary_files(workdir):
        log.info("removed %s, left by a killed write", leftover)
    ctx = TaskContext(
        spec=spec,
        store=store,
        task=task,
        workdir=workdir,
        progress=ProgressWriter(store, progress_key(task.id)),
    )
    started = time.time()
    log.info("task %s (%s) starting", task.id, task.kind)
    record = RUNNERS[task.kind](ctx)
    fields: TaskFields = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "task": task.id,
        "kind": task.kind,
        "stage": task.stage,
        "seconds": round(time.time() - started, 2),
    }
    result: dict[str, Any] = {**record, **fields}
    if ctx.loaded_data is not None:  # how this task held its dataset (memory_budget decides)
        result["data"] = {
            "images": len(ctx.loaded_data),
            "path": "streamed" if isinstance(ctx.loaded_data, StreamedImages) else "in memory",
        }
    skipped = getattr(ctx.loaded_data, "skipped", None)  # a prepared dataset: see `prepare`
    if skipped and "skipped_images" not in result:
        result["skipped_images"] = skipped_record(skipped)
    store.write_json(result_key(task.id), result)
    log.info("task %s done in %.1f s", task.id, result["seconds"])
    if store.local_path(result_key(task.id)) is None:  # S3: the scratch files are done with
        store.delete(task_key(task.id, SCRATCH_CHECKPOINT))
        shutil.rmtree(workdir, ignore_errors=True)
    return result
