"""`selfaugment data prepare|show`: prepare a dataset into a store once, and look at one.

    selfaugment data prepare SOURCE [--store STORE] [--storage-size 256] ...
    selfaugment data show PREPARED_URI

`prepare` prints the prepared dataset's URI (what a config or a task result names) and a
summary; run again, it finds the dataset prepared and does nothing, or finishes an
interrupted preparation.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import ValidationError

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data.prepare import prepare_dataset
from selfaugment.trainer.data.prepared import PreparedDataset, open_prepared_uri
from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store import open_store
from selfaugment.trainer.store.s3 import cache_root


def default_store() -> str:
    """Where `data prepare` keeps prepared datasets unless --store says otherwise."""
    return str(cache_root() / "datasets")


def _dataset_config(args: argparse.Namespace) -> DatasetConfig:
    fields = {
        "uri": args.source,
        "format": args.format,
        "split": args.split,
        "root": args.root,
        "download": args.download,
        "on_corrupt": args.on_corrupt,
    }
    try:
        return DatasetConfig.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DatasetError(f"dataset.{where}: {first['msg']}") from None


def describe(prepared: PreparedDataset) -> dict[str, Any]:
    """The index without its per-file lists, plus where the dataset is and what was done."""
    index = prepared.index
    summary = {
        "uri": prepared.uri,
        "count": prepared.count,
        "storage_size": prepared.storage_size,
        "sample_kind": prepared.kind,
        "source": index["source"],
        "settings": index["settings"],
        "classes": prepared.classes,
        "num_classes": prepared.num_classes,
        "shards": len(index["shards"]),
        "bytes": sum(shard["bytes"] for shard in index["shards"]),
        "skipped": index["skipped"],
        "digest": prepared.digest,
    }
    if prepared.report is not None:
        summary["reused"] = prepared.report.reused
        summary["shards_built"] = prepared.report.shards_built
        summary["shards_kept"] = prepared.report.shards_kept
        summary["seconds"] = round(prepared.report.seconds, 3)
    return summary


def _print(prepared: PreparedDataset, as_json: bool) -> None:
    summary = describe(prepared)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(prepared.summary())
    report = prepared.report
    if report is not None:
        done = (
            "reused (already prepared)"
            if report.reused
            else (f"{report.shards_built} shard(s) built, {report.shards_kept} kept")
        )
        print(f"{done} in {report.seconds:.1f}s")
    print(f"{summary['bytes'] / 1e6:.1f} MB, digest {prepared.digest[:16]}")
    for name, reason in prepared.skipped[:10]:
        print(f"  skipped {name}: {reason}")
    print(prepared.uri)


def data_command(args: argparse.Namespace) -> int:
    """Run `selfaugment data prepare|show`."""
    if args.data_command == "show":
        _print(open_prepared_uri(args.prepared, endpoint=args.endpoint), args.json)
        return 0
    store = open_store(args.store or default_store(), endpoint=args.endpoint)
    prepared = prepare_dataset(
        _dataset_config(args),
        store,
        args.storage_size,
        shard_size=args.shard_size,
        encoding=args.encoding,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
    )
    _print(prepared, args.json)
    return 0
