"""Shards: plain POSIX tar files, one member per sample, written the same way every time.

Why tar: any tool can list or unpack a shard (`tar tf 00000.tar`), and the layout is
webdataset's (members named `<key>.<ext>`), so a user's own webdataset pipeline can read them.
Why our own offsets: the index records where each sample's bytes start and how long they are,
so the reader fetches one sample with one positioned read, in any order; a tar stream alone
only reads front to back.

Headers carry no time, owner or host, so the same samples give the same bytes and the same
SHA-256 on any machine, and a shard rebuilt after an interruption is identical to the first.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = tarfile.BLOCKSIZE
HASH_CHUNK = 1 << 20


@dataclass
class ShardTable:
    """What one shard holds: per sample (name in the source, source position, label, byte
    offset and length in the tar), the files skipped in its range, how many images were
    downscaled, and the tar's size and SHA-256. Written as JSON after the tar: its existence marks the shard finished."""

    count: int = 0
    bytes: int = 0
    sha256: str = ""
    names: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    downscaled: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "names": self.names,
            "positions": self.positions,
            "labels": self.labels,
            "offsets": self.offsets,
            "lengths": self.lengths,
            "skipped": [list(item) for item in self.skipped],
            "downscaled": self.downscaled,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardTable:
        return cls(
            count=int(data["count"]),
            bytes=int(data["bytes"]),
            sha256=str(data["sha256"]),
            names=list(data["names"]),
            positions=[int(v) for v in data["positions"]],
            labels=[int(v) for v in data["labels"]],
            offsets=[int(v) for v in data["offsets"]],
            lengths=[int(v) for v in data["lengths"]],
            skipped=[(str(name), str(reason)) for name, reason in data["skipped"]],
            downscaled=int(data["downscaled"]),
        )


class ShardWriter:
    """Appends samples to a tar file, recording each one's data offset and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = ShardTable()
        # Closed by close() (or on leaving a `with` block): the writer owns the open file.
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def add(self, member: str, data: bytes, name: str, position: int, label: int) -> None:
        """Add one sample as tar member `member` (e.g. '000000042.jpg')."""
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // BLOCK) * BLOCK
        table = self.table
        table.offsets.append(self._tar.offset - padded)  # the data follows its header
        table.lengths.append(len(data))
        table.names.append(name)
        table.positions.append(position)
        table.labels.append(label)
        table.count += 1

    def close(self) -> ShardTable:
        """Finish the tar; the table gets the file's size and SHA-256."""
        self._tar.close()
        self.table.bytes = self.path.stat().st_size
        self.table.sha256 = file_sha256(self.path)
        return self.table


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
