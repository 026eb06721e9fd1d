"""Throughput of the per-image PIL path vs BatchAugmenter, on the same policies and images.

    .venv/bin/python benchmarks/bench_augment.py [--images 2048] [--batch-size 256]
        [--repeats 5] [--threads 2] [--write] [--out benchmarks/results] [--profile]

Per policy (the built-in mocov2, and random 5x2 policies), these take turns within each repeat
(benchmarks/common.py):

- ``pil``: per image, tensor -> PIL, random resized crop + flip, the policy, -> float tensor
  (what a DataLoader with ``ToTensor`` does); one thread, as PIL has;
- ``eager, 1 thread``: ``BatchAugmenter`` on uint8 batches, torch ops over the batch
  (``SELFAUGMENT_AUGMENT_KERNELS=torch``), torch at 1 thread;
- ``eager, N threads``: the same with torch at ``--threads`` (the augmenter's thread policy
  still runs the CPU work on one thread: ``cpu_threads=1``);
- ``eager, N OpenMP threads``: the other policy, ``cpu_threads=None``: N threads inside;
- ``compiled, 1 thread`` and ``compiled, N threads``: the compiled path (numba,
  ``augment/compiled.py``; the default for CPU uint8 batches), torch at 1 and at ``--threads``
  (its kernels run on one thread either way: the difference is the few torch calls around);
- ``batched, CUDA``: when a CUDA device is present (the eager path).

Images per second are medians over the repeats; speed-ups are against ``pil`` of the same run.
``--profile`` measures nothing: it prints, per policy, where ``eager, 1 thread`` spends its
time (``torch.profiler``, the ops with the most CPU time) and where ``compiled, 1 thread``
does (``cProfile``: the compiled kernel is one call, the rest is the draws and their
bookkeeping in numpy), the workload that speed work starts from.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from selfaugment.trainer.augment.compiled import KERNELS_VARIABLE
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
    images: torch.Tensor,
    augmenter: BatchAugmenter,
    batch_size: int,
    generator: torch.Generator,
    threads: int,
    kernels: str = "torch",
) -> None:
    """``augmenter`` over ``images`` with torch at ``threads`` and the path ``kernels`` (the
    value of SELFAUGMENT_AUGMENT_KERNELS, read at every call)."""
    torch.set_num_threads(threads)
    previous = os.environ.get(KERNELS_VARIABLE)
    os.environ[KERNELS_VARIABLE] = kernels
    try:
        for batch in images.split(batch_size):
            augmenter(batch, generator)
    finally:
        if previous is None:
            del os.environ[KERNELS_VARIABLE]
        else:
            os.environ[KERNELS_VARIABLE] = previous


SETTLE_SECONDS = 0.5


def interleaved_settling(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device | None,
    settle_after: str,
) -> common.Timings:
    """``common.interleaved`` with an untimed pause after the run ``settle_after``.

    The OpenMP run leaves its worker threads spinning for a while after it returns, and the
    process CPU time of the run after it counted them: on 2 cores at load 3, the run that
    followed it measured 3.5 ms of CPU a batch where it took 2.0 ms elsewhere in the same
    repeat. So that run goes last in each repeat, and the threads get time to go to sleep
    before the next repeat's first run.
    """
    timings = common.Timings({name: [] for name in runs}, {name: [] for name in runs})
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = common.timed(run, device)
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
            if name == settle_after:
                time.sleep(SETTLE_SECONDS)
    return timings


def bench_policy(
    policy: AnyPolicy, images: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    policy_threads = BatchAugmenter(policy)  # the thread policy: one thread inside
    openmp_threads = BatchAugmenter(policy, cpu_threads=None)
    size = args.batch_size
    threads = args.threads
    openmp = f"eager, {threads} OpenMP threads"
    runs: dict[str, Callable[[], object]] = {
        "pil": lambda: pil_pass(images, policy, rng),
        "eager, 1 thread": lambda: batched_pass(images, policy_threads, size, generator, 1),
        f"eager, {threads} threads": lambda: batched_pass(
            images, policy_threads, size, generator, threads
        ),
        "compiled, 1 thread": lambda: batched_pass(
            images, policy_threads, size, generator, 1, "numba"
        ),
        f"compiled, {threads} threads": lambda: batched_pass(
            images, policy_threads, size, generator, threads, "numba"
        ),
        openmp: lambda: batched_pass(images, openmp_threads, size, generator, threads),
    }
    if torch.cuda.is_available():
        on_gpu = images.cuda()
        cuda_generator = torch.Generator(device="cuda").manual_seed(args.seed)
        runs["batched, CUDA"] = lambda: batched_pass(
            on_gpu, policy_threads, size, cuda_generator, args.threads
        )
    device = torch.device("cuda") if torch.cuda.is_available() else None
    pil_pass(images[:64], policy, rng)  # warm-up: imports, caches, the geometric index memo,
    # the compiled kernels (loaded from numba's cache, or compiled once)
    for name, run in runs.items():
        if name != "pil":
            run()
    timings = interleaved_settling(runs, args.repeats, device, settle_after=openmp)
    torch.set_num_threads(args.threads)
    rates = {name: len(images) / common.median(values) for name, values in timings.wall.items()}
    single = (  # one thread each
        "pil",
        "eager, 1 thread",
        f"eager, {threads} threads",
        "compiled, 1 thread",
        f"compiled, {threads} threads",
    )
    cpu = {name: common.median(timings.cpu[name]) for name in single}
    return {
        "policy": policy.name,
        "images_per_second": rates,
        "speedup_over_pil": {
            name: rate / rates["pil"] for name, rate in rates.items() if name != "pil"
        },
        "speedup_over_pil_cpu_time": {name: cpu["pil"] / cpu[name] for name in single[1:]},
        "wall_seconds": {
            name: [round(v, 4) for v in values] for name, values in timings.wall.items()
        },
        "cpu_seconds": {
            name: [round(v, 4) for v in values] for name, values in timings.cpu.items()
        },
    }


def profile_policy(policy: AnyPolicy, images: torch.Tensor, args: argparse.Namespace) -> str:
    """The torch ops of ``eager, 1 thread`` on ``policy``, by self CPU time (a table), and the
    Python functions of ``compiled, 1 thread`` (cProfile, by own time: the compiled kernel is
    the ``augment`` of ``augment/kernels.py``)."""
    from torch.profiler import ProfilerActivity, profile

    augmenter = BatchAugmenter(policy)
    generator = torch.Generator().manual_seed(args.seed)
    batched_pass(images, augmenter, args.batch_size, generator, 1)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        batched_pass(images, augmenter, args.batch_size, generator, 1)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    batched_pass(images, augmenter, args.batch_size, generator, 1, "numba")  # warm-up
    python_profile = cProfile.Profile()
    python_profile.runcall(batched_pass, images, augmenter, args.batch_size, generator, 1, "numba")
    stream = io.StringIO()
    pstats.Stats(python_profile, stream=stream).sort_stats("tottime").print_stats(12)
    header = f"## {policy.name}: {len(images)} images, batches of {args.batch_size}"
    return f"{header}\n### eager, 1 thread\n{table}\n### compiled, 1 thread\n{stream.getvalue()}"


def markdown(report: dict[str, Any], load: common.Load) -> str:
    names = [name for name in report["results"][0]["images_per_second"] if name != "pil"]
    lines = [
        "# Augmentation throughput: per-image PIL vs BatchAugmenter",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['processor']}, {load.cores} CPUs, torch "
        f"{report['machine']['torch']}, {load.line()}  ",
        f"Images: {report['images']} x 3x32x32 uint8, batches of {report['batch_size']}; medians of "
        f"{report['repeats']} interleaved repeats, seed {report['seed']}.",
        "",
        "Each cell: images per second, and the speed-up over the PIL path of the same run by wall "
        "clock; for the runs on one thread also by CPU time, which a loaded machine distorts "
        "least.",
        "",
        "| policy | PIL img/s | " + " | ".join(names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for row in report["results"]:
        rates, wall, cpu = (
            row["images_per_second"],
            row["speedup_over_pil"],
            row["speedup_over_pil_cpu_time"],
        )
        cells = [
            f"{rates[name]:.0f} ({wall[name]:.1f}x"
            + (f"; CPU {cpu[name]:.1f}x)" if name in cpu else ")")
            for name in names
        ]
        lines.append(f"| {row['policy']} | {rates['pil']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-policies", type=int, default=3, help="random 5x2 policies")
    parser.add_argument(
        "--threads", type=int, default=2, help="the multi-thread setting (default 2)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where the 1-thread batched path spends"
    )
    common.add_output_arguments(parser)
    args = parser.parse_args()
    load = common.Load()
    images = make_images(args.images, args.seed)
    policies: list[AnyPolicy] = [load_policy(ROOT / "examples/mocov2-policy.json")]
    policies += [random_policy(args.seed + index) for index in range(args.random_policies)]
    if args.profile:
        for policy in policies:
            print(profile_policy(policy, images, args))
        return
    report: dict[str, Any] = {
        "command": common.command(),
        "machine": common.machine(),
        "seed": args.seed,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "results": [bench_policy(policy, images, args) for policy in policies],
    }
    load.finish()
    name = "augment-cuda" if torch.cuda.is_available() else "augment-cpu"
    common.finish(args, name, report, markdown(report, load), load)


if __name__ == "__main__":
    main()
