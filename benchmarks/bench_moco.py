"""MoCo v2 training throughput (images/s, median over timed steps), augmentation included.

Configs: (a) tiny: resnet18 width 8, 16x16, batch 64; (b) resnet18 width 64, CIFAR stem,
32x32, batch 64. CPU always; CUDA with bf16 autocast and channels_last when available.
Views are made on the device by a batched crop-and-flip stand-in (the project's
BatchAugmenter when `selfaugment.trainer.policy.views` can build the 'mocov2' policy).

    .venv/bin/python benchmarks/bench_moco.py [--steps 6] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selfaugment.trainer.config import AugmentConfig, MocoConfig, ModelConfig
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.runtime import autocast

CONFIGS = {
    "tiny_r18w8_16px": (ModelConfig(arch="resnet18", width=8, cifar_stem=True), 16),
    "r18w64_cifar_32px": (ModelConfig(arch="resnet18", width=64, cifar_stem=True), 32),
}
BATCH = 64


def crop_flip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fallback views: one random crop (pad 4) per batch and a per-image random flip."""
    x = images.float() / 255.0
    size = x.shape[-1]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = (int(v) for v in torch.randint(0, 9, (2,), generator=generator, device=x.device))
    x = padded[:, :, i : i + size, j : j + size]
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], torch.flip(x, dims=(3,)), x)


def make_augmenter() -> tuple[Any, str]:
    try:
        from selfaugment.trainer.policy.views import build_augmenter

        return build_augmenter(AugmentConfig.model_validate({"policy": "mocov2"})), "mocov2"
    except Exception:  # the policy module may not be there yet
        return crop_flip, "crop+flip stand-in"


def bench(name: str, device: torch.device, bf16: bool, steps: int, warmup: int) -> dict[str, Any]:
    model_cfg, size = CONFIGS[name]
    torch.manual_seed(0)
    model = MoCo(build_backbone(model_cfg, 3), MocoConfig(queue_size=4096)).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9)
    augment, augment_name = make_augmenter()
    generator = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (BATCH * 4, 3, size, size), dtype=torch.uint8, device=device)
    rates = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        batch = data[(step % 4) * BATCH : (step % 4 + 1) * BATCH]
        view_q = augment(batch, generator).contiguous(memory_format=memory_format)
        view_k = augment(batch, generator).contiguous(memory_format=memory_format)
        with autocast(device, bf16):
            loss, _ = model(view_q, view_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            rates.append(BATCH / (time.perf_counter() - started))
    return {
        "config": name,
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "batch_size": BATCH,
        "image_size": size,
        "augmenter": augment_name,
        "images_per_second_median": statistics.median(rates),
        "steps_timed": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [(torch.device("cpu"), False)]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), True))
    results = [
        bench(name, d, bf16, args.steps, args.warmup) for d, bf16 in runs for name in CONFIGS
    ]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_threads": args.threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    command = f"benchmarks/bench_moco.py --steps {args.steps} --warmup {args.warmup} --threads {args.threads}"
    report = {"command": command, "machine": machine, "results": results}
    suffix = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"moco-{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# MoCo v2 training throughput ({suffix})",
        "",
        f"Command: `.venv/bin/python {command}`  ",
        f"Machine: {machine['platform']}, {machine['processor']}, torch {machine['torch']}, "
        f"{args.threads} CPU thread(s), CUDA: {machine['cuda']}",
        "",
        "| config | device | precision | augmenter | images/s (median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results:
        lines.append(
            f"| {row['config']} | {row['device']} | {row['precision']} | {row['augmenter']} | "
            f"{row['images_per_second_median']:.1f} |"
        )
    (args.out / f"moco-{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
