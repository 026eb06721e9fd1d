"""The exceptions that mean "the user gave something wrong": printed as one message, exit 2."""

from __future__ import annotations

from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.run_state import RunMismatchError
from selfaugment.trainer.runner import TaskFailedError
from selfaugment.trainer.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    RunMismatchError,
    StoreError,
    TaskFailedError,
    FileNotFoundError,
)
