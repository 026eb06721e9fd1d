"""SelfAugment: label-free augmentation-policy search for self-supervised learning.

The distribution maps the top-level ``trainer/`` and ``operator/`` folders into this
namespace (``selfaugment.trainer``, ``selfaugment.operator``) so that the folder named
``operator`` never shadows the standard-library module of that name.
"""

__version__ = "0.1.0"
RESULT_SCHEMA_VERSION = 1
