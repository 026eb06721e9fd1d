"""MoCo v2 training step: the trainer's against a plain reference loop, and with augmentation.

    .venv/bin/python benchmarks/bench_moco.py [--steps 3] [--repeats 3] [--threads N] [--write]

Per config (ResNet-18 backbone, batch 64), these take turns within each repeat
(benchmarks/common.py), each for ``--steps`` training steps on the same views:

- ``reference``: the obvious code, written here with the structure of facebookresearch/moco's
  ``builder.py`` and ``main_moco.py`` (two encoders, a queue buffer, the momentum update and
  the enqueue, cross-entropy on ``[l_pos, l_neg]``), with the same backbone and head;
- ``trainer``: the step of ``trainer/moco/pretrain.py`` (``MoCo`` and its loss, learning rate,
  autocast, zero_grad, backward, step, the running loss);
- ``trainer + views``: the same step making both views with the 'mocov2' ``BatchAugmenter``.

The acceptance figure is ``trainer / reference``, seconds per step (at most 1.1). CPU in fp32;
on CUDA in bf16 autocast and channels_last for both.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch import nn

from selfaugment.trainer.config import AugmentConfig, MocoConfig, ModelConfig
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.policy.views import build_augmenter
from selfaugment.trainer.runtime import autocast

CONFIGS = {  # name: (model, image size, devices)
    "r18w8_16px": (ModelConfig(arch="resnet18", width=8, cifar_stem=True), 16, ("cpu", "cuda")),
    "r18w16_32px": (ModelConfig(arch="resnet18", width=16, cifar_stem=True), 32, ("cpu", "cuda")),
    "r18w64_32px": (ModelConfig(arch="resnet18", width=64, cifar_stem=True), 32, ("cuda",)),
}
BATCH = 64
MOCO = MocoConfig(queue_size=4096)


class ReferenceMoCo(nn.Module):
    """MoCo v2 as facebookresearch/moco's builder.py writes it (single device, no shuffle-BN)."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MocoConfig) -> None:
        super().__init__()
        self.K, self.m, self.T = cfg.queue_size, cfg.momentum, cfg.temperature
        head = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, cfg.dim)
        )
        self.encoder_q = nn.Sequential(backbone, head)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        self.queue[:, ptr : ptr + batch_size] = keys.T  # K is a multiple of the batch here
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)  # NxC
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)  # NxC
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # Nx1
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def bench(name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    model_cfg, size, _ = CONFIGS[name]
    bf16 = device.type == "cuda"
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    torch.manual_seed(0)
    trainer = MoCo(build_backbone(model_cfg, 3), MOCO).to(device, memory_format=memory_format)
    torch.manual_seed(0)
    backbone = build_backbone(model_cfg, 3)
    reference = ReferenceMoCo(backbone, backbone.feature_dim, MOCO)
    reference = reference.to(device, memory_format=memory_format)
    trainer.train(), reference.train()
    optimizers = [
        torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        for model in (trainer, reference)
    ]
    criterion = nn.CrossEntropyLoss()
    augment = build_augmenter(AugmentConfig.model_validate({"policy": "mocov2"}))
    generator = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, device=device)
    views = [augment(data, generator).contiguous(memory_format=memory_format) for _ in range(2)]
    running = torch.zeros((), device=device)

    def trainer_step(view_q: torch.Tensor, view_k: torch.Tensor) -> None:
        nonlocal running
        for group in optimizers[0].param_groups:  # the trainer sets the lr at every step
            group["lr"] = 0.03
        with autocast(device, bf16):
            loss, _ = trainer(view_q, view_k)
        optimizers[0].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[0].step()
        running += loss.detach()

    def reference_steps() -> None:
        for _ in range(args.steps):
            with autocast(device, bf16):
                output, target = reference(*views)
                loss = criterion(output, target)
            optimizers[1].zero_grad()
            loss.backward()
            optimizers[1].step()
            loss.item()

    def trainer_steps() -> None:
        for _ in range(args.steps):
            trainer_step(*views)
            running.item()

    def trainer_steps_with_views() -> None:
        for _ in range(args.steps):
            view_q = augment(data, generator).contiguous(memory_format=memory_format)
            view_k = augment(data, generator).contiguous(memory_format=memory_format)
            trainer_step(view_q, view_k)
            running.item()

    runs = {
        "reference": reference_steps,
        "trainer": trainer_steps,
        "trainer + views": trainer_steps_with_views,
    }
    for run in runs.values():  # warm-up
        run()
    timings = common.interleaved(runs, args.repeats, device)
    per_step = {key: common.median(values) / args.steps for key, values in timings.wall.items()}
    cpu = {key: common.median(values) / args.steps for key, values in timings.cpu.items()}
    return {
        "config": name,
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "batch_size": BATCH,
        "image_size": size,
        "seconds_per_step": per_step,
        "images_per_second": {key: BATCH / value for key, value in per_step.items()},
        "trainer_over_reference": per_step["trainer"] / per_step["reference"],
        "trainer_over_reference_cpu_time": cpu["trainer"] / cpu["reference"],
        "views_share_of_step": 1.0 - per_step["trainer"] / per_step["trainer + views"],
        "wall_seconds": {key: [round(v, 4) for v in vs] for key, vs in timings.wall.items()},
        "cpu_seconds": {key: [round(v, 4) for v in vs] for key, vs in timings.cpu.items()},
    }


def markdown(report: dict[str, Any], load: common.Load, suffix: str) -> str:
    lines = [
        f"# MoCo v2 training step ({suffix}): the trainer against a plain reference loop",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
        f"{report['threads']} CPU thread(s), CUDA: {report['machine']['cuda']}, {load.line()}  ",
        f"Batch {BATCH}, queue {MOCO.queue_size}; medians of {report['repeats']} interleaved "
        f"repeats of {report['steps']} steps. trainer / reference: seconds per step (<= 1.1 "
        "is the target), by wall clock and by CPU time (which a loaded machine distorts least "
        "at one thread); views: the share of a step spent making both mocov2 views.",
        "",
        "| config | device | precision | reference img/s | trainer img/s | trainer / reference "
        "| (CPU time) | trainer + views img/s | views share |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        rates = row["images_per_second"]
        lines.append(
            f"| {row['config']} | {row['device']} | {row['precision']} | {rates['reference']:.1f} "
            f"| {rates['trainer']:.1f} | {row['trainer_over_reference']:.3f} "
            f"| {row['trainer_over_reference_cpu_time']:.3f} "
            f"| {rates['trainer + views']:.1f} | {row['views_share_of_step']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=None)
    common.add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = common.Load()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else [torch.device("cpu")]
    results = [
        bench(name, device, args)
        for device in devices
        for name in (args.configs or CONFIGS)
        if device.type in CONFIGS[name][2]
    ]
    load.finish()
    suffix = devices[0].type
    report = {
        "command": common.command(),
        "machine": common.machine(),
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    common.finish(args, f"moco-{suffix}", report, markdown(report, load, suffix), load)


if __name__ == "__main__":
    main()
