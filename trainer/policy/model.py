"""Augmentation policies as plain, validated data with a versioned JSON form.

A policy (SelfAugment, Reed et al. 2021, section 3.2; Fast AutoAugment notation) is a list
of sub-policies; a sub-policy is a sequence of ``OpSetting(op, probability, magnitude)``.
Applying it: choose one sub-policy uniformly per image, then apply its ops in order, each
with its own Bernoulli(probability) and a random sign. ``magnitude=None`` means "drawn
uniformly from [0, 1] at each application" (single-transform policies of the paper).

JSON (schema version 1)::

    {"schema_version": 1, "name": "example",
     "sub_policies": [[{"op": "Rotate", "p": 0.5, "magnitude": 0.3}, ...], ...]}

``magnitude`` may be null (random) and may be left out for ops without a magnitude
(AutoContrast, Equalize, Invert). Signed ops (shears, translates, Rotate, Contrast, Color,
Brightness, Sharpness) may carry ``"direction": 1`` or ``-1`` to fix the sign that is
otherwise drawn at random: Fast AutoAugment's enhance ops have a direction set by their level
(factor ``0.1 + 1.8 * level``), so FAA policies need it to be expressed exactly. An entry
without ``direction`` means what it always meant, so version-1 files written before the field
existed read the same. ``RandAugment(num_ops, level)`` is the other policy kind.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.augment.ops import OP_NAMES, OPS

POLICY_SCHEMA_VERSION = 1
RANDAUGMENT_MAX_LEVEL = 30  # RandAugment's magnitude scale (Cubuk et al. 2020): 0..30
_SETTING_KEYS = ("op", "p", "magnitude", "direction")
_TOP_KEYS = ("schema_version", "name", "sub_policies")


class PolicyError(SelfAugmentError, ValueError):
    """An invalid policy; the message names the source and the bad entry."""


def unknown_op_message(name: object) -> str:
    """'unknown op ...' with a close match (difflib) and the list of valid names."""
    close = difflib.get_close_matches(str(name), OP_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown op {name!r}{hint} valid ops: {', '.join(OP_NAMES)}"


def _check_unit_interval(value: object, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a number or null" if allow_none else "a number"
        raise PolicyError(f"{where}: must be {kind}, got {value!r}")
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise PolicyError(f"{where}: must be within [0, 1], got {value!r}")


def _check_setting(
    op: object, probability: object, magnitude: object, direction: object, where: str
) -> None:
    if not isinstance(op, str) or op not in OPS:
        raise PolicyError(f"{where}.op: {unknown_op_message(op)}")
    _check_unit_interval(probability, f"{where}.p")
    _check_unit_interval(magnitude, f"{where}.magnitude", allow_none=True)
    if direction is None:
        return
    if isinstance(direction, bool) or direction not in (1, -1):
        raise PolicyError(f"{where}.direction: must be 1, -1 or null (random), got {direction!r}")
    if not OPS[op].signed:
        raise PolicyError(f"{where}.direction: {op} has no direction (only signed ops do)")


@dataclass(frozen=True)
class OpSetting:
    """One op of a sub-policy: probability of applying it, magnitude (None: random) and, for
    signed ops, a fixed direction (+1 or -1; None: drawn at random at each application)."""

    op: str
    probability: float
    magnitude: float | None = None
    direction: int | None = None

    def __post_init__(self) -> None:
        _check_setting(self.op, self.probability, self.magnitude, self.direction, "OpSetting")

    def __repr__(self) -> str:
        magnitude = "random" if self.magnitude is None else f"{self.magnitude:g}"
        direction = "" if self.direction is None else f", direction={self.direction:+d}"
        return f"{self.op}(p={self.probability:g}, m={magnitude}{direction})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"op", "p", "magnitude"}, and "direction" only when it is fixed (so
        that policies without it are written exactly as before the field existed)."""
        entry: dict[str, Any] = {"op": self.op, "p": self.probability, "magnitude": self.magnitude}
        if self.direction is not None:
            entry["direction"] = self.direction
        return entry


SubPolicy = tuple[OpSetting, ...]


@dataclass(frozen=True, init=False)
class Policy:
    """A list of sub-policies (each a tuple of OpSetting), with an optional name."""

    sub_policies: tuple[SubPolicy, ...]
    name: str | None = None

    def __init__(
        self, sub_policies: Iterable[Iterable[OpSetting]], name: str | None = None
    ) -> None:
        converted = tuple(tuple(sub_policy) for sub_policy in sub_policies)
        if not converted:
            raise PolicyError("Policy: sub_policies: must contain at least one sub-policy")
        for index, sub_policy in enumerate(converted):
            for position, setting in enumerate(sub_policy):
                if not isinstance(setting, OpSetting):
                    raise PolicyError(
                        f"Policy: sub_policies[{index}][{position}]: expected an OpSetting, "
                        f"got {type(setting).__name__}"
                    )
        object.__setattr__(self, "sub_policies", converted)
        object.__setattr__(self, "name", name)

    def __repr__(self) -> str:
        body = ", ".join("[" + ", ".join(map(repr, sub)) + "]" for sub in self.sub_policies)
        return f"Policy(name={self.name!r}, sub_policies=[{body}])"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with the schema version."""
        return {
            "schema_version": POLICY_SCHEMA_VERSION,
            "name": self.name,
            "sub_policies": [[s.to_dict() for s in sub] for sub in self.sub_policies],
        }

    def to_json(self) -> str:
        """JSON text with one sub-policy per line (readable diffs)."""
        lines = [json.dumps([s.to_dict() for s in sub]) for sub in self.sub_policies]
        return (
            "{\n"
            f'  "schema_version": {POLICY_SCHEMA_VERSION},\n'
            f'  "name": {json.dumps(self.name)},\n'
            '  "sub_policies": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"
        )

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any], source: str = "policy") -> Policy:
        """Parse and validate JSON text or an already-decoded mapping (not modified)."""
        if isinstance(data, str):
            try:
                data = json.loads(data, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as error:
                raise PolicyError(
                    f"{source}: not valid JSON: {error.msg} (line {error.lineno}, "
                    f"column {error.colno})"
                ) from None
            except RecursionError:
                raise PolicyError(f"{source}: nested too deeply to read") from None
            except ValueError as error:  # a repeated key, or an integer of > 4300 digits
                raise PolicyError(f"{source}: {str(error).split(';')[0]}") from None
        return _parse_policy(data, source)


def _parse_policy(data: object, source: str) -> Policy:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: expected a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise PolicyError(f"{source}: {key}: unknown field (expected {', '.join(_TOP_KEYS)})")
    if "schema_version" not in data:
        raise PolicyError(f"{source}: schema_version: missing field")
    if data["schema_version"] != POLICY_SCHEMA_VERSION:
        raise PolicyError(
            f"{source}: schema_version: expected {POLICY_SCHEMA_VERSION}, "
            f"got {data['schema_version']!r}"
        )
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{source}: name: must be a string or null, got {name!r}")
    if "sub_policies" not in data:
        raise PolicyError(f"{source}: sub_policies: missing field")
    raw_subs = data["sub_policies"]
    if not isinstance(raw_subs, list):
        raise PolicyError(f"{source}: sub_policies: must be a list, got {type(raw_subs).__name__}")
    if not raw_subs:
        raise PolicyError(f"{source}: sub_policies: must contain at least one sub-policy")
    sub_policies = []
    for index, raw_sub in enumerate(raw_subs):
        where = f"{source}: sub_policies[{index}]"
        if not isinstance(raw_sub, list):
            raise PolicyError(f"{where}: must be a list of ops, got {type(raw_sub).__name__}")
        sub_policies.append(
            [_parse_setting(raw, f"{where}[{position}]") for position, raw in enumerate(raw_sub)]
        )
    return Policy(sub_policies, name=name)


def _parse_setting(raw: object, where: str) -> OpSetting:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected an object with op, p, magnitude, got {raw!r}")
    for key in raw:
        if key not in _SETTING_KEYS:
            raise PolicyError(f"{where}.{key}: unknown field (expected {', '.join(_SETTING_KEYS)})")
    for key in ("op", "p"):
        if key not in raw:
            raise PolicyError(f"{where}: missing field {key!r}")
    op = raw["op"]
    if not isinstance(op, str) or op not in OPS:
        raise PolicyError(f"{where}.op: {unknown_op_message(op)}")
    if "magnitude" not in raw and OPS[op].has_magnitude:
        raise PolicyError(f"{where}: missing field 'magnitude' (use null for a random magnitude)")
    magnitude, direction = raw.get("magnitude"), raw.get("direction")
    _check_setting(op, raw["p"], magnitude, direction, where)
    return OpSetting(
        op,
        float(raw["p"]),
        None if magnitude is None else float(magnitude),
        None if direction is None else int(direction),
    )


@dataclass(frozen=True)
class RandAugment:
    """RandAugment (Cubuk et al. 2020): per image ``num_ops`` ops drawn uniformly from the
    15 ops (with replacement), each applied with p = 1 at magnitude ``level / 30``."""

    num_ops: int
    level: int

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 1:
            raise PolicyError(f"RandAugment.num_ops: must be an integer >= 1, got {self.num_ops!r}")
        valid_level = isinstance(self.level, int) and not isinstance(self.level, bool)
        if not valid_level or not 0 <= self.level <= RANDAUGMENT_MAX_LEVEL:
            raise PolicyError(
                f"RandAugment.level: must be an integer within [0, {RANDAUGMENT_MAX_LEVEL}], "
                f"got {self.level!r}"
            )

    @property
    def magnitude(self) -> float:
        """The shared magnitude in [0, 1]."""
        return self.level / RANDAUGMENT_MAX_LEVEL

    @property
    def name(self) -> str:
        """Spec string understood by ``resolve_policy``."""
        return f"randaugment:{self.num_ops}:{self.level}"


AnyPolicy = Policy | RandAugment


SettingKey = tuple[str, float, float | None, int | None]


def _setting_key(setting: OpSetting, decimals: int) -> SettingKey:
    magnitude = None if setting.magnitude is None else round(setting.magnitude, decimals)
    return setting.op, round(setting.probability, decimals), magnitude, setting.direction


def merge(policies: Sequence[Policy], name: str | None = "merged", decimals: int = 4) -> Policy:
    """Union of the sub-policies in order; duplicates (same ops, p, magnitude after rounding
    to ``decimals``, and direction) are kept once, at their first occurrence."""
    seen: set[tuple[SettingKey, ...]] = set()
    merged: list[SubPolicy] = []
    for index, policy in enumerate(policies):
        if not isinstance(policy, Policy):
            raise PolicyError(f"merge: policies[{index}]: expected a Policy, got {policy!r}")
        for sub_policy in policy.sub_policies:
            key = tuple(_setting_key(setting, decimals) for setting in sub_policy)
            if key not in seen:
                seen.add(key)
                merged.append(sub_policy)
    if not merged:
        raise PolicyError("merge: no policies given")
    return Policy(merged, name=name)


def _effective_magnitude(setting: OpSetting) -> float:
    if not OPS[setting.op].has_magnitude:
        return 1.0
    return 0.5 if setting.magnitude is None else setting.magnitude


def expected_strength(policy: AnyPolicy) -> dict[str, float]:
    """Expected strength of each op, E[p * magnitude] (the paper's Fig. 2.10).

    For op o: ``(1 / S) * sum over sub-policies s of sum over the settings k of s with
    op o of p_k * magnitude_k``, i.e. the expected total magnitude of o applied to one
    image. A random magnitude counts as its mean 0.5; ops without a magnitude count as
    magnitude 1 (so their strength is the probability of being applied). RandAugment:
    ``num_ops / 15 * magnitude``. All 15 ops are listed, absent ones with 0.
    """
    strength = dict.fromkeys(OP_NAMES, 0.0)
    if isinstance(policy, RandAugment):
        for name, spec in OPS.items():
            magnitude = policy.magnitude if spec.has_magnitude else 1.0
            strength[name] = policy.num_ops / len(OP_NAMES) * magnitude
        return strength
    for sub_policy in policy.sub_policies:
        for setting in sub_policy:
            strength[setting.op] += setting.probability * _effective_magnitude(setting)
    count = len(policy.sub_policies)
    return {name: value / count for name, value in strength.items()}


def describe(policy: AnyPolicy) -> str:
    """Human-readable table: the sub-policies, then each op's expected strength."""
    if isinstance(policy, RandAugment):
        lines = [
            f"RandAugment {policy.name}: {policy.num_ops} ops per image drawn uniformly from "
            f"{len(OP_NAMES)}, p = 1, magnitude {policy.level}/{RANDAUGMENT_MAX_LEVEL} "
            f"= {policy.magnitude:.3f}"
        ]
    else:
        count = len(policy.sub_policies)
        lines = [f"Policy {policy.name!r}: {count} sub-policies (one chosen per image)"]
        width = len(str(count - 1))
        for index, sub_policy in enumerate(policy.sub_policies):
            ops = " -> ".join(map(repr, sub_policy)) or "(identity)"
            lines.append(f"  {index:>{width}}  {ops}")
    lines.append("Expected strength E[p * magnitude] per op:")
    for name, value in expected_strength(policy).items():
        if value > 0:
            bar = "#" * max(1, math.ceil(value * 40))
            lines.append(f"  {name:<12} {value:6.3f}  {bar}")
    return "\n".join(lines)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object where a repeated key is an error instead of the last one winning."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result
