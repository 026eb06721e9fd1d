"""MoCo v2 pretraining: resumable, seeded, single device or torchrun/DDP.

Images are in memory (an ImageSet: the whole uint8 tensor goes to the device, batches are
index lookups there) or streamed from a prepared dataset's shards (StreamedImages: each rank's
DataLoader reads and decodes its slice of every global batch); both visit the same images in
the same order. Batches go to the device as uint8 and both views are made there by the
augmenter. The augmentation generator is re-seeded from (seed, rank, epoch) at the start of
every epoch and the data order is a permutation seeded by (seed, epoch), so a resumed run
(model, optimizer, queue and the RNG states restored from checkpoint.pt) continues exactly
like an uninterrupted one, on any number of ranks. Besides the checkpoint at the end of an
epoch, one is written every `runtime.checkpoint_steps` steps inside it (with every rank's
RNG states, its augmentation generator among them, and its loss so far in the epoch), from
which a run resumes at that step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfaugment import RESULT_SCHEMA_VERSION
from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.config import (
    DatasetConfig,
    OptimConfig,
    PretrainConfig,
    field_differences,
)
from selfaugment.trainer.data.stream import StreamedImages
from selfaugment.trainer.data.types import Images
from selfaugment.trainer.moco.checkpoint import (
    CHECKPOINT_KIND,
    CHECKPOINT_SCHEMA_VERSION,
    backbone_state,
    load_checkpoint,
    save_checkpoint,
)
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import ResNetBackbone, build_backbone
from selfaugment.trainer.policy.views import build_augmenter
from selfaugment.trainer.runtime import (
    DistEnv,
    all_reduce_mean,
    autocast,
    barrier,
    capture_rng_state,
    dist_env_from_environ,
    init_distributed,
    resolve_device,
    restore_rng_state,
    seed_everything,
    use_bf16,
    use_channels_last,
)

Augmenter = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
ProgressCallback = Callable[[dict[str, Any]], None]
CheckpointCallback = Callable[[], None]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def epoch_logger(epochs: int, write: Callable[[str], None]) -> ProgressCallback:
    """A progress callback writing one line per epoch (loss, lr, speed, ETA): readable in a
    terminal, in `kubectl logs` and in a worker's log file alike."""
    timings: list[float] = []

    def on_epoch(record: dict[str, Any]) -> None:
        timings.append(float(record.get("time", 0.0)))
        epoch = int(record["epoch"])
        recent = timings[-5:]
        eta = (epochs - epoch) * sum(recent) / len(recent)
        write(
            f"epoch {epoch}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.4g}  "
            f"{record.get('images_per_second', 0.0):,.0f} img/s  "
            f"epoch {_duration(record.get('time', 0.0))}  eta {_duration(eta)}"
        )

    return on_epoch


CHECKPOINT_NAME = "checkpoint.pt"
# Config fields that may differ between a checkpoint and the run resuming it.
RESUME_IGNORED = {
    "runtime.progress",
    "runtime.num_workers",
    "runtime.checkpoint_every",
    "runtime.checkpoint_steps",
    "runtime.device",
    "evaluation",
}


class PretrainError(SelfAugmentError):
    """Pretraining cannot start or continue; the message names the field or file at fault."""


def learning_rate(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Per-step schedule: linear warm-up over `warmup_epochs`, then cosine decay to 0."""
    warmup = optim.warmup_epochs * steps_per_epoch
    total = optim.epochs * steps_per_epoch
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of `epoch`, identical on every rank (the streamed path's formula)."""
    from selfaugment.trainer.data.order import epoch_permutation as order

    return torch.from_numpy(order(count, seed, epoch))


def open_training_images(
    dataset: DatasetConfig, seed: int, datasets: Any = None, *, main: bool = True
) -> Images | StreamedImages:
    """`dataset`'s images for training: a built-in source loaded directly; any other prepared
    once into the datasets store (`datasets`, default: the local cache's; on the main process,
    while the others wait for it) and opened in memory or streamed by its memory budget."""
    from selfaugment.trainer.data import load_dataset, open_images
    from selfaugment.trainer.data.prepare import prepared_for_rank
    from selfaugment.trainer.search.planner import reads_prepared
    from selfaugment.trainer.store import open_store
    from selfaugment.trainer.store.layout import datasets_uri

    if not reads_prepared(dataset):
        return load_dataset(dataset, seed=seed)
    store = datasets if datasets is not None else open_store(datasets_uri(""))
    prepared = prepared_for_rank(dataset, store, dataset.prepared_size, main=main)
    return open_images(prepared, dataset, seed, memory_budget=dataset.memory_budget_bytes)


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of config fields that differ (ignoring RESUME_IGNORED)."""
    return [name for name, _, _ in field_differences(stored, current, RESUME_IGNORED)]


def _initialise_from(model: MoCo, path: str) -> None:
    """Load backbone (and, when shapes match, head) weights of another pretrain checkpoint."""
    payload = load_checkpoint(path)
    try:
        model.encoder_q.backbone.load_state_dict(backbone_state(payload["model"]))
    except RuntimeError as error:
        raise PretrainError(
            f"init_from: {path}: backbone does not match model config: {error}"
        ) from None
    head_state = {
        key[len("encoder_q.head.") :]: value
        for key, value in payload["model"].items()
        if key.startswith("encoder_q.head.")
    }
    current = model.encoder_q.head.state_dict()
    if head_state.keys() == current.keys() and all(
        head_state[key].shape == current[key].shape for key in current
    ):
        model.encoder_q.head.load_state_dict(head_state)
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())


def _set_trainable(model: MoCo, trainable: str) -> None:
    """'batchnorm': only the backbone's batch-norm scale and shift get gradients (HPT-BN)."""
    if trainable == "all":
        return
    for param in model.encoder_q.parameters():
        param.requires_grad = False
    for module in model.encoder_q.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for param in module.parameters():
                param.requires_grad = True


@dataclass
class TrainedMoco:
    """What `train_moco` leaves for whoever evaluates: the report (pretrain.json without its
    evaluation) and, on the main process, the trained backbone and the images it saw."""

    report: dict[str, Any]
    backbone: ResNetBackbone | None
    images: Images | StreamedImages
    device: torch.device
    bf16: bool
    seed: int


def train_moco(
    cfg: PretrainConfig,
    output_dir: Path,
    images: Images | StreamedImages | None = None,
    progress_callback: ProgressCallback | None = None,
    augmenter: Augmenter | None = None,
    stop_epoch: int | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainedMoco:
    """Train MoCo v2 per `cfg`, resuming from output_dir/checkpoint.pt. Evaluation is the
    caller's (selfaugment.trainer.evaluation.pretrained.run_pretrain trains, then probes).
    Under torchrun, every rank calls this; call `finish_distributed` when done.

    `stop_epoch` stops after that many epochs of cfg's schedule (learning rate and all), with a
    checkpoint from which a later call goes on exactly as if it had never stopped.
    `on_checkpoint` is called on the main process after each checkpoint inside an epoch."""
    env = dist_env_from_environ()
    device = resolve_device(cfg.runtime.device, env.local_rank)
    init_distributed(device, env)
    stop = cfg.optim.epochs if stop_epoch is None else min(stop_epoch, cfg.optim.epochs)
    return _pretrain(
        cfg,
        Path(output_dir),
        images,
        progress_callback,
        augmenter,
        env,
        device,
        stop,
        on_checkpoint,
    )


def _pretrain(
    cfg: PretrainConfig,
    output_dir: Path,
    images: Images | StreamedImages | None,
    progress_callback: ProgressCallback | None,
    augmenter: Augmenter | None,
    env: DistEnv,
    device: torch.device,
    stop_epoch: int,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainedMoco:
    seed = cfg.runtime.seed
    if images is None:
        images = open_training_images(cfg.dataset, seed, main=env.is_main)
    count = len(images)
    if isinstance(images, StreamedImages):
        in_channels = images.channels
    else:
        in_channels = int(images.images.shape[1])
    global_batch = cfg.optim.batch_size
    if global_batch % env.world_size:
        raise PretrainError(
            f"optim.batch_size={global_batch} is not divisible by the {env.world_size} processes"
        )
    local_batch = global_batch // env.world_size
    steps_per_epoch = count // global_batch
    if steps_per_epoch == 0:
        raise PretrainError(
            f"optim.batch_size={global_batch} is larger than the dataset ({count} images)"
        )
    bf16, channels_last = use_bf16(cfg.runtime, device), use_channels_last(cfg.runtime, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    seed_everything(seed)
    model = MoCo(build_backbone(cfg.model, in_channels), cfg.moco)
    if cfg.init_from:
        _initialise_from(model, cfg.init_from)
    _set_trainable(model, cfg.trainable)
    model.to(device)
    model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        [param for param in model.encoder_q.parameters() if param.requires_grad],
        lr=cfg.optim.lr,
        momentum=cfg.optim.sgd_momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    augment = augmenter if augmenter is not None else build_augmenter(cfg.augment)
    generator = torch.Generator(device=device)

    config_data = cfg.model_dump(mode="json")
    checkpoint_path = output_dir / CHECKPOINT_NAME
    start_epoch, global_step, resumed_loss = 0, 0, 0.0
    loss_history: list[float] = []
    metrics: list[dict[str, Any]] = []
    if checkpoint_path.exists():
        payload = load_checkpoint(checkpoint_path)
        differences = config_differences(payload["config"], config_data)
        if differences or payload.get("in_channels") != in_channels:
            raise PretrainError(
                f"{checkpoint_path}: was written with a different config "
                f"({', '.join(differences) or 'in_channels'}); use a new output directory "
                "or delete the checkpoint to start over"
            )
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        start_epoch, global_step = int(payload["epoch"]), int(payload["global_step"])
        loss_history, metrics = list(payload["loss_history"]), list(payload["metrics"])
        restore_rng_state(payload["rng"])
        if global_step > start_epoch * steps_per_epoch:  # written inside an epoch
            ranks = payload.get("rank_state") or []
            if len(ranks) != env.world_size:
                raise PretrainError(
                    f"{checkpoint_path}: written inside an epoch by {len(ranks)} "
                    f"process(es); resume it with as many, or delete it to start over"
                )
            restore_rng_state(ranks[env.rank], generator)  # this rank's own streams
            resumed_loss = float(ranks[env.rank]["epoch_loss_sum"])
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in metrics)
        (output_dir / "metrics.jsonl").write_text(lines)
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model.set_query_runner(
            DistributedDataParallel(
                model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None
            )
        )

    def save(epoch: int, running: torch.Tensor | None) -> None:
        """The checkpoint after `epoch` finished epochs and `global_step` steps; inside an
        epoch (`running`: its loss so far) with every rank's RNG states and loss so far."""
        ranks = _rank_states(generator, running, env) if running is not None else None
        if not env.is_main:
            return
        payload = {
            "schema_version": CHECKPOINT_SCHEMA_VERSION,
            "kind": CHECKPOINT_KIND,
            "config": config_data,
            "in_channels": in_channels,
            "epoch": epoch,
            "global_step": global_step,
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng": capture_rng_state(generator),
            "loss_history": loss_history,
            "metrics": metrics,
        }
        if running is not None:
            payload["rank_state"] = ranks
        save_checkpoint(checkpoint_path, payload)

    batches = _BatchSource(images, cfg, env, device, seed, global_batch)
    every_steps = cfg.runtime.checkpoint_steps
    model.train()
    for epoch in range(start_epoch, stop_epoch):
        first_step = global_step - epoch * steps_per_epoch
        if first_step == 0:
            generator.manual_seed(seed * 1_000_003 + env.rank * 10_007 + epoch)
        running = torch.full((), resumed_loss if first_step else 0.0, device=device)
        started = time.perf_counter()
        for step, batch in enumerate(batches.epoch(epoch, first_step), start=first_step):
            lr = learning_rate(cfg.optim, global_step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            view_q = augment(batch, generator).contiguous(memory_format=memory_format)
            view_k = augment(batch, generator).contiguous(memory_format=memory_format)
            try:
                with autocast(device, bf16):
                    loss, _ = model(view_q, view_k)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            except torch.cuda.OutOfMemoryError:  # also raised as torch.OutOfMemoryError
                raise PretrainError(
                    f"out of memory on {device} at optim.batch_size={global_batch} "
                    f"({local_batch} per process): lower optim.batch_size (and optim.lr with it)"
                    + ("" if bf16 else ", or train in bf16 (runtime.precision)")
                ) from None
            running += loss.detach()
            global_step += 1
            if every_steps and (step + 1) % every_steps == 0 and step + 1 < steps_per_epoch:
                save(epoch, running)
                if env.is_main and on_checkpoint is not None:
                    on_checkpoint()
        epoch_loss = float(all_reduce_mean(running / steps_per_epoch).item())
        elapsed = time.perf_counter() - started
        if not math.isfinite(epoch_loss):
            raise PretrainError(f"loss is {epoch_loss} at epoch {epoch + 1}; lower optim.lr")
        loss_history.append(epoch_loss)
        record = {
            "epoch": epoch + 1,
            "loss": epoch_loss,
            "lr": lr,
            "images_per_second": (steps_per_epoch - first_step) * global_batch / elapsed,
            "time": elapsed,
        }
        metrics.append(record)
        last = epoch + 1 == stop_epoch
        if env.is_main:
            if (epoch + 1) % cfg.runtime.checkpoint_every == 0 or last:
                save(epoch + 1, None)
            with (output_dir / "metrics.jsonl").open("a") as stream:
                stream.write(json.dumps(record) + "\n")
            if progress_callback is not None:
                progress_callback(record)
        barrier()

    model.set_query_runner(None)
    report = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "final_loss": loss_history[-1],
        "epochs": len(loss_history),
        "num_images": count,
        "in_channels": in_channels,
        "config": config_data,
        "checkpoint": str(checkpoint_path),
        "loss_history": loss_history,
    }
    backbone = model.backbone if env.is_main else None
    return TrainedMoco(report, backbone, images, device, bf16, seed)


def _rank_states(
    generator: torch.Generator, running: torch.Tensor, env: DistEnv
) -> list[dict[str, Any]]:
    """Every rank's RNG states (its augmentation generator, torch, CUDA, numpy, python) and
    its epoch loss so far, in rank order: a collective under DDP. Inside an epoch they differ
    from rank to rank."""
    state = dict(capture_rng_state(generator), epoch_loss_sum=float(running.item()))
    if not env.distributed:
        return [state]
    import torch.distributed as dist

    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, state)
    return gathered


@dataclass
class _BatchSource:
    """This rank's uint8 batches on the device, step by step from any step of an epoch: index
    lookups in the images on the device, or a DataLoader reading a prepared dataset."""

    images: Images | StreamedImages
    cfg: PretrainConfig
    env: DistEnv
    device: torch.device
    seed: int
    global_batch: int

    def __post_init__(self) -> None:
        # in memory: the whole uint8 N x C x H x W tensor on the device, once
        self.data: torch.Tensor | None = None
        if not isinstance(self.images, StreamedImages):
            self.data = self.images.images.to(self.device)

    def epoch(self, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
        steps = len(self.images) // self.global_batch
        local = self.global_batch // self.env.world_size
        if isinstance(self.images, StreamedImages):
            loader = self.images.loader(
                self.seed,
                epoch,
                self.global_batch,
                rank=self.env.rank,
                world_size=self.env.world_size,
                start_step=first_step,
                num_workers=self.cfg.runtime.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            for batch, _ in loader:
                yield batch.to(self.device, non_blocking=True)
            return
        assert self.data is not None
        order = epoch_permutation(len(self.images), self.seed, epoch).to(self.device)
        for step in range(first_step, steps):
            first = step * self.global_batch + self.env.rank * local
            yield self.data[order[first : first + local]]
