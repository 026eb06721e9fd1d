"""SelfAugment: label-free augmentation-policy search for self-supervised learning.

The distribution maps the top-level ``trainer/`` and ``operator/`` folders into this
namespace (``selfaugment.trainer``, ``selfaugment.operator``) so that the folder named
``operator`` never shadows the standard-library module of that name.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("selfaugment")  # pyproject.toml's version, the one copy
except PackageNotFoundError:  # pragma: no cover - running from a source tree not installed
    __version__ = "0+unknown"

#: The version of every result.json, report.json and pretrain.json schema.
RESULT_SCHEMA_VERSION = 1
