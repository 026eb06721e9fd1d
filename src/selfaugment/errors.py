"""The one base of every error that means "the input or the environment is wrong", not a bug.

The CLI prints a `SelfAugmentError` as one line (`selfaugment: error: ...`, exit 2) instead of a
traceback; the operator turns it into a condition and an Event. Each part of the product defines
its own subclass next to the code that raises it (ConfigError in trainer/config.py, StoreError in
trainer/store/, ...); the message names the field, file or object at fault.

This module imports nothing, so anything (the operator image without PyTorch among it) can use it.
"""


class SelfAugmentError(Exception):
    """Bad input or an unusable environment, reported to the user in one message."""


#: The exit status of `selfaugment` on a SelfAugmentError; the local runner does not retry a
#: worker that exits with it (the same input fails the same way).
EXIT_BAD_INPUT = 2

#: What the CLI, and a local worker for each task it serves, report as one line and
#: EXIT_BAD_INPUT rather than as a traceback.
BAD_INPUT_ERRORS = (SelfAugmentError, FileNotFoundError)


def error_line(error: BaseException) -> str:
    """The one line a bad input is reported as."""
    return f"selfaugment: error: {error}"
