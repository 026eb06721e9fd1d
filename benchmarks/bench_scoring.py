"""Candidates scored per minute: the search's scorer against a plain per-trial pipeline.

Both score the same random candidate policies with the same forward passes (rotation loss of
the rotation head over 4 rotations, InfoNCE between two views under the frozen encoders) on
the same held-out images and the same trained checkpoint:

  baseline  per trial: load the checkpoint, build a DataLoader over the held-out images that
            converts each image to PIL, applies crop/flip and the policy per image (the PIL
            reference ops), converts back to tensors and collates (what a plain
            implementation of Fast AutoAugment-style scoring does);
  scorer    PolicyScorer: checkpoint loaded once, held-out images decoded once on the device,
            the policy applied to whole batches by BatchAugmenter, the 4 rotations and the
            key view through the encoders in cache-sized chunks on the CPU
            (models.inference_chunk);

and, as references in the same run: the scorer before it shared passes (6 passes), the scorer
with every pass as one batch (no chunks), and the forward passes alone on views made
beforehand (the limit the scorer cannot exceed).

Usage: python benchmarks/bench_scoring.py [--candidates 6] [--heldout 512] [--device cpu] [--write]
Prints the results; with --write, also benchmarks/results/scoring-<device>.json and .md (marked
when the load average exceeded the number of cores: benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from selfaugment.trainer.augment.ops import OP_NAMES
from selfaugment.trainer.config import DatasetConfig, PretrainConfig, ProbeConfig
from selfaugment.trainer.data import holdout_split, load_dataset
from selfaugment.trainer.evaluation.pretrained import run_pretrain
from selfaugment.trainer.evaluation.probes import train_probe
from selfaugment.trainer.evaluation.scoring import PolicyScorer, rotation_head_from_state
from selfaugment.trainer.moco import models
from selfaugment.trainer.moco.checkpoint import checkpoint_config, load_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.policy import OpSetting, Policy, apply_policy_pil


def random_policy(rng: random.Random, sub_policies: int = 5, ops: int = 2) -> Policy:
    return Policy(
        [
            [OpSetting(rng.choice(OP_NAMES), rng.random(), rng.random()) for _ in range(ops)]
            for _ in range(sub_policies)
        ]
    )


class PilViews(Dataset):
    """Two augmented views per image, made per image with PIL (the baseline pipeline)."""

    def __init__(self, images: torch.Tensor, policy: Policy, seed: int) -> None:
        self.images = images
        self.policy = policy
        self.rng = random.Random(seed)
        size = images.shape[-1]
        self.crop = v2.Compose(
            [v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def _view(self, image: Image.Image) -> torch.Tensor:
        return TF.to_tensor(apply_policy_pil(self.policy, self.crop(image), self.rng))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        array = self.images[index]
        mode = "L" if array.shape[0] == 1 else "RGB"
        pil = Image.fromarray(
            array[0].numpy() if mode == "L" else array.permute(1, 2, 0).numpy(), mode
        )
        return self._view(pil), self._view(pil)


@torch.no_grad()
def baseline_score(
    checkpoint: Path, head_state: dict, images: torch.Tensor, policy: Policy, batch: int
) -> dict[str, float]:
    payload = load_checkpoint(checkpoint)
    cfg = checkpoint_config(payload, str(checkpoint))
    model = MoCo(build_backbone(cfg.model, images.shape[1]), cfg.moco)
    model.load_state_dict(payload["model"])
    model.eval()
    head = rotation_head_from_state(head_state).eval()
    loader = DataLoader(PilViews(images, policy, seed=0), batch_size=batch, shuffle=False)
    rotation = infonce = 0.0
    for view_q, view_k in loader:
        for turns in range(4):
            logits = head(model.backbone(torch.rot90(view_q, turns, (2, 3))))
            targets = torch.full((view_q.shape[0],), turns, dtype=torch.long)
            rotation += F.cross_entropy(logits, targets, reduction="sum").item()
        loss, _ = model.contrastive_loss_eval(view_q, view_k)
        infonce += loss.item() * view_q.shape[0]
    count = images.shape[0]
    return {"rotation_loss": rotation / (4 * count), "infonce": infonce / count}


class PreviousScorer(PolicyScorer):
    """The scorer before it shared passes (kept here as a baseline): the 4 rotations one batch
    at a time, and the query encoder run again on the upright view for InfoNCE (6 passes)."""

    @torch.no_grad()
    def score(self, policy: Any) -> Any:
        augmenter = self.make_augmenter(policy)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        rotation = infonce = 0.0
        for start in range(0, self.images.shape[0], self.batch_size):
            batch = self.images[start : start + self.batch_size]
            view_q, view_k = augmenter(batch, generator), augmenter(batch, generator)
            for turns in range(4):
                logits = self.rotation_head(self.model.backbone(torch.rot90(view_q, turns, (2, 3))))
                targets = torch.full((batch.shape[0],), turns, dtype=torch.long)
                rotation += F.cross_entropy(logits, targets, reduction="sum").item()
            loss, _ = self.model.contrastive_loss_eval(view_q, view_k)
            infonce += loss.item() * batch.shape[0]
        return rotation, infonce


class UnchunkedScorer(PolicyScorer):
    """The scorer before its forward passes ran in cache-sized chunks on the CPU (kept here as
    a baseline): the 4 rotations as one batch of 4 x --batch images, the key encoder on --batch."""

    def _score_batch(self, *args: Any, **kwargs: Any) -> Any:
        saved = models.CPU_CHUNK_BYTES
        models.CPU_CHUNK_BYTES = 2**62  # every chunk as large as the batch
        try:
            return super()._score_batch(*args, **kwargs)
        finally:
            models.CPU_CHUNK_BYTES = saved


@torch.no_grad()
def forward_only(scorer: PolicyScorer, views: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The scorer's forward passes on views made beforehand: the rate it cannot exceed."""
    for view_q, view_k in views:
        count = view_q.shape[0]
        rotated = torch.cat([torch.rot90(view_q, turns, (2, 3)) for turns in range(4)])
        size = (rotated.shape[-2], rotated.shape[-1])
        chunk = models.inference_chunk(scorer.model.backbone, size, scorer.device, len(rotated))
        raw = models.forward_in_chunks(scorer.model.backbone, rotated, chunk)
        scorer.rotation_head(raw.float())
        scorer.model.contrastive_loss_eval(None, view_k, query_features=raw[:count], chunk=chunk)


def premade_views(scorer: PolicyScorer, policy: Policy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    augmenter = scorer.make_augmenter(policy)
    generator = torch.Generator().manual_seed(scorer.seed)
    views = []
    for start in range(0, scorer.images.shape[0], scorer.batch_size):
        batch = scorer.images[start : start + scorer.batch_size]
        views.append((augmenter(batch, generator), augmenter(batch, generator)))
    return views


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--heldout", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    common.add_output_arguments(parser)
    args = parser.parse_args()
    load = common.Load()
    machine_at_start = machine()
    torch.manual_seed(args.seed)
    dataset = DatasetConfig(uri="sklearn:digits", image_size=args.image_size, channels=3)
    data = load_dataset(dataset, seed=args.seed)
    train_index, heldout_index = holdout_split(len(data), args.heldout / len(data), args.seed)
    train, heldout = data.subset(train_index), data.subset(heldout_index)
    config = PretrainConfig.model_validate(
        {
            "dataset": dataset.model_dump(),
            "model": {"width": args.width},
            "moco": {"dim": 32, "queue_size": 512},
            "optim": {"epochs": 1, "batch_size": 128},
            "runtime": {"device": args.device, "progress": False, "seed": args.seed},
            "evaluation": {"tasks": []},
        }
    )
    with tempfile.TemporaryDirectory() as directory:
        run_pretrain(config, Path(directory), images=train)
        checkpoint = Path(directory) / "checkpoint.pt"
        payload = load_checkpoint(checkpoint)
        backbone = build_backbone(config.model, 3)
        backbone.load_state_dict(
            {
                k.removeprefix("encoder_q.backbone."): v
                for k, v in payload["model"].items()
                if k.startswith("encoder_q.backbone.")
            }
        )
        probe = train_probe(
            backbone, "rotation", train.images, heldout.images, ProbeConfig(epochs=2)
        )
        rng = random.Random(args.seed)
        policies = [random_policy(rng) for _ in range(args.candidates)]

        def warmed_up(kind: type[PolicyScorer]) -> PolicyScorer:
            made = kind.from_checkpoint(
                checkpoint,
                probe.head_state,
                heldout.images,
                device=args.device,
                batch_size=args.batch,
                seed=args.seed,
            )
            made.score(policies[0])  # warm-up
            return made

        started = time.perf_counter()
        scorer = warmed_up(PolicyScorer)
        scorer_setup = time.perf_counter() - started
        previous = warmed_up(PreviousScorer)
        unchunked = warmed_up(UnchunkedScorer)
        # interleaved per candidate, so that a change of load affects every pipeline alike
        scorer_times, previous_times, limit_times, baseline_times = [], [], [], []
        unchunked_times: list[float] = []
        largest_difference = 0.0
        for policy in policies:
            tick = time.perf_counter()
            score = scorer.score(policy)
            scorer_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            previous.score(policy)
            previous_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            reference = unchunked.score(policy)
            unchunked_times.append(time.perf_counter() - tick)
            largest_difference = max(
                largest_difference,
                abs(score.rotation_loss - reference.rotation_loss),
                abs(score.infonce - reference.infonce),
            )
            views = premade_views(scorer, policy)
            tick = time.perf_counter()
            forward_only(scorer, views)
            limit_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            baseline_score(checkpoint, probe.head_state, heldout.images, policy, args.batch)
            baseline_times.append(time.perf_counter() - tick)

    scorer_rate = 60.0 / statistics.median(scorer_times)
    previous_rate = 60.0 / statistics.median(previous_times)
    unchunked_rate = 60.0 / statistics.median(unchunked_times)
    limit_rate = 60.0 / statistics.median(limit_times)
    baseline_rate = 60.0 / statistics.median(baseline_times)
    result = {
        "command": "python " + " ".join(sys.argv),
        "seed": args.seed,
        "machine": machine_at_start,
        "setup": {
            "dataset": "sklearn digits, upscaled, 3 channels",
            "heldout_images": len(heldout),
            "image_size": args.image_size,
            "model": f"resnet18 width {args.width}, CIFAR stem",
            "candidates": args.candidates,
            "candidate_shape": "5 sub-policies x 2 ops, random",
            "batch_size": args.batch,
            "device": args.device,
        },
        "scorer_seconds_per_candidate": statistics.median(scorer_times),
        "scorer_setup_seconds": scorer_setup,
        "baseline_seconds_per_candidate": statistics.median(baseline_times),
        "scorer_candidates_per_minute": scorer_rate,
        "baseline_candidates_per_minute": baseline_rate,
        "speedup": scorer_rate / baseline_rate,
        "previous_scorer_candidates_per_minute": previous_rate,
        "speedup_over_previous_scorer": scorer_rate / previous_rate,
        "unchunked_scorer_candidates_per_minute": unchunked_rate,
        "speedup_over_unchunked_scorer": scorer_rate / unchunked_rate,
        "largest_score_difference_chunked_vs_unchunked": largest_difference,
        "inference_chunk": models.inference_chunk(
            scorer.model.backbone,
            (args.image_size, args.image_size),
            torch.device(args.device),
            4 * args.batch,
        ),
        "forward_only_candidates_per_minute": limit_rate,
        "fraction_of_forward_only_limit": scorer_rate / limit_rate,
        "load_average_at_end": os.getloadavg()[0],
    }
    load.finish()
    name = f"scoring-{args.device.split(':')[0]}"
    lines = [
        f"# Candidate scoring speed ({args.device})",
        "",
        f"Command: `{result['command']}` (seed {args.seed})",
        "",
        f"Machine: {result['machine']}",
        "",
        "| pipeline | seconds per candidate | candidates per minute |",
        "|---|---|---|",
        f"| plain per-trial DataLoader, per-image PIL policy | {result['baseline_seconds_per_candidate']:.3f} | {baseline_rate:.1f} |",
        f"| PolicyScorer before sharing passes (6 backbone passes per image) | {60 / previous_rate:.3f} | {previous_rate:.1f} |",
        f"| PolicyScorer with 5 passes, each one batch of up to {4 * args.batch} images | {60 / unchunked_rate:.3f} | {unchunked_rate:.1f} |",
        f"| PolicyScorer (5 passes, in chunks of {result['inference_chunk']} images on the CPU) | {result['scorer_seconds_per_candidate']:.3f} | {scorer_rate:.1f} |",
        f"| forward passes only, on views made beforehand (the limit) | {60 / limit_rate:.3f} | {limit_rate:.1f} |",
        "",
        f"The scorer runs at **{result['fraction_of_forward_only_limit']:.0%}** of its "
        f"forward-only limit and **{result['speedup_over_previous_scorer']:.2f}x** the "
        f"scorer with 6 passes, **{result['speedup_over_unchunked_scorer']:.2f}x** the "
        f"scorer without chunks ({load.line()}; medians of interleaved runs). Chunks change "
        f"the scores by at most {largest_difference:.1e} (rotation loss, InfoNCE).",
        "",
        f"Speed-up: **{result['speedup']:.1f}x** ({len(heldout)} held-out images, "
        f"{args.image_size}px, {result['setup']['model']}).",
    ]
    common.finish(args, name, result, "\n".join(lines) + "\n", load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
