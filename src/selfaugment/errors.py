"""The exceptions that mean "the user gave something wrong": printed as one message, exit 2."""

from __future__ import annotations

from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.evaluation.probes import ProbeError
from selfaugment.trainer.moco.checkpoint import CheckpointError
from selfaugment.trainer.moco.pretrain import PretrainError
from selfaugment.trainer.policy.model import PolicyError
from selfaugment.trainer.search.runner import TaskFailedError
from selfaugment.trainer.search.tasks import TaskInputError
from selfaugment.trainer.store import StoreError
from selfaugment.trainer.store.layout import RunMismatchError

USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    ConfigError,
    DatasetError,
    PolicyError,
    PretrainError,
    ProbeError,
    RunMismatchError,
    StoreError,
    TaskFailedError,
    TaskInputError,
    FileNotFoundError,
)
