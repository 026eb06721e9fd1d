"""prepare_dataset: shards and index in a local and an S3 store, corrupt files, reuse, resume."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data import (
    CorruptImageError,
    DatasetError,
    PreparedDataset,
    open_prepared,
    open_prepared_uri,
    prepare_dataset,
)
from selfaugment.trainer.data import prepare as prepare_module
from selfaugment.trainer.data.prepare import prepared_for_rank
from selfaugment.trainer.data.prepared import index_key, shard_table_key, shard_tar_key
from selfaugment.trainer.data.sources import folder_layout
from selfaugment.trainer.store import LocalStore, open_store

STORAGE_SIZE = 32


def config(uri: str | Path, **fields: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"uri": str(uri), **fields})


def store_files(store: LocalStore) -> dict[str, int]:
    """Key -> modification time (ns) of everything in a local store."""
    return {
        path.relative_to(store.root).as_posix(): path.stat().st_mtime_ns
        for path in store.root.rglob("*")
        if path.is_file()
    }


def test_index_names_counts_classes_and_skipped_files(prepared: PreparedDataset) -> None:
    index = prepared.index
    assert prepared.count == 12 and index["source_count"] == 13
    assert prepared.classes == ["cat", "dog"] and prepared.num_classes == 2
    assert prepared.label.tolist() == [0] * 6 + [1] * 6
    assert index["skipped"]["count"] == 1
    [(name, reason)] = prepared.skipped
    assert name == "dog/broken.jpg" and "cannot identify image file" in reason
    assert [shard.count for shard in prepared.shards] == [4, 4, 4, 0]  # the last: only broken
    assert prepared.storage_size == STORAGE_SIZE and index["sample_kind"] == "encoded"
    assert len(prepared.digest) == 64
    assert prepared.names([0, 11]) == ["cat/000.jpg", "dog/005.jpg"]


def test_shards_are_tar_files_with_each_sample_at_its_offset(prepared: PreparedDataset) -> None:
    path = prepared.store.local_path(shard_tar_key(prepared.key, 1))
    assert path is not None
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [
        "000000004.png",
        "000000005.jpg",
        "000000006.jpg",
        "000000007.jpg",  # dog/001.png, 40 px: downscaled and re-encoded
    ]
    samples = np.flatnonzero(prepared.shard == 1)
    assert [m.offset_data for m in members] == prepared.offset[samples].tolist()
    assert [m.size for m in members] == prepared.length[samples].tolist()
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)


def test_small_files_are_kept_byte_for_byte_and_large_ones_downscaled(
    prepared: PreparedDataset, image_folder: Path
) -> None:
    path = prepared.store.local_path(shard_tar_key(prepared.key, 0))
    assert path is not None
    data = path.read_bytes()
    for sample, name in enumerate(prepared.names(range(4))):
        stored = data[prepared.offset[sample] : prepared.offset[sample] + prepared.length[sample]]
        source = (image_folder / name).read_bytes()
        with Image.open(image_folder / name) as original, Image.open(io.BytesIO(stored)) as kept:
            if min(original.size) <= STORAGE_SIZE:
                assert stored == source
            else:  # shorter side to the storage size, aspect kept, re-encoded as JPEG
                assert kept.format == "JPEG" and min(kept.size) == STORAGE_SIZE
                width, height = original.size
                assert kept.size[1] == STORAGE_SIZE
                assert abs(kept.size[0] - width * STORAGE_SIZE / height) < 1


def test_second_prepare_reuses_and_writes_nothing(
    tmp_path: Path, prepared: PreparedDataset, image_folder: Path
) -> None:
    assert prepared.report is not None and not prepared.report.reused
    assert prepared.report.shards_built == 4
    store = LocalStore(tmp_path / "store")
    before = store_files(store)
    again = prepare_dataset(config(image_folder), store, STORAGE_SIZE, shard_size=4)
    assert again.report is not None and again.report.reused
    assert again.key == prepared.key and again.digest == prepared.digest
    assert store_files(store) == before


def test_the_key_follows_the_settings_and_the_source(
    tmp_path: Path, prepared: PreparedDataset, image_folder: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    other_size = prepare_dataset(config(image_folder), store, 48, shard_size=4)
    assert other_size.key != prepared.key
    (image_folder / "cat" / "zzz.png").write_bytes((image_folder / "cat" / "001.png").read_bytes())
    grown = prepare_dataset(config(image_folder), store, STORAGE_SIZE, shard_size=4)
    assert grown.key != prepared.key and grown.count == 13
    assert open_prepared(store, prepared.key).count == 12  # the earlier one is untouched


def test_an_interrupted_prepare_keeps_finished_shards(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    build = prepare_module._build_shard
    built: list[int] = []

    def failing_build(*args: object, **kwargs: object) -> object:
        shard = args[4]
        assert isinstance(shard, int)
        if shard == 2 and -1 not in built:  # the first attempt at shard 2 is stopped
            built.append(-1)
            raise KeyboardInterrupt
        built.append(shard)
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "_build_shard", failing_build)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config(image_folder), store, STORAGE_SIZE, shard_size=4)
    keys = store.list()
    assert not any(k.endswith("index.json") for k in keys)  # not done
    finished = store_files(store)
    assert sum(k.endswith(".json") for k in finished) == 2  # shards 0 and 1
    with pytest.raises(DatasetError, match="no prepared dataset here"):
        open_prepared(store, keys[0].split("/")[0])

    resumed = prepare_dataset(config(image_folder), store, STORAGE_SIZE, shard_size=4)
    assert built == [0, 1, -1, 2, 3]
    assert resumed.report is not None and resumed.report.shards_kept == 2
    assert resumed.report.shards_built == 2
    assert all(store_files(store)[k] == mtime for k, mtime in finished.items())
    whole = prepare_dataset(
        config(image_folder), LocalStore(tmp_path / "fresh"), STORAGE_SIZE, shard_size=4
    )
    assert whole.digest == resumed.digest  # shards are byte-for-byte deterministic
    assert store.exists(index_key(resumed.key))


def test_on_corrupt_fail_stops_at_the_corrupt_file(tmp_path: Path, image_folder: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        prepare_dataset(config(image_folder, on_corrupt="fail"), store, STORAGE_SIZE)


def test_a_folder_of_nothing_readable_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 1 items could be read"):
        prepare_dataset(config(folder), LocalStore(tmp_path / "store"), STORAGE_SIZE)


def test_settings_out_of_range_name_the_field(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DatasetError, match="storage_size"):
        prepare_dataset(config(image_folder), LocalStore(tmp_path / "s"), 4)
    with pytest.raises(DatasetError, match="jpeg_quality"):
        prepare_dataset(config(image_folder), LocalStore(tmp_path / "s"), 32, jpeg_quality=101)


def test_array_sources_are_stored_as_raw_pixels(tmp_path: Path) -> None:
    prepared = prepare_dataset(config("sklearn:digits"), LocalStore(tmp_path / "store"), 32)
    assert prepared.kind == "array" and prepared.count == 1797 and prepared.num_classes == 10
    assert prepared.classes is None and prepared.label[:3].tolist() == [0, 1, 2]
    assert prepared.names([5]) == ["digits#5"]


def test_folder_layout_of_keys_matches_local_folders(image_folder: Path) -> None:
    from selfaugment.trainer.data.folder import list_folder

    listing = list_folder(image_folder)
    keys = [p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*")]
    names, labels, classes = folder_layout([*keys, ".hidden/x.jpg", "cat/.x.jpg", "notes.txt"])
    assert names == [p.relative_to(image_folder).as_posix() for p in listing.files]
    assert labels == listing.labels and classes == listing.classes


def _upload_folder(endpoint: str, bucket: str, prefix: str, folder: Path) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def test_prepare_into_s3_from_an_s3_prefix_and_read_back(
    s3_server: str, tmp_path: Path, image_folder: Path, prepared: PreparedDataset
) -> None:
    _upload_folder(s3_server, "data", "raw/pets", image_folder)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="prepared")
    store = open_store("s3://prepared/datasets")
    remote = prepare_dataset(config("s3://data/raw/pets"), store, STORAGE_SIZE, shard_size=4)
    assert remote.count == 12 and remote.classes == ["cat", "dog"]
    assert remote.skipped == prepared.skipped
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in prepared.shards]
    assert store.exists(shard_table_key(remote.key, 3)) and store.exists(index_key(remote.key))
    again = open_prepared_uri(remote.uri)
    assert again.digest == remote.digest and again.count == 12
    reused = prepare_dataset(config("s3://data/raw/pets/"), store, STORAGE_SIZE, shard_size=4)
    assert reused.report is not None and reused.report.reused


def test_prepare_a_local_folder_into_s3(
    s3_server: str, image_folder: Path, prepared: PreparedDataset
) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="prepared")
    store = open_store("s3://prepared")
    remote = prepare_dataset(config(image_folder), store, STORAGE_SIZE, shard_size=4)
    assert remote.key == prepared.key and remote.digest == prepared.digest
    assert remote.uri == f"s3://prepared/{remote.key}"


def test_a_missing_index_names_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no prepared dataset here"):
        open_prepared(LocalStore(tmp_path), "nothing-0123")


def test_other_ranks_wait_for_the_main_rank_to_prepare(tmp_path: Path, image_folder: Path) -> None:
    store, cfg = LocalStore(tmp_path / "store"), config(image_folder)
    with pytest.raises(DatasetError, match="did not appear within"):  # nobody prepares it
        prepared_for_rank(cfg, store, 32, main=False, poll_seconds=0.01, timeout_seconds=0.05)
    waited: list[PreparedDataset] = []
    waiting = threading.Thread(
        target=lambda: waited.append(
            prepared_for_rank(cfg, store, 32, main=False, poll_seconds=0.01, timeout_seconds=60)
        )
    )
    waiting.start()
    main = prepared_for_rank(cfg, store, 32, main=True)
    waiting.join(60)
    assert main.report is not None and not main.report.reused  # the main rank built it
    assert [other.key for other in waited] == [main.key]
    assert waited[0].index["digest"] == main.index["digest"]
