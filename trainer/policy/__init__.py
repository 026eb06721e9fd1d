"""Augmentation policies: the data model, files and built-ins, and their batched application.

The public interface (README, docs/using-a-policy.md)::

    from selfaugment.trainer.policy import BatchAugmenter, PolicyTransform, load_policy
"""

from selfaugment.trainer.policy.apply import AugmentPlan, sample_plan
from selfaugment.trainer.policy.augmenter import (
    BatchAugmenter,
    PolicyTransform,
    apply_plan_pil,
    apply_policy_pil,
)
from selfaugment.trainer.policy.builtins import (
    load_policy,
    mocov2_policy,
    resolve_policy,
    save_policy,
)
from selfaugment.trainer.policy.model import (
    AnyPolicy,
    OpSetting,
    Policy,
    PolicyError,
    RandAugment,
    describe,
    expected_strength,
    merge,
)

__all__ = [
    "AnyPolicy",
    "AugmentPlan",
    "BatchAugmenter",
    "OpSetting",
    "Policy",
    "PolicyError",
    "PolicyTransform",
    "RandAugment",
    "apply_plan_pil",
    "apply_policy_pil",
    "describe",
    "expected_strength",
    "load_policy",
    "merge",
    "mocov2_policy",
    "resolve_policy",
    "sample_plan",
    "save_policy",
]
