"""The exceptions that mean "the user gave something wrong": printed as one message, exit 2."""

from __future__ import annotations

from selfaugment.trainer.checkpoint import CheckpointError
from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.data_types import DatasetError
from selfaugment.trainer.policy_model import PolicyError
from selfaugment.trainer.pretrain import PretrainError
from selfaugment.trainer.probes import ProbeError
from selfaugment.trainer.run_state import RunMismatchError
from selfaugment.trainer.runner import TaskFailedError
from selfaugment.trainer.store import StoreError
from selfaugment.trainer.tasks import TaskInputError

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
