"""The pure planner: spec + results so far -> the tasks that can run next.

Every task of a search is known from the spec alone, with a deterministic id, so the local
runner and the operator agree on names (the operator turns ids into Job names). A task is
done when its result exists in the store; the planner never does I/O.

Stages of the SelfAugment algorithm (Algorithm 1 of Reed et al. 2021), after `prepare`:

    prepare   the dataset prepared once into shards in the shared datasets store (or found
              there); every other task depends on it and opens the dataset by its URI. Only
              for sources read from files (an image folder, an s3:// prefix, a local array
              file); the built-in sources (sklearn:, torchvision:) are loaded directly
    base      one short MoCo run per single transform, rotation-scored (skipped if given);
              with successive halving, in rungs (base_rungs)
    folds     MoCo with the base policy on each fold's training part, rotation head on top
    search    per fold and repeat, TPE over candidate policies scored by forward passes
    merge     union of the top policies of every fold and repeat, de-duplicated
    retrain   MoCo from scratch on all data with the found policy, then evaluation
    report    policy.json, report.json, report.md with plots

SelfRandAugment replaces base/folds/search/merge by `randaugment`: one model per (N, M).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.spec import AugmentSearchSpec

BASE_TRANSFORMS = (
    "RandomResizedCrop",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "AutoContrast",
    "Equalize",
    "Invert",
    "Solarize",
    "Posterize",
    "Contrast",
    "Color",
    "Brightness",
    "Sharpness",
    "Cutout",
)

PREPARE_TASK = "prepare"
#: Sources loaded directly by every task (small, read from the machine's own copy).
BUILTIN_SCHEMES = ("sklearn:", "torchvision:")
STAGES_SELFAUGMENT = ("base", "folds", "search", "merge", "retrain", "report")
STAGES_SELFRANDAUGMENT = ("randaugment", "retrain", "report")
#: Kinds of task whose work needs an accelerator when the spec asks for GPUs.
GPU_KINDS = frozenset({"base", "fold", "search", "randaugment", "retrain"})


@dataclass(frozen=True)
class Task:
    """One unit of work, run by `selfaugment worker run --task ID`."""

    id: str
    kind: str
    stage: str
    params: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "stage": self.stage,
            "params": dict(self.params),
            "depends_on": list(self.depends_on),
        }


@dataclass(frozen=True)
class PlanState:
    """Where a search stands: what is done, what may start now, which stage is current."""

    tasks: tuple[Task, ...]
    done: frozenset[str]
    ready: tuple[Task, ...]
    stage: str
    finished: bool

    @property
    def total(self) -> int:
        return len(self.tasks)

    @property
    def percent(self) -> float:
        return 100.0 * len(self.done) / max(1, len(self.tasks))


def reads_prepared(dataset: DatasetConfig) -> bool:
    """Whether `dataset` is prepared into shards once and read from them (by every task of a
    search, by a Pretrain): any source but the built-in ones, which are small and cheap to load
    directly. Both ways give the same images for the same seed."""
    return not dataset.uri.startswith(BUILTIN_SCHEMES)


#: Ops that leave every image of a 1-channel dataset as it is (saturation of a grey image).
IDENTITY_ON_GREY = frozenset({"Color"})


def identity_ops(spec: AugmentSearchSpec) -> frozenset[str]:
    """Ops that cannot change this dataset's images: left out of the base candidates ('all')
    and of the TPE search space, which would otherwise spend trainings and trials on them."""
    return IDENTITY_ON_GREY if spec.dataset.channels == 1 else frozenset()


def base_candidates(spec: AugmentSearchSpec) -> list[str]:
    """Transforms tried for the base policy, in a fixed order."""
    chosen = spec.search.base_candidates
    if chosen == "all":
        return [name for name in BASE_TRANSFORMS if name not in identity_ops(spec)]
    return list(chosen)


def search_ops(spec: AugmentSearchSpec, op_names: tuple[str, ...]) -> tuple[str, ...]:
    """The ops TPE chooses from: every op but those that are the identity on this data."""
    return tuple(name for name in op_names if name not in identity_ops(spec))


@dataclass(frozen=True)
class Rung:
    """One rung of the base selection: `candidates` trainings, each reaching epoch `epochs`."""

    index: int
    epochs: int
    candidates: int


def base_rungs(spec: AugmentSearchSpec) -> list[Rung]:
    """The rungs of the base-candidate stage; one rung of `base_epochs` when exhaustive.

    Successive halving keeps ceil(n / eta**k) candidates at rung k, until two remain or the
    rungs' epochs (base_epochs // eta**(R-1-k), the last being base_epochs) would fall below
    `min_epochs`; the last rung compares its candidates at the full budget.
    """
    search = spec.search
    count, epochs = len(base_candidates(spec)), search.base_epochs
    selection = search.base_selection
    if selection.method == "exhaustive" or count <= 2:
        return [Rung(0, epochs, count)]
    eta = selection.eta
    by_candidates = 1
    while math.ceil(count / eta**by_candidates) >= 2:
        by_candidates += 1
    by_epochs = 1
    while epochs // eta**by_epochs >= selection.min_epochs:
        by_epochs += 1
    total = min(by_candidates, by_epochs)
    return [
        Rung(k, epochs // eta ** (total - 1 - k), math.ceil(count / eta**k)) for k in range(total)
    ]


def base_task_id(rung: int, slot: int, transform: str, rungs: int) -> str:
    """`base-<transform>` (exhaustive), `base-r0-<transform>`, then `base-r<k>-s<slot>`: a later
    rung's slot s continues the s-th best candidate of the rung before it."""
    if rungs == 1:
        return f"base-{transform.lower()}"
    return f"base-r0-{transform.lower()}" if rung == 0 else f"base-r{rung}-s{slot}"


def randaugment_grid(spec: AugmentSearchSpec) -> list[tuple[int, int]]:
    return [(n, m) for n in spec.search.randaugment.n for m in spec.search.randaugment.m]


def all_tasks(spec: AugmentSearchSpec) -> list[Task]:
    """Every task of the search in execution order, derived from the spec alone."""
    tasks = _algorithm_tasks(spec)
    if not reads_prepared(spec.dataset):
        return tasks
    prepare = Task(PREPARE_TASK, "prepare", "prepare")
    return [prepare] + [
        replace(task, depends_on=(PREPARE_TASK, *task.depends_on)) for task in tasks
    ]


def _algorithm_tasks(spec: AugmentSearchSpec) -> list[Task]:
    search = spec.search
    tasks: list[Task] = []
    if search.algorithm == "selfrandaugment":
        grid_ids = []
        for n, m in randaugment_grid(spec):
            task_id = f"randaugment-n{n}-m{m}"
            grid_ids.append(task_id)
            tasks.append(Task(task_id, "randaugment", "randaugment", {"n": n, "m": m}))
        tasks.append(Task("retrain", "retrain", "retrain", {}, tuple(grid_ids)))
        tasks.append(Task("report", "report", "report", {}, ("retrain", *grid_ids)))
        return tasks

    base_ids: list[str] = []
    if search.base_policy == "auto":
        rungs = base_rungs(spec)
        previous: tuple[str, ...] = ()
        for rung in rungs:
            rung_ids = []
            for slot in range(rung.candidates):
                name = base_candidates(spec)[slot] if rung.index == 0 else ""
                task_id = base_task_id(rung.index, slot, name, len(rungs))
                params: dict[str, Any] = {"rung": rung.index, "epochs": rung.epochs}
                params.update({"transform": name} if rung.index == 0 else {"slot": slot})
                rung_ids.append(task_id)
                tasks.append(Task(task_id, "base", "base", params, previous))
            base_ids.extend(rung_ids)
            previous = tuple(rung_ids)
        for replicate in range(1, search.base_selection.seeds):
            for of in previous:  # the last rung's candidates, trained again with other seeds
                task_id = f"{of}-seed{replicate}"
                params = {"rung": rungs[-1].index, "replicate": replicate, "of": of}
                base_ids.append(task_id)
                tasks.append(Task(task_id, "base", "base", params, (of,)))
    fold_ids = []
    for fold in range(search.folds):
        task_id = f"fold-{fold}"
        fold_ids.append(task_id)
        tasks.append(Task(task_id, "fold", "folds", {"fold": fold}, tuple(base_ids)))
    search_ids = []
    for fold in range(search.folds):
        for repeat in range(search.repeats):
            task_id = f"search-f{fold}-r{repeat}"
            search_ids.append(task_id)
            # Normalising the minimax objective needs every fold's base-policy losses.
            tasks.append(
                Task(task_id, "search", "search", {"fold": fold, "repeat": repeat}, tuple(fold_ids))
            )
    tasks.append(Task("merge", "merge", "merge", {}, tuple(search_ids)))
    tasks.append(Task("retrain", "retrain", "retrain", {}, ("merge",)))
    report_deps = ("retrain", "merge", *base_ids, *fold_ids, *search_ids)
    tasks.append(Task("report", "report", "report", {}, report_deps))
    return tasks


def plan(spec: AugmentSearchSpec, done_ids: Mapping[str, Any] | set[str]) -> PlanState:
    """The state of a search given the ids of the tasks whose results exist."""
    tasks = all_tasks(spec)
    known = {task.id for task in tasks}
    done = frozenset(task_id for task_id in done_ids if task_id in known)
    ready = tuple(
        task
        for task in tasks
        if task.id not in done and all(dep in done for dep in task.depends_on)
    )
    current = "done"
    for stage in stages(spec):
        if any(task.stage == stage and task.id not in done for task in tasks):
            current = stage
            break
    return PlanState(
        tasks=tuple(tasks), done=done, ready=ready, stage=current, finished=current == "done"
    )


def stages(spec: AugmentSearchSpec) -> tuple[str, ...]:
    """The stages of this search in order."""
    first = ("prepare",) if reads_prepared(spec.dataset) else ()
    if spec.search.algorithm == "selfrandaugment":
        return first + STAGES_SELFRANDAUGMENT
    return first + STAGES_SELFAUGMENT


def stages_between(spec: AugmentSearchSpec, before: str | None, after: str) -> list[str]:
    """Stages entered after `before` and left before `after` (both exclusive), in order."""
    order = stages(spec)
    if before not in order or after not in (*order, "done"):
        return []
    end = order.index(after) if after in order else len(order)
    return list(order[order.index(before) + 1 : end])


def task_by_id(spec: AugmentSearchSpec, task_id: str) -> Task:
    for task in all_tasks(spec):
        if task.id == task_id:
            return task
    raise KeyError(f"no task {task_id!r} in this search (see `selfaugment status`)")
