"""Policy files (load/save) and built-in policies, resolved from a spec string.

``resolve_policy(spec)`` understands:

- ``'none'``: the identity (one empty sub-policy; crop and flip still apply in
  ``BatchAugmenter``, so this is the paper's "random resized crop + flip" base);
- ``'mocov2'``: a MoCo v2-style colour-heavy policy built from our ops (below; the same
  content as ``examples/mocov2-policy.json``);
- ``'randaugment:N:M'``: RandAugment with N ops per image at level M of 0..30;
- an op name such as ``'Rotate'`` (any case): the paper's single-transform policy,
  p = 1 and a magnitude drawn uniformly from [0, 1] at each application;
- otherwise a path to a policy JSON file.
"""

from __future__ import annotations

import difflib
import itertools
import os
import tempfile
from pathlib import Path

from selfaugment.trainer.augment.ops import OP_NAMES
from selfaugment.trainer.policy.model import (
    AnyPolicy,
    OpSetting,
    Policy,
    PolicyError,
    RandAugment,
)

BUILTIN_NAMES = ("none", "mocov2", "randaugment:N:M", *OP_NAMES)

# MoCo v2 (arXiv:2003.04297) applies ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8,
# grayscale with p = 0.2 and Gaussian blur with p = 0.5. With our ops: factor
# 1 +- 0.9 * 0.45 = 1 +- 0.4 is ColorJitter's extreme, in either direction; Color at
# magnitude 1 with direction -1 (factor 0.1) is the near-grayscale step and Sharpness at
# magnitude 1 with direction -1 the blur (with a random direction they oversaturated or
# sharpened half of the time). Hue jitter has no counterpart among the 15 ops.
_JITTER = 0.45


def mocov2_policy() -> Policy:
    """The built-in 'mocov2' policy: five colour-jitter sub-policies of three ops each."""
    brightness = OpSetting("Brightness", 0.8, _JITTER)
    contrast = OpSetting("Contrast", 0.8, _JITTER)
    color = OpSetting("Color", 0.8, _JITTER)
    return Policy(
        [
            [brightness, contrast, color],
            [contrast, color, brightness],
            [color, brightness, contrast],
            [brightness, contrast, OpSetting("Color", 1.0, 1.0, direction=-1)],
            [brightness, color, OpSetting("Sharpness", 0.5, 1.0, direction=-1)],
        ],
        name="mocov2",
    )


def identity_policy() -> Policy:
    """The built-in 'none' policy: one empty sub-policy."""
    return Policy([[]], name="none")


def single_transform_policy(op: str) -> Policy:
    """p = 1, magnitude random in [0, 1] at each application (paper, base-policy stage)."""
    return Policy([[OpSetting(op, 1.0, None)]], name=op)


def randaugment_as_policy(randaugment: RandAugment) -> Policy:
    """The same distribution as an explicit policy: every ordered N-tuple of the 15 ops is one
    sub-policy (p = 1, magnitude M/30), and a sub-policy is drawn uniformly, which is N ops
    drawn uniformly with replacement (15**N sub-policies: 15, 225, 3,375)."""
    sub_policies = [
        [OpSetting(op, 1.0, randaugment.magnitude) for op in ops]
        for ops in itertools.product(OP_NAMES, repeat=randaugment.num_ops)
    ]
    return Policy(sub_policies, name=randaugment.name)


def _parse_randaugment(spec: str) -> RandAugment:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].strip().isdigit() or not parts[2].strip().isdigit():
        raise PolicyError(
            f"policy {spec!r}: expected randaugment:N:M with integers N >= 1, M in 0..30"
        )
    return RandAugment(int(parts[1]), int(parts[2]))


def resolve_policy(spec: str | Path | AnyPolicy) -> AnyPolicy:
    """A built-in name, 'randaugment:N:M', an op name, or a JSON file path -> policy."""
    if isinstance(spec, Policy | RandAugment):
        return spec
    text = str(spec).strip()
    lowered = text.lower()
    if lowered == "none":
        return identity_policy()
    if lowered == "mocov2":
        return mocov2_policy()
    if lowered.startswith("randaugment"):
        return _parse_randaugment(lowered)
    by_lower = {name.lower(): name for name in OP_NAMES}
    if lowered in by_lower:
        return single_transform_policy(by_lower[lowered])
    path = Path(text)
    if path.suffix == ".json" or path.exists():
        return load_policy(path)
    close = difflib.get_close_matches(text, BUILTIN_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PolicyError(
        f"policy {text!r}: not a file and not a built-in{hint} "
        f"built-ins: {', '.join(BUILTIN_NAMES)}"
    )


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy JSON file (errors name the file and the entry)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise PolicyError(f"{path}: cannot read policy file: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start})"
        ) from None
    return Policy.from_json(text, source=str(path))


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``policy.to_json()`` atomically (temporary file + os.replace); returns the path."""
    if not isinstance(policy, Policy):
        raise PolicyError(f"{path}: only list policies can be saved as JSON, got {policy!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(policy.to_json())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
