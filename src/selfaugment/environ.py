"""Reading settings from environment variables, with errors that name the variable."""

from __future__ import annotations

import os

from selfaugment.errors import SelfAugmentError


class EnvironmentSettingError(SelfAugmentError, ValueError):
    """An environment variable holds a value of the wrong kind."""


def env_int(name: str, default: int) -> int:
    """The integer in $name; unset or empty gives `default`."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise EnvironmentSettingError(
            f"environment variable {name}={raw!r}: expected an integer"
        ) from None
