"""The artifact store (a local directory or S3/MinIO) and the layout of a search run in it."""

from selfaugment.trainer.store.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    LocalStore,
    S3Store,
    StoreError,
    open_store,
)

__all__ = [
    "ArtifactNotFoundError",
    "ArtifactStore",
    "LocalStore",
    "S3Store",
    "StoreError",
    "open_store",
]
