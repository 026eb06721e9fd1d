"""Throughput of the per-image PIL reference vs BatchAugmenter, on the same policy and images.

    .venv/bin/python benchmarks/bench_augment.py [--images 2048] [--batch-size 256]
        [--repeats 5] [--threads N] [--output benchmarks/results/augment-cpu.json]

(a) PIL: per image, tensor -> PIL, random resized crop + flip, policy, -> float tensor (what a
DataLoader with ``ToTensor`` does); (b) ``BatchAugmenter`` on uint8 batches. Each repeat runs
(a) then (b) over all images, so both see the same machine load; we report the median over
repeats of images per second (wall clock) and also of CPU seconds (less sensitive to other
processes). CUDA is measured too when available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from selfaugment.trainer.augment.crop import random_resized_crop_flip_pil
from selfaugment.trainer.augment.ops import OP_NAMES
from selfaugment.trainer.policy import (
    AnyPolicy,
    BatchAugmenter,
    OpSetting,
    Policy,
    apply_policy_pil,
    load_policy,
)

ROOT = Path(__file__).resolve().parents[1]


def make_images(count: int, seed: int) -> torch.Tensor:
    """Digits (sklearn) upscaled to 32x32 with random tints, then random noise: uint8 [N,3,32,32]."""
    rng = np.random.default_rng(seed)
    digits = load_digits().images / 16.0
    take = min(count, len(digits))
    upscaled = np.kron(digits[:take], np.ones((4, 4)))[:, None]  # N x 1 x 32 x 32
    tint_low, tint_high = rng.random((take, 3, 1, 1)) * 120, 135 + rng.random((take, 3, 1, 1)) * 120
    tinted = tint_low + upscaled * (tint_high - tint_low)
    noise = rng.integers(0, 256, (count - take, 3, 32, 32))
    return torch.from_numpy(np.concatenate([tinted, noise]).round().astype(np.uint8))


def random_policy(seed: int, sub_policies: int = 5, ops: int = 2) -> Policy:
    rng = random.Random(seed)
    return Policy(
        [
            [OpSetting(rng.choice(OP_NAMES), rng.random(), rng.random()) for _ in range(ops)]
            for _ in range(sub_policies)
        ],
        name=f"random-{sub_policies}x{ops}-seed{seed}",
    )


def pil_pass(images: torch.Tensor, policy: AnyPolicy, rng: random.Random) -> torch.Tensor:
    outputs = []
    for image in images:
        pil_image = Image.fromarray(image.permute(1, 2, 0).numpy())
        pil_image = random_resized_crop_flip_pil(pil_image, rng)
        pil_image = apply_policy_pil(policy, pil_image, rng)
        array = np.asarray(pil_image, dtype=np.float32) / 255.0
        outputs.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(outputs)


def batched_pass(
    images: torch.Tensor, augmenter: BatchAugmenter, batch_size: int, generator: torch.Generator
) -> None:
    for batch in images.split(batch_size):
        augmenter(batch, generator)
    if images.is_cuda:
        torch.cuda.synchronize()


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_policy(
    policy: AnyPolicy, images: torch.Tensor, args: argparse.Namespace
) -> dict[str, object]:
    count = len(images)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    augmenter = BatchAugmenter(policy)
    pil_pass(images[:64], policy, rng)  # warm-up
    batched_pass(images[: args.batch_size], augmenter, args.batch_size, generator)
    pil_runs, batched_runs = [], []
    for _ in range(args.repeats):
        pil_runs.append(timed(lambda: pil_pass(images, policy, rng)))
        batched_runs.append(
            timed(lambda: batched_pass(images, augmenter, args.batch_size, generator))
        )
    result: dict[str, object] = {
        "policy": policy.name,
        "pil_images_per_s": count / statistics.median(r[0] for r in pil_runs),
        "batched_cpu_images_per_s": count / statistics.median(r[0] for r in batched_runs),
        "pil_cpu_seconds_per_image": statistics.median(r[1] for r in pil_runs) / count,
        "batched_cpu_seconds_per_image": statistics.median(r[1] for r in batched_runs) / count,
        "pil_wall_seconds": [round(r[0], 4) for r in pil_runs],
        "batched_wall_seconds": [round(r[0], 4) for r in batched_runs],
    }
    result["speedup_wall"] = result["batched_cpu_images_per_s"] / result["pil_images_per_s"]  # type: ignore[operator]
    result["speedup_cpu_time"] = (
        result["pil_cpu_seconds_per_image"] / result["batched_cpu_seconds_per_image"]  # type: ignore[operator]
    )
    threads = torch.get_num_threads()
    if threads > 1:  # also one thread: PIL runs on one, and shared machines punish OpenMP
        torch.set_num_threads(1)
        single = [
            timed(lambda: batched_pass(images, augmenter, args.batch_size, generator))[0]
            for _ in range(args.repeats)
        ]
        torch.set_num_threads(threads)
        result["batched_cpu_1thread_images_per_s"] = count / statistics.median(single)
        result["speedup_wall_1thread"] = (
            result["batched_cpu_1thread_images_per_s"] / result["pil_images_per_s"]  # type: ignore[operator]
        )
    if torch.cuda.is_available():
        on_gpu = images.cuda()
        cuda_generator = torch.Generator(device="cuda").manual_seed(args.seed)
        batched_pass(on_gpu, augmenter, args.batch_size, cuda_generator)  # warm-up
        runs = [
            timed(lambda: batched_pass(on_gpu, augmenter, args.batch_size, cuda_generator))[0]
            for _ in range(args.repeats)
        ]
        result["batched_cuda_images_per_s"] = count / statistics.median(runs)
        result["cuda_device"] = torch.cuda.get_device_name()
    return result


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1m": os.getloadavg()[0],
    }


def markdown(report: dict) -> str:
    lines = [
        "# Augmentation throughput: per-image PIL vs BatchAugmenter",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['processor']}, {report['machine']['cpu_count']} CPUs, "
        f"torch {report['machine']['torch']} with {report['machine']['torch_threads']} threads, "
        f"load average {report['machine']['load_average_1m']:.1f} at the start  ",
        f"Images: {report['images']} x 3x32x32 uint8, batches of {report['batch_size']}, "
        f"median of {report['repeats']} repeats, seed {report['seed']}.",
        "",
        "| policy | PIL img/s | batched CPU img/s | speed-up (wall) | speed-up (CPU time) "
        "| batched, 1 thread | speed-up, 1 thread | CUDA img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        cuda = row.get("batched_cuda_images_per_s")
        single = row.get("batched_cpu_1thread_images_per_s")
        single_speedup = row.get("speedup_wall_1thread", 0.0)
        lines.append(
            f"| {row['policy']} | {row['pil_images_per_s']:.0f} | "
            f"{row['batched_cpu_images_per_s']:.0f} | {row['speedup_wall']:.1f}x | "
            f"{row['speedup_cpu_time']:.1f}x | {f'{single:.0f}' if single else '-'} | "
            f"{f'{single_speedup:.1f}x' if single else '-'} | "
            f"{f'{cuda:.0f}' if cuda else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/augment-cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(args.images, args.seed)
    policies = [load_policy(ROOT / "examples/mocov2-policy.json"), random_policy(args.seed)]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "seed": args.seed,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "results": [bench_policy(policy, images, args) for policy in policies],
    }
    report["machine"]["load_average_1m_end"] = os.getloadavg()[0]  # type: ignore[index]
    text = markdown(report)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
