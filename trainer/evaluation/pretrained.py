"""Pretrain, then evaluate as the config asks: the one entry point of the CLI, workers and studies.

Training (selfaugment.trainer.moco.pretrain) knows nothing of the probes; this module runs it,
then the evaluation tasks of `cfg.evaluation` on the main process, and writes pretrain.json
(the report with its evaluation) and probe_heads.pt beside the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from selfaugment.trainer.config import PretrainConfig
from selfaugment.trainer.data.stream import StreamedImages
from selfaugment.trainer.data.types import Images
from selfaugment.trainer.evaluation.probes import evaluate_tasks
from selfaugment.trainer.moco.checkpoint import save_checkpoint
from selfaugment.trainer.moco.pretrain import (
    Augmenter,
    CheckpointCallback,
    ProgressCallback,
    train_moco,
)
from selfaugment.trainer.runtime import barrier, dist_env_from_environ

PRETRAIN_REPORT = "pretrain.json"
PROBE_HEADS = "probe_heads.pt"


def run_pretrain(
    cfg: PretrainConfig,
    output_dir: Path,
    images: Images | StreamedImages | None = None,
    progress_callback: ProgressCallback | None = None,
    augmenter: Augmenter | None = None,
    stop_epoch: int | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> dict[str, Any]:
    """Train MoCo v2 per `cfg` (resuming from output_dir/checkpoint.pt), evaluate the frozen
    backbone with `cfg.evaluation`, and return pretrain.json ({} on ranks other than 0).
    `stop_epoch`: stop after that epoch of cfg's schedule (a successive-halving rung);
    `on_checkpoint`: called after each checkpoint written inside an epoch (to mirror it).
    Streamed images are evaluated on what of them fits `dataset.memory_budget`."""
    output_dir = Path(output_dir)
    started_group = dist_env_from_environ().distributed and not dist.is_initialized()
    try:
        trained = train_moco(
            cfg, output_dir, images, progress_callback, augmenter, stop_epoch, on_checkpoint
        )
        if trained.backbone is None:  # not the main process: wait for its evaluation
            barrier()
            return {}
        evaluation = evaluate_tasks(
            trained.backbone,
            trained.images,
            None,
            cfg.evaluation,
            device=trained.device,
            seed=trained.seed,
            bf16=trained.bf16,
            memory_budget=cfg.dataset.memory_budget_bytes,
        )
        if evaluation:
            heads = {task: result.head_state for task, result in evaluation.items()}
            save_checkpoint(output_dir / PROBE_HEADS, heads)
        report = dict(
            trained.report,
            evaluation={task: result.summary() for task, result in evaluation.items()},
        )
        _write_json(output_dir / PRETRAIN_REPORT, report)
        barrier()
        return report
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
