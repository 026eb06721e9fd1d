"""The stages of SelfAugment (Algorithm 1): what each kind of task does, one function per kind.

base (one short MoCo run per candidate transform), fold (MoCo on a fold's training part, its
rotation head), search (TPE over candidate policies on the held-out part), merge (the union of
the folds' top policies), randaugment (SelfRandAugment's grid), retrain (the found policy on all
data) and report. `RUNNERS` maps a task's kind to its function.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from selfaugment.trainer.config import (
    AugmentConfig,
    EvaluationConfig,
    PretrainConfig,
)
from selfaugment.trainer.data import (
    Images,
    ImageSet,
    StreamedImages,
    load_dataset,
    open_images,
    prepare_dataset,
    resident,
)
from selfaugment.trainer.moco.checkpoint import save_checkpoint
from selfaugment.trainer.policy.views import CROP_TRANSFORM, base_augment
from selfaugment.trainer.search import base_selection
from selfaugment.trainer.search.context import (
    ProgressWriter,
    TaskContext,
    TaskInputError,
    skipped_record,
)
from selfaugment.trainer.search.planner import base_rungs, reads_prepared, search_ops
from selfaugment.trainer.search.scratch import SCRATCH_CHECKPOINT, CheckpointMirror
from selfaugment.trainer.search.tpe import TrialRecord, sample_matches_policy
from selfaugment.trainer.spec import AugmentSearchSpec
from selfaugment.trainer.store import ArtifactNotFoundError
from selfaugment.trainer.store.artifacts import atomic_write
from selfaugment.trainer.store.layout import (
    POLICY_KEY,
    datasets_store,
    task_key,
)
from selfaugment.trainer.store.records import (
    BaseResult,
    FoldResult,
    MergeResult,
    RandAugmentResult,
    RetrainResult,
    SearchResult,
)

log = logging.getLogger(__name__)


# -- shared steps ------------------------------------------------------------------------
def stage_pretrain_config(
    ctx: TaskContext,
    augment: AugmentConfig,
    epochs: int,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
) -> PretrainConfig:
    spec = ctx.spec
    optim = spec.optim.model_copy(
        update={
            "epochs": epochs,
            "batch_size": batch_size or spec.optim.batch_size,
            "lr": lr or spec.optim.lr,
        }
    )
    runtime = spec.runtime.model_copy(update={"seed": spec.search.seed if seed is None else seed})
    return PretrainConfig(
        dataset=spec.dataset,
        model=spec.model,
        moco=spec.moco,
        optim=optim,
        augment=augment,
        runtime=runtime,
        evaluation=EvaluationConfig(tasks=[]),
    )


def train_moco(
    ctx: TaskContext,
    cfg: PretrainConfig,
    images: ImageSet | StreamedImages,
    *,
    stop_epoch: int | None = None,
    continue_from: Path | None = None,
) -> tuple[dict, Path]:
    """Train (or resume) MoCo in the task's work directory; returns (result, checkpoint).

    `continue_from`: a checkpoint of the same config (an earlier rung's) to go on from, unless
    this task already has a checkpoint of its own; `stop_epoch`: stop there (see train_moco)."""
    from selfaugment.trainer.evaluation.pretrained import run_pretrain

    output = ctx.workdir / "pretrain"
    checkpoint = output / "checkpoint.pt"
    mirror = CheckpointMirror(
        ctx.store,
        task_key(ctx.task.id, SCRATCH_CHECKPOINT),
        checkpoint,
        cfg.runtime.checkpoint_every,
    )
    mirror.restore()  # a preempted attempt's progress comes first
    if continue_from is not None and not checkpoint.exists():
        output.mkdir(parents=True, exist_ok=True)
        with open(continue_from, "rb") as source:
            atomic_write(checkpoint, lambda file: shutil.copyfileobj(source, file, 2**20))
    epochs = stop_epoch or cfg.optim.epochs
    ctx.progress.update(force=True, epoch=0, epochs=epochs)
    on_epoch = mirror.wrap(epoch_reporter(ctx.progress, epochs))
    result = run_pretrain(
        cfg,
        output,
        images=images,
        progress_callback=on_epoch,
        stop_epoch=stop_epoch,
        on_checkpoint=mirror.upload,
    )
    return result, checkpoint


def epoch_reporter(progress: ProgressWriter, epochs: int) -> Callable[[dict[str, Any]], None]:
    """Per epoch: a log line (the worker's log, `kubectl logs`) and the task's progress.json."""
    from selfaugment.trainer.moco.pretrain import epoch_logger

    log_epoch = epoch_logger(epochs, log.info)

    def on_epoch(figures: dict[str, Any]) -> None:
        log_epoch(figures)
        progress.update(epoch=figures.get("epoch"), epochs=epochs, loss=figures.get("loss"))

    return on_epoch


def train_and_probe_rotation(
    ctx: TaskContext,
    augment: AugmentConfig,
    epochs: int,
    fold: int,
    *,
    stop_epoch: int | None = None,
    continue_from: Path | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], Path, Any, Any]:
    """MoCo on the fold's training part, then a rotation head scored on its held-out part.

    `seed`: the training and probe seed (the search's seed unless a replicate sets another).
    Returns (pretrain result, checkpoint, frozen backbone, rotation ProbeResult).
    """
    from selfaugment.trainer.evaluation.probes import train_probe
    from selfaugment.trainer.moco.checkpoint import load_backbone

    seed = ctx.seed if seed is None else seed
    train, heldout = ctx.fold_data(fold)
    cfg = stage_pretrain_config(ctx, augment, epochs, seed=seed)
    pretrain, checkpoint = train_moco(
        ctx, cfg, train, stop_epoch=stop_epoch, continue_from=continue_from
    )
    backbone, _ = load_backbone(checkpoint)
    probe = train_probe(
        backbone,
        "rotation",
        ctx.resident(train, 0.5).images,
        ctx.resident(heldout, 0.5).images,
        ctx.spec.evaluation,
        device=_device(ctx),
        seed=seed,
    )
    return pretrain, checkpoint, backbone, probe


def select_base(spec: AugmentSearchSpec, results: dict[str, dict[str, Any]]) -> str:
    """The base transform (see base_selection.py); TaskInputError when none has run."""
    try:
        return base_selection.select_base(spec, results)
    except base_selection.NoBaseResultsError as error:
        raise TaskInputError(str(error)) from None


def fold_augment(ctx: TaskContext, base: str, policy: str = "none") -> AugmentConfig:
    return base_augment(base, ctx.spec.augment, policy)


# -- task kinds --------------------------------------------------------------------------
def run_prepare(ctx: TaskContext) -> dict[str, Any]:
    """The dataset prepared into the shared datasets store (found there when another task,
    search or Pretrain prepared it; a rerun of a killed preparation keeps its shards)."""
    dataset = ctx.spec.dataset

    def on_shard(done: int, total: int) -> None:
        ctx.progress.update(force=done == total, shards_done=done, shards_total=total)

    prepared = prepare_dataset(
        dataset, datasets_store(ctx.store), dataset.prepared_size, progress=on_shard
    )
    report = prepared.report
    result: dict[str, Any] = {
        "prepared": {
            "uri": prepared.uri,
            "key": prepared.key,
            "count": prepared.count,
            "source_count": int(prepared.index["source_count"]),
            "digest": prepared.index["digest"],
            "storage_size": prepared.storage_size,
            "shards": len(prepared.index["shards"]),
            "bytes": sum(int(shard["bytes"]) for shard in prepared.index["shards"]),
            "reused": bool(report and report.reused),
            "shards_built": report.shards_built if report else 0,
        }
    }
    if prepared.skipped:
        result["skipped_images"] = skipped_record(prepared.skipped)
    log.info(
        "dataset %s: %d images (%s)",
        prepared.uri,
        prepared.count,
        "reused" if result["prepared"]["reused"] else "prepared",
    )
    return result


def run_base(ctx: TaskContext) -> BaseResult:
    """A short MoCo run with a single transform (p = 1), scored by held-out rotation.

    Exhaustive selection trains each candidate for `base_epochs` at once. Successive halving
    trains rung 0 per candidate; a later rung's slot s continues the s-th best candidate of the
    rung before from that task's checkpoint, to its rung's epoch of the same schedule.
    """
    rungs = base_rungs(ctx.spec)
    params = ctx.task.params
    rung = int(params.get("rung", 0))
    replicate = int(params.get("replicate", 0))
    stop_epoch = rungs[rung].epochs
    continue_from: Path | None = None
    source: str | None = None
    if replicate:  # the same candidate as `of`, trained from scratch with another seed
        transform = str(ctx.results("base-")[str(params["of"])]["transform"])
    elif rung == 0:
        transform = str(params["transform"])
    else:
        slot = int(params["slot"])
        base_results = ctx.results("base-")  # one read of the store, not one per candidate
        # the rung before's candidates (the task also depends on `prepare` for file sources)
        earlier = [base_results[t] for t in ctx.task.depends_on if t.startswith("base-")]
        ranked = base_selection.rank_candidates(earlier)
        transform, source = str(ranked[slot]["transform"]), str(ranked[slot]["task"])
        continue_from = ctx.fetch(source, "checkpoint.pt")
    seed = replicate_seed(ctx.seed, replicate)
    augment = base_augment(transform, ctx.spec.augment.model_copy(update={"flip": False}))
    pretrain, checkpoint, _, probe = train_and_probe_rotation(
        ctx,
        augment,
        ctx.spec.search.base_epochs,
        0,
        stop_epoch=stop_epoch,
        continue_from=continue_from,
        seed=seed,
    )
    result: BaseResult = {
        "transform": transform,
        "rotation_accuracy": probe.accuracy,
        "rotation_loss": probe.loss,
        "final_loss": pretrain.get("final_loss"),
        "loss_history": pretrain.get("loss_history", []),
        "rung": rung,
        "epochs": stop_epoch,
        "continued_from": source,
        "seed": seed,
        "heldout_images": len(ctx.splits[0][1]),  # the fold's held-out indices: no copy
    }
    if rung + 1 < len(rungs) and not replicate:  # the next rung may go on from it
        ctx.upload(checkpoint, "checkpoint.pt")
    return result


def replicate_seed(seed: int, replicate: int) -> int:
    """The training seed of a base candidate's replicate (0: the search's own seed)."""
    return (seed + 1_000_003 * replicate) % 2**32


def run_fold(ctx: TaskContext) -> FoldResult:
    """MoCo with the base policy on the fold's training part; heads; base-policy losses."""
    from selfaugment.trainer.evaluation.probes import train_probe

    fold = int(ctx.task.params["fold"])
    base = select_base(ctx.spec, ctx.results("base-"))
    augment = fold_augment(ctx, base)
    pretrain, checkpoint, backbone, rotation = train_and_probe_rotation(
        ctx, augment, ctx.spec.search.fold_epochs, fold
    )
    train, heldout = ctx.fold_data(fold)
    heads = {"rotation": rotation.head_state}
    linear_accuracy: float | None = None
    if ctx.spec.search.objective == "supervised":
        if not train.has_labels:
            raise TaskInputError(
                f"search.objective 'supervised' needs labels, but {ctx.spec.dataset.uri} has none"
            )
        probe_train, probe_test = ctx.resident(train, 0.5), ctx.resident(heldout, 0.5)
        linear = train_probe(
            backbone,
            "linear",
            probe_train.images,
            probe_test.images,
            ctx.spec.evaluation,
            train_labels=probe_train.labels,
            test_labels=probe_test.labels,
            num_classes=train.num_classes,
            device=_device(ctx),
            seed=ctx.seed,
        )
        heads["linear"] = linear.head_state
        linear_accuracy = linear.accuracy
    heads_path = ctx.workdir / "heads.pt"
    save_checkpoint(heads_path, heads)
    scorer = _scorer(ctx, checkpoint, heads, ctx.scoring_images(heldout), base)
    result: FoldResult = {
        "fold": fold,
        "base_policy": base,
        "rotation_accuracy": rotation.accuracy,
        "rotation_loss": rotation.loss,
        "final_loss": pretrain.get("final_loss"),
        "loss_history": pretrain.get("loss_history", []),
        "base_losses": scorer.score(None).to_dict(),
        "checkpoint": ctx.upload(checkpoint, "checkpoint.pt"),
    }
    if linear_accuracy is not None:
        result["linear_accuracy"] = linear_accuracy
    ctx.upload(heads_path, "heads.pt")
    return result


def run_search(ctx: TaskContext) -> SearchResult:
    """T repeats of TPE per fold: this task is one (fold, repeat)."""
    from selfaugment.trainer.search.tpe import Normalisers, objective_value, run_tpe, top_trials

    search = ctx.spec.search
    fold, repeat = int(ctx.task.params["fold"]), int(ctx.task.params["repeat"])
    folds = ctx.results("fold-")
    if len(folds) != search.folds:
        raise TaskInputError(f"search needs all {search.folds} fold results, found {len(folds)}")
    normalisers = Normalisers(
        rotation_loss=sum(r["base_losses"]["rotation_loss"] for r in folds.values()) / len(folds),
        infonce=sum(r["base_losses"]["infonce"] for r in folds.values()) / len(folds),
    )
    fold_id = f"fold-{fold}"
    base = folds[fold_id]["base_policy"]
    checkpoint = ctx.fetch(fold_id, "checkpoint.pt")
    heads = torch.load(ctx.fetch(fold_id, "heads.pt"), map_location="cpu", weights_only=True)
    _, heldout = ctx.fold_data(fold)
    scorer = _scorer(ctx, checkpoint, heads, ctx.scoring_images(heldout), base)
    from selfaugment.trainer.augment.ops import OP_NAMES
    from selfaugment.trainer.policy import Policy

    trials_key = task_key(ctx.task.id, "trials.json")
    previous = _finished_trials(ctx, trials_key)
    kept = list(previous)
    best: list[float] = []
    for record in previous:
        best.append(min([record.objective, *best[-1:]]))
    if previous:
        log.info("resuming the search from %d finished trials", len(previous))
    # progress.json from the start, as training tasks write it: a task killed before its
    # first trial's figures (or between its trials.json and them) is still named by status
    ctx.progress.update(
        force=True,
        trials_done=len(previous),
        trials_total=search.trials,
        **({"best_objective": best[-1]} if best else {}),
    )

    total_images = int(scorer.images.shape[0])
    race = _race(ctx, normalisers, previous, total_images)

    def score(policy_json: dict[str, Any]) -> dict[str, float]:
        losses = dict(scorer.score(Policy.from_json(policy_json), race).to_dict())
        if race is not None and losses.get("images", total_images) >= total_images:
            race.finished.append(
                objective_value(search.objective, losses, normalisers, search.weights)
            )
        return losses

    def on_trial(record: TrialRecord) -> None:
        kept.append(record)
        ctx.store.write_json(trials_key, [trial.to_dict() for trial in kept])  # kept as they end
        best.append(min([record.objective, *best[-1:]]))
        ctx.progress.update(
            trials_done=record.index + 1, trials_total=search.trials, best_objective=best[-1]
        )

    records = run_tpe(
        score,
        op_names=search_ops(ctx.spec, OP_NAMES),
        sub_policies=search.sub_policies,
        ops_per_sub_policy=search.ops_per_sub_policy,
        trials=search.trials,
        startup_trials=search.startup_trials,
        objective=search.objective,
        normalisers=normalisers,
        weights=search.weights,
        seed=search.seed * 1000 + fold * 10 + repeat,
        name_prefix=f"f{fold}-r{repeat}",
        on_trial=on_trial,
        previous=previous,
    )
    top = top_trials(records, search.top_policies)
    ctx.store.write_json(trials_key, [record.to_dict() for record in records])
    scored = [int(record.losses.get("images", total_images)) for record in records]
    return {
        "fold": fold,
        "repeat": repeat,
        "objective": search.objective,
        "normalisers": {"rotation_loss": normalisers.rotation_loss, "infonce": normalisers.infonce},
        "trials_done": len(records),
        "best_objective": top[0].objective if top else None,
        "objective_history": [record.objective for record in records],
        "top": [record.to_dict() for record in top],
        "racing": {
            "enabled": race is not None,
            "stopped_early": sum(count < total_images for count in scored),
            "images_scored": sum(scored),
            "images_in_full": total_images * len(records),
        },
    }


def _race(
    ctx: TaskContext, normalisers: Any, previous: list[TrialRecord], total_images: int
) -> Any:
    """The race of this search's candidates (None unless `search.racing.enabled`)."""
    from selfaugment.trainer.search.tpe import ObjectiveRace

    search = ctx.spec.search
    if not search.racing.enabled:
        return None
    race = ObjectiveRace(
        search.objective,
        normalisers,
        search.weights,
        top=search.top_policies,
        z=search.racing.z,
        min_fraction=search.racing.min_fraction,
    )
    race.finished = [  # kept trials scored in full (a stopped one has fewer images)
        record.objective
        for record in previous
        if record.losses.get("images", total_images) >= total_images
    ]
    return race


def _finished_trials(ctx: TaskContext, key: str) -> list[TrialRecord]:
    """The trials a killed run of this task kept; none when there are none or they are unusable."""
    try:
        stored = ctx.store.read_json(key)
    except ArtifactNotFoundError:
        return []
    try:
        records = [TrialRecord.from_dict(trial) for trial in stored][: ctx.spec.search.trials]
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        log.warning("%s: unusable (%s); the search starts again", ctx.store.url(key), error)
        return []
    from selfaugment.trainer.augment.ops import OP_NAMES

    ops = search_ops(ctx.spec, OP_NAMES)
    if [record.index for record in records] != list(range(len(records))) or not all(
        record.sample and sample_matches_policy(record, ops) for record in records
    ):
        log.warning("%s: not a prefix of this search; the search starts again", ctx.store.url(key))
        return []
    return records


def run_merge(ctx: TaskContext) -> MergeResult:
    """Union of the top policies of every fold and repeat, de-duplicated."""
    from selfaugment.trainer.policy import Policy, expected_strength, merge

    searches = ctx.results("search-")
    candidates = [
        Policy.from_json(trial["policy"], source=f"{task_id} trial {trial['index']}")
        for task_id, result in sorted(searches.items())
        for trial in result["top"]
    ]
    merged = merge(candidates, name=f"selfaugment-{ctx.spec.search.objective}")
    ctx.store.write_bytes(POLICY_KEY, merged.to_json().encode())
    return {
        "candidates": len(candidates),
        "sub_policies": len(merged.sub_policies),
        "policy_uri": ctx.store.url(POLICY_KEY),
        "policy_summary": expected_strength(merged),
    }


def run_randaugment(ctx: TaskContext) -> RandAugmentResult:
    """SelfRandAugment: one model per (N, M), scored by held-out rotation."""
    n, m = int(ctx.task.params["n"]), int(ctx.task.params["m"])
    augment = fold_augment(ctx, CROP_TRANSFORM, f"randaugment:{n}:{m}")
    pretrain, _, _, probe = train_and_probe_rotation(ctx, augment, ctx.spec.search.fold_epochs, 0)
    return {
        "n": n,
        "m": m,
        "rotation_accuracy": probe.accuracy,
        "rotation_loss": probe.loss,
        "final_loss": pretrain.get("final_loss"),
    }


def run_retrain(ctx: TaskContext) -> RetrainResult:
    """MoCo from scratch on all data with the found policy, then rotation (+ linear) eval."""
    from selfaugment.trainer.evaluation.probes import evaluate_tasks
    from selfaugment.trainer.moco.checkpoint import load_backbone
    from selfaugment.trainer.policy.builtins import randaugment_as_policy
    from selfaugment.trainer.policy.model import RandAugment

    spec = ctx.spec
    if spec.search.algorithm == "selfrandaugment":
        grid = ctx.results("randaugment-")
        best = max(grid.values(), key=lambda r: (r["rotation_accuracy"], -r["rotation_loss"]))
        policy_name = f"randaugment:{best['n']}:{best['m']}"
        augment = fold_augment(ctx, CROP_TRANSFORM, policy_name)
        # policy.json as for SelfAugment: the same distribution as explicit sub-policies
        explicit = randaugment_as_policy(RandAugment(int(best["n"]), int(best["m"])))
        ctx.store.write_bytes(POLICY_KEY, explicit.to_json().encode())
    else:
        policy_path = ctx.workdir / "policy.json"
        policy_path.write_bytes(ctx.store.read_bytes(POLICY_KEY))
        policy_name = ctx.store.url(POLICY_KEY)
        base = select_base(spec, ctx.results("base-"))
        augment = fold_augment(ctx, base, str(policy_path))
    cfg = stage_pretrain_config(
        ctx, augment, spec.retrain.epochs, batch_size=spec.retrain.batch_size, lr=spec.retrain.lr
    )
    pretrain, checkpoint = train_moco(ctx, cfg, ctx.data)
    backbone, _ = load_backbone(checkpoint)
    test = _evaluation_images(ctx)
    labelled = ctx.data.has_labels and (test is None or test.labels is not None)
    if labelled and (ctx.data.num_classes or 0) < 2:
        log.warning("%s has one class: no linear evaluation", spec.dataset.uri)
        labelled = False
    tasks: list[Any] = ["rotation", "linear"] if labelled else ["rotation"]
    evaluation = EvaluationConfig(tasks=tasks, probe=spec.evaluation)
    probes = evaluate_tasks(
        backbone,
        ctx.data,
        test,
        evaluation,
        device=_device(ctx),
        seed=ctx.seed,
        memory_budget=spec.dataset.memory_budget_bytes,
    )
    result: RetrainResult = {
        "policy": policy_name,
        "augment": augment.model_dump(mode="json"),
        "final_loss": pretrain.get("final_loss"),
        "loss_history": pretrain.get("loss_history", []),
        "checkpoint": ctx.upload(checkpoint, "checkpoint.pt"),
    }
    if "rotation" in probes:
        result["rotation_accuracy"] = probes["rotation"].accuracy
        result["rotation_loss"] = probes["rotation"].loss
    if "linear" in probes:
        result["linear_accuracy"] = probes["linear"].accuracy
        result["linear_loss"] = probes["linear"].loss
    return result


def run_report(ctx: TaskContext) -> dict[str, Any]:
    from selfaugment.trainer.search.report import write_report

    return write_report(ctx.store, ctx.spec, ctx.workdir)


RUNNERS: dict[str, Callable[[TaskContext], Mapping[str, Any]]] = {
    "prepare": run_prepare,
    "base": run_base,
    "fold": run_fold,
    "search": run_search,
    "merge": run_merge,
    "randaugment": run_randaugment,
    "retrain": run_retrain,
    "report": run_report,
}


# -- helpers -----------------------------------------------------------------------------
def _evaluation_images(ctx: TaskContext) -> Images | None:
    """`evaluation_dataset` in memory (prepared first unless built-in; a seeded sample when
    it does not fit its memory budget), or None."""
    dataset = ctx.spec.evaluation_dataset
    if dataset is None:
        return None
    if not reads_prepared(dataset):
        return load_dataset(dataset, seed=ctx.seed)
    prepared = prepare_dataset(dataset, datasets_store(ctx.store), dataset.prepared_size)
    images = open_images(prepared, dataset, ctx.seed, memory_budget=dataset.memory_budget_bytes)
    return resident(images, dataset.memory_budget_bytes, ctx.seed)


def _device(ctx: TaskContext) -> torch.device:
    from selfaugment.trainer.runtime import resolve_device

    return resolve_device(ctx.spec.runtime.device)


def _scorer(
    ctx: TaskContext, checkpoint: Path, heads: dict[str, Any], heldout: Images, base: str
) -> Any:
    """A forward-pass scorer whose views are the base augmentation, then the candidate."""
    from selfaugment.trainer.evaluation.scoring import PolicyScorer
    from selfaugment.trainer.runtime import use_bf16

    views = fold_augment(ctx, base)
    device = _device(ctx)
    return PolicyScorer.from_checkpoint(
        checkpoint,
        heads["rotation"],
        heldout.images,
        device=device,
        batch_size=ctx.spec.search.score_batch_size,
        seed=ctx.seed,
        augment=views,
        bf16=use_bf16(ctx.spec.runtime, device),
        linear_head=heads.get("linear"),
        labels=heldout.labels if "linear" in heads else None,
    )
