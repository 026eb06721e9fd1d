"""Datasets larger than memory: peak memory, start-up and speed, in memory against streamed.

For each size N, the benchmark makes a synthetic image folder (N JPEGs at --source-size px,
10 class folders, in a temporary folder), prepares it (`prepare_dataset`, storage size =
source size: the files are kept byte for byte), and then reads one training epoch at
--image-size px, each run in a subprocess of its own so that its peak memory is its own:

  memory    today's path: load_dataset decodes the folder into uint8 [N, C, S, S], then the
            epoch indexes it batch by batch in the order training uses (epoch_permutation);
  stream    the prepared dataset through StreamedImages.loader (--workers loader processes
            decoding), the same order, the same batches;
  prepared  the in-memory path from the prepared dataset (load_prepared: what a task whose
            data fits the memory budget will do), then the same epoch as `memory`.

Runs alternate between the paths (--repeats times, the order rotating), so that a change of load on the machine
affects both alike; the medians are reported. Measured per run: start-up (process start, after
imports, to the first batch), the epoch's images per second (with and without start-up), peak
RSS of the main process, and peak PSS of the process with its loader workers (shared pages
counted once). A last subprocess measures the decode rate of one core (one thread): stored
samples to the training size and at the stored size, and files decoded as load_dataset does.

Usage: python benchmarks/bench_data.py [--sizes 10000,100000] [--repeats 2] [--workers 2]
       [--write]   (writes results/data-cpu.json and .md, only if the load average is below
                    the number of cores at start, and at the end once this benchmark's own
                    processes, the epoch's and its loader workers', are taken off)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 10
SAMPLE_EVERY = 0.05  # seconds between memory samples
DECODE_SAMPLES = 2000
MODES = ("memory", "stream", "prepared")


# ------------------------------------------------------------------ the synthetic folder


def _write_images(task: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    root, first, last, side = task
    rng = np.random.default_rng(first)
    for index in range(first, last):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (side, side, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        folder = root / f"class{index % CLASSES:02d}"
        Image.fromarray(pixels).save(folder / f"{index:07d}.jpg", quality=90)


def make_folder(root: Path, count: int, side: int) -> float:
    """N JPEGs of side x side in CLASSES class folders; seconds taken."""
    started = time.perf_counter()
    for label in range(CLASSES):
        (root / f"class{label:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 2000
    tasks = [(root, first, min(first + chunk, count), side) for first in range(0, count, chunk)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_images, tasks))
    return time.perf_counter() - started


# ------------------------------------------------------------------ memory of a process tree


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the PSS of this process and its descendants; keeps the peak."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, seen = [os.getpid()], set()
            while pids:
                pid = pids.pop()
                if pid not in seen:
                    seen.add(pid)
                    pids += _children(pid)
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(pid) for pid in seen))
            self._stop.wait(SAMPLE_EVERY)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ one run (a subprocess)


def run_memory(folder: Path, image_size: int, batch: int, seed: int) -> dict[str, Any]:
    import torch

    from selfaugment.trainer.config import DatasetConfig
    from selfaugment.trainer.data import epoch_permutation, load_dataset

    started = time.perf_counter()
    cfg = DatasetConfig(uri=str(folder), image_size=image_size, channels=3)
    data = load_dataset(cfg, seed=seed).images
    order = torch.from_numpy(epoch_permutation(len(data), seed, 0))
    steps, checksum, first_batch = len(data) // batch, 0, None
    for step in range(steps):
        images = data[order[step * batch : (step + 1) * batch]]
        checksum += int(images[:, :, 0, 0].sum())
        if first_batch is None:
            first_batch = time.perf_counter() - started
    return {"images": steps * batch, "startup": first_batch, "total": time.perf_counter() - started}


def run_prepared(prepared_uri: str, image_size: int, batch: int, seed: int) -> dict[str, Any]:
    import torch

    from selfaugment.trainer.data import epoch_permutation, load_prepared, open_prepared_uri

    started = time.perf_counter()
    data = load_prepared(open_prepared_uri(prepared_uri), image_size, 3).images
    order = torch.from_numpy(epoch_permutation(len(data), seed, 0))
    steps, checksum, first_batch = len(data) // batch, 0, None
    for step in range(steps):
        images = data[order[step * batch : (step + 1) * batch]]
        checksum += int(images[:, :, 0, 0].sum())
        if first_batch is None:
            first_batch = time.perf_counter() - started
    return {"images": steps * batch, "startup": first_batch, "total": time.perf_counter() - started}


def run_stream(
    prepared_uri: str, image_size: int, batch: int, seed: int, workers: int
) -> dict[str, Any]:
    import numpy as np

    from selfaugment.trainer.data import StreamedImages, open_prepared_uri

    started = time.perf_counter()
    prepared = open_prepared_uri(prepared_uri)
    images = StreamedImages(prepared, image_size, 3, np.arange(prepared.count))
    loader = images.loader(seed, 0, batch, num_workers=workers)
    count, checksum, first_batch = 0, 0, None
    for batch_images, _ in loader:
        count += len(batch_images)
        checksum += int(batch_images[:, :, 0, 0].sum())
        if first_batch is None:
            first_batch = time.perf_counter() - started
    return {"images": count, "startup": first_batch, "total": time.perf_counter() - started}


def run_decode(folder: Path, prepared_uri: str, image_size: int) -> dict[str, Any]:
    """Images per second on one core: stored samples to the training size, at the stored
    size, and folder files as load_dataset decodes them."""
    import torch

    from selfaugment.trainer.data import open_prepared_uri
    from selfaugment.trainer.data.folder import decode_image, list_folder
    from selfaugment.trainer.data.stream import PreparedSamples

    torch.set_num_threads(1)
    prepared = open_prepared_uri(prepared_uri)
    count = min(DECODE_SAMPLES, prepared.count)
    rates = {}
    for name, size in (("stored_to_training_size", image_size), ("stored_at_storage_size", None)):
        samples = PreparedSamples(prepared, size, 3)
        started = time.perf_counter()
        for sample in range(count):
            samples[sample]
        rates[name] = count / (time.perf_counter() - started)
    files = list_folder(folder).files[:count]
    started = time.perf_counter()
    for path in files:
        decode_image(path, image_size, 3)
    rates["folder_file_to_training_size"] = len(files) / (time.perf_counter() - started)
    return rates


def child(args: argparse.Namespace) -> int:
    with TreeMemory() as memory:
        if args.child == "memory":
            result = run_memory(Path(args.folder), args.image_size, args.batch, args.seed)
        elif args.child == "prepared":
            result = run_prepared(args.prepared, args.image_size, args.batch, args.seed)
        elif args.child == "stream":
            result = run_stream(args.prepared, args.image_size, args.batch, args.seed, args.workers)
        else:
            result = run_decode(Path(args.folder), args.prepared, args.image_size)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = Path("/proc/self/status").read_text().splitlines()
    for field in ("RssAnon", "RssFile", "RssShmem"):  # what the main process holds at the end
        line = next((line for line in status if line.startswith(field + ":")), f"{field}: 0 kB")
        result[f"{field.lower()}_mib_at_end"] = int(line.split()[1]) / 1024
    result["peak_tree_pss_mib"] = memory.peak_kib / 1024
    print(json.dumps(result))
    return 0


def spawn(mode: str, args: argparse.Namespace, folder: Path, prepared_uri: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--folder",
        str(folder),
        "--prepared",
        prepared_uri,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# ------------------------------------------------------------------ the benchmark


def measure_size(count: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from selfaugment.trainer.config import DatasetConfig
    from selfaugment.trainer.data import prepare_dataset
    from selfaugment.trainer.store import LocalStore

    folder = scratch / f"images-{count}"
    made = make_folder(folder, count, args.source_size)
    started = time.perf_counter()
    prepared = prepare_dataset(
        DatasetConfig(uri=str(folder)), LocalStore(scratch / "prepared"), args.source_size
    )
    prepare_seconds = time.perf_counter() - started
    paths = tuple(args.paths.split(","))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in paths}
    for repeat in range(args.repeats):
        shift = repeat % len(paths)
        for mode in paths[shift:] + paths[:shift]:
            result = spawn(mode, args, folder, prepared.uri)
            print(f"  N={count} {mode}: {json.dumps(result)}", flush=True)
            runs[mode].append(result)
    decode = spawn("decode", args, folder, prepared.uri)
    summary: dict[str, Any] = {
        "images": count,
        "make_folder_seconds": made,
        "prepare_seconds": prepare_seconds,
        "prepared_bytes": sum(shard.bytes for shard in prepared.shards),
        "decode_per_core": {k: v for k, v in decode.items() if not k.startswith("peak")},
        "runs": runs,
    }
    for mode, results in runs.items():
        median = {
            key: statistics.median(run[key] for run in results)
            for key in ("startup", "total", "peak_rss_mib", "peak_tree_pss_mib")
        }
        images = results[0]["images"]
        median["images_per_second_epoch"] = images / max(1e-9, median["total"] - median["startup"])
        median["images_per_second_with_startup"] = images / median["total"]
        summary[mode] = median
    return summary


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Datasets larger than memory: in memory vs streamed (cpu)",
        "",
        f"Command: `{result['command']}` (seed {result['seed']})",
        "",
        f"Machine: {result['machine']}",
        "",
        f"Load average {result['machine']['load_average_at_start']:.2f} at start, "
        f"{result['load_average_at_end']:.2f} at end (counting this benchmark's own "
        f"{1 + result['workers']} processes); medians of {result['repeats']} interleaved "
        f"runs per path; one epoch at {result['image_size']} px of JPEGs at "
        f"{result['source_size']} px, {result['workers']} loader worker(s), batch {result['batch']}.",
        "",
        "`memory` and `prepared` decode everything during start-up (once per task); their epoch",
        "after it is index look-ups. `stream` decodes during every epoch, in its loader workers.",
        "",
        "| N | path | start-up s | images/s (epoch after start-up) | images/s (with start-up) | peak RSS MiB | peak PSS with workers MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in result["sizes"]:
        for mode in MODES:
            if mode not in size:
                continue
            m = size[mode]
            lines.append(
                f"| {size['images']} | {mode} | {m['startup']:.2f} | "
                f"{m['images_per_second_epoch']:,.0f} | {m['images_per_second_with_startup']:,.0f} | "
                f"{m['peak_rss_mib']:.0f} | {m['peak_tree_pss_mib']:.0f} |"
            )
    lines += [
        "",
        "| N | prepare s | prepared MB | decode/core: stored to training size | at storage size | folder file (load_dataset) |",
        "|---|---|---|---|---|---|",
    ]
    for size in result["sizes"]:
        d = size["decode_per_core"]
        lines.append(
            f"| {size['images']} | {size['prepare_seconds']:.1f} | {size['prepared_bytes'] / 1e6:.0f} | "
            f"{d['stored_to_training_size']:,.0f} | {d['stored_at_storage_size']:,.0f} | "
            f"{d['folder_file_to_training_size']:,.0f} |"
        )
    if len(result["sizes"]) > 1 and "stream" in result["sizes"][0]:
        small, large = result["sizes"][0], result["sizes"][-1]
        growth = large["stream"]["peak_tree_pss_mib"] / small["stream"]["peak_tree_pss_mib"] - 1
        lines += [
            "",
            f"Streamed peak PSS from N={small['images']} to N={large['images']}: "
            f"{100 * growth:+.1f}% (target < +20%); start-up "
            f"{small['stream']['startup']:.2f}s -> {large['stream']['startup']:.2f}s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated image counts")
    parser.add_argument("--source-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the stream")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paths", default=",".join(MODES), help="paths to run, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write results/data-cpu.*")
    parser.add_argument("--child", choices=(*MODES, "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    cores = os.cpu_count() or 1
    info = machine()
    sizes = [int(text) for text in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        for count in sizes:
            print(f"N={count}: making the folder, preparing, reading ...", flush=True)
            results.append(measure_size(count, args, Path(scratch)))
    result = {
        "command": "python benchmarks/bench_data.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "machine": info,
        "load_average_at_end": os.getloadavg()[0],
        "repeats": args.repeats,
        "image_size": args.image_size,
        "source_size": args.source_size,
        "workers": args.workers,
        "batch": args.batch,
        "sizes": results,
    }
    text = markdown(result)
    print(text)
    if args.write:
        # The load at the end counts this benchmark's own runnable processes (the epoch's
        # process and its loader workers); the machine was quiet if what is left is not more.
        own = 1 + args.workers
        quiet = (
            info["load_average_at_start"] < cores and result["load_average_at_end"] - own < cores
        )
        if not quiet:
            print(f"not written: load average above the {cores} cores (not a quiet machine)")
            return 1
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "data-cpu.md").write_text(text)
        print(f"written to {RESULTS}/data-cpu.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
