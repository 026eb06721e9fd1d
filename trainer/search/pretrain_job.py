"""A standalone Pretrain resource's job (`selfaugment worker pretrain --prefix P`).

A dataset read from files is prepared first into the datasets store beside the Pretrain's
prefix (`s3://<bucket>/datasets/`, shared with searches): by the main process, while the
other ranks wait for its index; then streamed when it does not fit `dataset.memory_budget`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfaugment import RESULT_SCHEMA_VERSION
from selfaugment.trainer.config import (
    PretrainConfig,
    parse_config,
)
from selfaugment.trainer.search.context import ProgressWriter, work_directory
from selfaugment.trainer.search.scratch import SCRATCH_CHECKPOINT, CheckpointMirror
from selfaugment.trainer.search.stages import epoch_reporter
from selfaugment.trainer.store import ArtifactStore
from selfaugment.trainer.store.layout import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    PROGRESS_NAME,
    RESULT_NAME,
    datasets_store,
    prefixed_key,
)


def run_pretrain_job(store: ArtifactStore, prefix: str) -> dict[str, Any]:
    """A standalone Pretrain: `<prefix>/config.json` in, checkpoint and result.json out."""
    from selfaugment.trainer.evaluation.pretrained import run_pretrain
    from selfaugment.trainer.moco.pretrain import open_training_images
    from selfaugment.trainer.runtime import dist_env_from_environ

    prefix = prefix.strip("/")
    config_key = prefixed_key(prefix, CONFIG_NAME)
    cfg = parse_config(PretrainConfig, store.read_json(config_key), store.url(config_key))
    workdir = work_directory(store, f"{prefix}/work", cfg.model_dump_json())
    cfg = _localise_uris(store, cfg, workdir)
    mirror = CheckpointMirror(
        store,
        prefixed_key(prefix, SCRATCH_CHECKPOINT),
        workdir / "pretrain" / CHECKPOINT_NAME,
        cfg.runtime.checkpoint_every,
    )
    mirror.restore()  # every rank: a preempted attempt's epochs are not trained again
    on_epoch = mirror.wrap(
        epoch_reporter(ProgressWriter(store, prefixed_key(prefix, PROGRESS_NAME)), cfg.optim.epochs)
    )
    images = open_training_images(
        cfg.dataset, cfg.runtime.seed, datasets_store(store), main=dist_env_from_environ().is_main
    )
    result = run_pretrain(
        cfg,
        workdir / "pretrain",
        images=images,
        progress_callback=on_epoch,
        on_checkpoint=mirror.upload,
    )
    if not result:  # not the main process: rank 0 stores the outcome
        return result
    key = prefixed_key(prefix, CHECKPOINT_NAME)
    store.upload_file(workdir / "pretrain" / CHECKPOINT_NAME, key)
    result = dict(result, checkpoint=store.url(key), schema_version=RESULT_SCHEMA_VERSION)
    store.write_json(prefixed_key(prefix, RESULT_NAME), result)
    mirror.discard()
    return result


def _localise_uris(store: ArtifactStore, cfg: PretrainConfig, workdir: Path) -> PretrainConfig:
    """Download s3:// policy and init_from URIs so training reads local files."""
    from selfaugment.trainer.store import open_store

    def local_copy(uri: str, name: str) -> str:
        if not uri.startswith("s3://"):
            return uri
        bucket_store = open_store(uri.rsplit("/", 1)[0])
        path = bucket_store.download_file(uri.rsplit("/", 1)[1], workdir / "inputs" / name)
        return str(path)

    update: dict[str, Any] = {}
    if cfg.init_from:
        update["init_from"] = local_copy(cfg.init_from, "init.pt")
    if cfg.augment.policy.startswith("s3://"):
        augment = cfg.augment.model_copy(
            update={"policy": local_copy(cfg.augment.policy, "policy.json")}
        )
        update["augment"] = augment
    return cfg.model_copy(update=update) if update else cfg
