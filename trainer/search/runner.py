"""The local executor: runs a search's tasks in `selfaugment worker` processes on this machine.

The loop is: list the finished tasks in the store, ask the planner what may start, start it in
a free slot (a CPU slot, or a GPU slot with CUDA_VISIBLE_DEVICES set), repeat. A slot's worker
process runs task after task (`worker serve`, trainer/search/serve.py), or with
`--fresh-workers` one task each (`worker run`). Interrupting the run kills the running workers;
running the same command again resumes, redoing only their tasks.

Workers die with their runner however it stops: Ctrl-C and SIGTERM (`timeout`, systemd,
`docker stop`) stop them in an orderly way, and on Linux each worker asks the kernel for SIGTERM
when its runner dies (PR_SET_PDEATHSIG), which covers SIGKILL and the OOM killer. A run holds its
store's lock (trainer/store/lock.py: a flock, or a renewed lease in S3) while it runs, so a
second runner cannot start its tasks again; a runner whose S3 lease is taken over stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from selfaugment.errors import EXIT_BAD_INPUT, SelfAugmentError
from selfaugment.trainer.metrics import STAGES, SearchMetrics, create_metrics
from selfaugment.trainer.search.planner import GPU_KINDS, PREPARE_TASK, PlanState, Task, plan
from selfaugment.trainer.search.status import describe_skipped, summarise
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactStore
from selfaugment.trainer.store.artifacts import remove_temporary_files
from selfaugment.trainer.store.layout import (
    done_task_ids,
    prepare_run,
    read_progress,
    result_key,
)
from selfaugment.trainer.store.lock import LOCK_NAME, RunLock, hold_run_lock


class TaskFailedError(SelfAugmentError):
    """A task failed more often than `parallelism.max_retries` allows."""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """In a new worker, before it runs: SIGTERM when `parent` (the runner) dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the orderly stop still applies
        return
    if os.getppid() != parent:  # the runner died before prctl took effect
        os._exit(1)


class Terminated(KeyboardInterrupt):
    """The runner received SIGTERM: stop like Ctrl-C (workers stopped, resumable)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@dataclass
class WorkerProcess:
    """A worker: `selfaugment worker serve`, which runs the tasks the runner sends it in turn
    (trainer/search/serve.py), or with fresh workers one `selfaugment worker run`."""

    process: subprocess.Popen[bytes]
    gpu: int | None
    output: IO[bytes]  # where its stdout and stderr go (between tasks, for a serving worker)
    serving: bool


@dataclass
class RunningTask:
    task: Task
    worker: WorkerProcess
    log_path: Path
    started: float

    @property
    def gpu(self) -> int | None:
        return self.worker.gpu


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _answer(worker: WorkerProcess) -> int | None:
    """A serving worker's exit status for its task, once it answered or died; else None."""
    stdout = worker.process.stdout
    assert stdout is not None  # serving workers are started with a pipe
    readable, _, _ = select.select([stdout], [], [], 0.0)
    if readable:
        line = stdout.readline()
        if line:
            try:
                return int(json.loads(line)["code"])
            except (ValueError, KeyError, TypeError):
                worker.process.kill()  # not the protocol: no longer to be trusted
        return worker.process.wait() or 1  # it ended without answering: a crash
    ended = worker.process.poll()
    return None if ended is None else (ended or 1)


def _close_stream(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):  # a pipe whose reader died: nothing left to flush
            stream.close()


def _close(worker: WorkerProcess, grace: float = 10.0) -> None:
    """End a worker: an idle serving one at the end of its stdin, any other with SIGTERM;
    SIGKILL after ``grace`` seconds."""
    if worker.process.poll() is None:
        if worker.serving:
            _close_stream(worker.process.stdin)
        else:
            worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()
    _close_stream(worker.process.stdin)
    _close_stream(worker.process.stdout)
    worker.output.close()


class LocalRunner:
    """Run every task of a search with at most `workers` processes at once.

    Workers serve task after task (``reuse_workers``, the default: trainer/search/serve.py
    says what that saves); with ``reuse_workers=False`` every task runs in a fresh
    `selfaugment worker run` process, as the operator's Jobs do.
    """

    def __init__(
        self,
        spec: AugmentSearchSpec,
        store: ArtifactStore,
        *,
        workers: int,
        log_dir: Path,
        run_name: str = "search",
        metrics: SearchMetrics | None = None,
        gpus: list[int] | None = None,
        progress: bool = True,
        poll_seconds: float = 0.5,
        store_env: dict[str, str] | None = None,
        reuse_workers: bool = True,
    ) -> None:
        self.spec = spec
        self.store = store
        self.workers = max(1, workers)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.metrics = metrics or create_metrics()
        self.gpus = gpus if gpus is not None else []
        self.progress = progress
        self.poll_seconds = poll_seconds
        self.store_env = store_env or {}
        self.reuse_workers = reuse_workers
        self.running: dict[str, RunningTask] = {}
        self.idle: list[WorkerProcess] = []
        self.attempts: Counter[str] = Counter()
        self.task_seconds: list[float] = []
        self._bars: Any = None
        self._last_view: tuple[int, int, str, str] | None = None
        self._started_workers = 0

    # -- processes -------------------------------------------------------------------------
    def _threads_per_worker(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)

    def _free_gpu(self) -> int | None:
        busy = {running.gpu for running in self.running.values()}
        return next((gpu for gpu in self.gpus if gpu not in busy), None)

    def _spawn(self, arguments: list[str], gpu: int | None, output: IO[bytes]) -> WorkerProcess:
        env = dict(os.environ, **self.store_env)
        threads = str(self._threads_per_worker())
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, SELFAUGMENT_THREADS=threads)
        env["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpu is not None else ""
        command = [sys.executable, "-m", "selfaugment.cli", "worker", *arguments]
        command += ["--store", self.store.uri]
        serving = arguments[0] == "serve"
        runner = os.getpid()
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if serving else subprocess.DEVNULL,
            stdout=subprocess.PIPE if serving else output,
            stderr=output,
            env=env,
            preexec_fn=(lambda: _die_with(runner)) if sys.platform == "linux" else None,
        )
        self._started_workers += 1
        return WorkerProcess(process, gpu, output, serving)

    def _serving_worker(self, gpu: int | None) -> WorkerProcess:
        """An idle serving worker for ``gpu`` (None: the CPU), or a new one; an idle worker of
        another device makes room when the runner holds `workers` processes."""
        for worker in self.idle:
            if worker.gpu == gpu:
                self.idle.remove(worker)
                if worker.process.poll() is None:
                    return worker
                _close(worker)  # it died while idle (killed from outside): replace it
                break
        while self.idle and len(self.idle) + len(self.running) >= self.workers:
            _close(self.idle.pop(0))
        name = f"worker-{self._started_workers + 1}.log"
        return self._spawn(["serve"], gpu, (self.log_dir / name).open("ab"))

    def _start(self, task: Task) -> bool:
        wants_gpu = bool(self.gpus) and self.spec.resources.gpus > 0 and task.kind in GPU_KINDS
        gpu = self._free_gpu() if wants_gpu else None
        if wants_gpu and gpu is None:
            return False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{task.id}.log"
        if self.reuse_workers:
            worker = self._serving_worker(gpu)
            request = json.dumps({"task": task.id, "log": str(log_path.resolve())})
            assert worker.process.stdin is not None
            try:
                worker.process.stdin.write(request.encode() + b"\n")
                worker.process.stdin.flush()
            except OSError:  # it died between the check and the request: the next pass retries
                _close(worker)
                return False
        else:
            worker = self._spawn(["run", "--task", task.id], gpu, log_path.open("ab"))
        self.running[task.id] = RunningTask(task, worker, log_path, time.monotonic())
        self.attempts[task.id] += 1
        if self.attempts[task.id] > 1:
            self.metrics.task_retries.labels("local", self.run_name).inc()
        return True

    def _finished(self, running: RunningTask) -> int | None:
        """The task's exit status once it is over, else None."""
        if running.worker.serving:
            return _answer(running.worker)
        return running.worker.process.poll()

    def _reap(self) -> None:
        for task_id, running in list(self.running.items()):
            code = self._finished(running)
            if code is None:
                continue
            del self.running[task_id]
            if code == 0 and running.worker.serving:
                self.idle.append(running.worker)
            else:  # a serving worker ends after a failure: the retry starts a fresh one
                _close(running.worker)
            if code == 0:
                self.task_seconds.append(time.monotonic() - running.started)
                if task_id == PREPARE_TASK:
                    self._announce_skipped()
                continue
            self.metrics.task_failures.labels("local", self.run_name).inc()
            logs = f"log: {running.log_path}"
            if running.worker.serving:  # what a worker prints outside its tasks goes there
                logs += f" (its worker's own: {running.worker.output.name})"
            if code == EXIT_BAD_INPUT:  # the same input fails the same way: no retry
                self.stop()
                raise TaskFailedError(
                    f"task {task_id} failed on its input (not retried); {logs}\n"
                    f"{_log_tail(running.log_path)}"
                )
            if self.attempts[task_id] > self.spec.parallelism.max_retries:
                self.stop()
                raise TaskFailedError(
                    f"task {task_id} failed {self.attempts[task_id]} times (exit code {code}); "
                    f"{logs}\n{_log_tail(running.log_path)}"
                )
            self._write(f"task {task_id} failed (exit code {code}), retrying; {logs}")

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a serving worker answers first."""
        pipes = [
            running.worker.process.stdout
            for running in self.running.values()
            if running.worker.serving and running.worker.process.stdout is not None
        ]
        if pipes:
            select.select(pipes, [], [], seconds)
        else:
            time.sleep(seconds)

    def stop(self) -> None:
        """Terminate the workers (the tasks they were running will be redone on resume)."""
        workers = [running.worker for running in self.running.values()] + self.idle
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in workers:
            _close(worker, grace=max(0.1, deadline - time.monotonic()))
        self.running.clear()
        self.idle.clear()

    def _retire(self) -> None:
        """End the idle workers at the end of a run: all their stdins closed first, so that
        they shut down at the same time, then each waited for."""
        for worker in self.idle:
            _close_stream(worker.process.stdin)
        while self.idle:
            _close(self.idle.pop())

    # -- progress and metrics --------------------------------------------------------------
    def _announce_skipped(self) -> None:
        """Name the unreadable images the `prepare` task left out (once, as it finishes)."""
        result = self.store.read_json(result_key(PREPARE_TASK))
        skipped = result.get("skipped_images")
        if skipped:
            self._write(f"dataset {self.spec.dataset.uri}: skipped {describe_skipped(skipped)}")

    def _write(self, message: str) -> None:
        if self._bars is not None:
            self._bars.write(message)
        else:
            print(message, file=sys.stderr)

    def _report(self, state: PlanState) -> None:
        labels = ("local", self.run_name)
        done = len(state.done)
        self.metrics.search_progress.labels(*labels).set(done / max(1, state.total))
        for stage in STAGES:
            self.metrics.search_stage.labels(*labels, stage).set(1 if stage == state.stage else 0)
        self.metrics.tasks.labels(*labels, "succeeded").set(done)
        self.metrics.tasks.labels(*labels, "running").set(len(self.running))
        self.metrics.tasks.labels(*labels, "pending").set(state.total - done - len(self.running))
        if self.task_seconds:
            remaining = state.total - done
            mean = sum(self.task_seconds) / len(self.task_seconds)
            self.metrics.search_eta.labels(*labels).set(remaining * mean / self.workers)
        details = []
        for task_id in sorted(self.running):
            figures = read_progress(self.store, task_id)
            if "epoch" in figures:
                self.metrics.train_epoch.labels(*labels, task_id).set(figures["epoch"])
                if figures.get("loss") is not None:
                    self.metrics.train_loss.labels(*labels, task_id).set(figures["loss"])
                details.append(f"{task_id} epoch {figures['epoch']}/{figures.get('epochs', '?')}")
            elif "shards_done" in figures:
                details.append(
                    f"{task_id} shard {figures['shards_done']}/{figures.get('shards_total', '?')}"
                )
            elif "trials_done" in figures:
                details.append(
                    f"{task_id} trial {figures['trials_done']}/{figures.get('trials_total', '?')}"
                )
            else:
                details.append(task_id)
        view = (done, state.total, state.stage, " | ".join(details)[:120])
        if self._bars is not None and view != self._last_view:
            self._last_view = view
            self._bars.n = done
            self._bars.total = state.total
            self._bars.set_description(f"stage {state.stage}", refresh=False)
            self._bars.set_postfix_str(view[3], refresh=False)
            self._bars.refresh()

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> PlanState:
        """Run the search to the end (or resume it). Returns the final plan state."""
        try:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread: the caller owns the signals
            previous = None
        try:
            with hold_run_lock(self.store) as lock:
                prepare_run(self.store, self.spec)
                self._remove_leftovers()
                return self._run(lock)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _remove_leftovers(self) -> None:
        """Temporary files of writes that a kill interrupted (no one else writes: we hold the
        lock). S3 runs keep theirs in each worker's work directory, which the worker sweeps."""
        marker = self.store.local_path(LOCK_NAME)
        if marker is None:
            return
        removed = remove_temporary_files(marker.parent)
        if removed:
            self._write(f"removed {len(removed)} temporary file(s) left by interrupted writes")

    def _run(self, lock: RunLock) -> PlanState:
        if self.progress:
            from tqdm import tqdm

            self._bars = tqdm(total=1, unit="task", dynamic_ncols=True, file=sys.stderr)
        last_done: set[str] = set()
        try:
            while True:
                lock.check()
                self._reap()
                done = done_task_ids(self.store)
                if done != last_done:
                    self.metrics.last_progress.labels("local", self.run_name).set(time.time())
                    last_done = done
                state = plan(self.spec, done)
                self._report(state)
                if state.finished:
                    summary = summarise(self.store, self.spec)
                    if summary.best_objective is not None:
                        self.metrics.best_objective.labels("local", self.run_name).set(
                            summary.best_objective
                        )
                    self.metrics.trials_done.labels("local", self.run_name).set(summary.trials_done)
                    return state
                for task in state.ready:
                    if len(self.running) >= self.workers:
                        break
                    if task.id not in self.running:
                        self._start(task)
                if not self.running and not state.ready:
                    raise TaskFailedError(
                        f"search is stuck in stage {state.stage}: no task can run"
                    )
                self._wait(self.poll_seconds)
        except BaseException:
            self.stop()
            raise
        finally:
            self._retire()
            if self._bars is not None:
                self._bars.close()
                self._bars = None
