"""Fast AutoAugment / AutoAugment policy lists to our policies and back: exactly, or an error.

FAA publishes its policies (``archive.py``, e.g. ``fa_reduced_cifar10``) as lists of
sub-policies, each a list of ``[name, probability, level]``; SelfAugment reuses FAA's ops and
format. FAA's ``apply_augment`` maps ``level`` in [0, 1] to ``value = level * (high - low) +
low`` with the ranges of ``augment_list`` (``FAA_OPS`` below), and each op reads ``value``:

- ShearX/Y, TranslateX/Y (fractions of the size), Rotate: ``value`` in [-max, max], mirrored
  with probability 1/2, so the strength is ``|value|`` and the direction random, as ours;
- Contrast, Color, Brightness, Sharpness: ``value`` is the enhance factor, 0.1 to 1.9, never
  mirrored, so the level sets the direction: an imported entry carries a fixed ``direction``;
- Solarize: threshold ``value`` (0 to 256); Posterize: ``int(value)`` bits (4 to 8);
  Cutout: ``value * width`` pixels; AutoContrast, Equalize, Invert ignore the level;
- for AutoAugment's policies: TranslateXAbs/YAbs (0 to 10 px), CutoutAbs (0 to 20 px) and
  Posterize2 (0 to 4 bits).

A conversion is accepted only when our op gets exactly the argument FAA's op gets (the same
float for continuous arguments, the same float32 enhance factor, the same whole threshold or
bit count), found by solving for the magnitude and trying its neighbouring floats; otherwise
it is refused with a message naming the entry. What our ops then do with the argument is
documented in docs/concepts.md ("Semantics against Fast AutoAugment").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from selfaugment.trainer.augment.ops import OPS
from selfaugment.trainer.policy.model import OpSetting, Policy, PolicyError

Kind = Literal["mirrored", "enhance", "solarize", "posterize", "cutout", "plain", "pixels"]
FaaList = list[list[list[Any]]]
_NUDGES = 32  # neighbouring floats tried around the solved magnitude or level


@dataclass(frozen=True)
class FaaOp:
    """One op of FAA's ``augment_list``: our op, FAA's value range and how the value is read."""

    ours: str
    low: float
    high: float
    kind: Kind

    def value(self, level: float) -> float:
        """FAA's ``apply_augment``: ``level * (high - low) + low``."""
        return level * (self.high - self.low) + self.low


FAA_OPS: dict[str, FaaOp] = {
    "ShearX": FaaOp("ShearX", -0.3, 0.3, "mirrored"),
    "ShearY": FaaOp("ShearY", -0.3, 0.3, "mirrored"),
    "TranslateX": FaaOp("TranslateX", -0.45, 0.45, "mirrored"),
    "TranslateY": FaaOp("TranslateY", -0.45, 0.45, "mirrored"),
    "Rotate": FaaOp("Rotate", -30, 30, "mirrored"),
    "AutoContrast": FaaOp("AutoContrast", 0, 1, "plain"),
    "Invert": FaaOp("Invert", 0, 1, "plain"),
    "Equalize": FaaOp("Equalize", 0, 1, "plain"),
    "Solarize": FaaOp("Solarize", 0, 256, "solarize"),
    "Posterize": FaaOp("Posterize", 4, 8, "posterize"),
    "Contrast": FaaOp("Contrast", 0.1, 1.9, "enhance"),
    "Color": FaaOp("Color", 0.1, 1.9, "enhance"),
    "Brightness": FaaOp("Brightness", 0.1, 1.9, "enhance"),
    "Sharpness": FaaOp("Sharpness", 0.1, 1.9, "enhance"),
    "Cutout": FaaOp("Cutout", 0, 0.2, "cutout"),
    # AutoAugment's ops in FAA's list (pixels at one image size, or fewer bits)
    "CutoutAbs": FaaOp("Cutout", 0, 20, "pixels"),
    "Posterize2": FaaOp("Posterize", 0, 4, "posterize"),
    "TranslateXAbs": FaaOp("TranslateX", 0, 10, "pixels"),
    "TranslateYAbs": FaaOp("TranslateY", 0, 10, "pixels"),
}
"""FAA's op names (``augmentations.augment_list(for_autoaug=True)``) and value ranges."""

EXPORT_NAMES = {name: name for name in FAA_OPS if FAA_OPS[name].ours == name}
"""Our op -> FAA's name for it on export (the 15 ops share their names)."""


def _solve(starts: tuple[float, ...], accept: Callable[[float], bool]) -> float | None:
    """The first of ``starts`` (clipped to [0, 1]) or of their neighbouring floats, nearest
    first, that ``accept``s."""
    for start in starts:
        below = above = min(1.0, max(0.0, start))
        for _ in range(_NUDGES):
            for value in (above, below):
                if accept(value):
                    return value
            above = min(1.0, float(np.nextafter(above, 2.0)))
            below = max(0.0, float(np.nextafter(below, -1.0)))
    return None


def _float32(value: float) -> float:
    return float(np.float32(value))


def _same_effect(
    kind: Kind, faa_value: float, ours: float, size: int = 0, exact: bool = True
) -> bool:
    """Whether our argument does what FAA's value does (see the module docstring).

    Continuous arguments (geometric, Cutout) are first matched bit for bit; where no float
    near the solution gives FAA's value exactly, within 1e-12 of it (``exact=False``): a
    source coordinate would have to lie within 1e-10 px of a pixel edge for that to matter.
    """
    if kind == "enhance":  # PIL's blend takes a C float
        return _float32(faa_value) == _float32(ours)
    if kind == "solarize":  # whole levels >= threshold are inverted
        return math.ceil(faa_value) == math.ceil(ours)
    if kind == "posterize":  # int(value) bits
        return math.floor(faa_value) == math.floor(ours)
    if kind == "mirrored":
        faa_value = abs(faa_value)
    elif kind == "pixels":
        ours = ours * size
    if exact:
        return faa_value == ours
    return math.isclose(faa_value, ours, rel_tol=1e-12, abs_tol=1e-15)


def _solve_effect(
    starts: tuple[float, ...],
    kind: Kind,
    value: Callable[[float], tuple[float, float]],
    size: int = 0,
) -> float | None:
    """Solve for the magnitude or level whose ``value(x) = (faa_value, ours)`` agree: exactly
    if a float near ``starts`` does, else within ``_same_effect``'s tolerance."""
    for exact in (True, False):

        def accept(x: float, exact: bool = exact) -> bool:
            return _same_effect(kind, *value(x), size=size, exact=exact)

        found = _solve(starts, accept)
        if found is not None:
            return found
    return None


def _unit_number(value: object, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{where}: {field} must be a number, got {_short(value)}")
    if not 0.0 <= value <= 1.0:  # also NaN
        raise PolicyError(f"{where}: {field} must be within [0, 1], got {value!r}")
    return float(value)


def setting_from_faa(
    name: object, probability: object, level: object, where: str, image_size: int | None = None
) -> OpSetting:
    """Our ``OpSetting`` that applies FAA's ``[name, probability, level]`` exactly."""
    if not isinstance(name, str) or name not in FAA_OPS:
        raise PolicyError(
            f"{where}: unknown op {_short(name)}; Fast AutoAugment ops read: {', '.join(FAA_OPS)}"
        )
    chance = _unit_number(probability, "probability", f"{where} ({name})")
    level = _unit_number(level, "level", f"{where} ({name})")
    faa = FAA_OPS[name]
    spec, value = OPS[faa.ours], faa.value(level)
    if faa.kind == "plain":  # the level does nothing; kept so that export gives it back
        return OpSetting(faa.ours, chance, level)
    size = image_size or 0
    if faa.kind == "pixels" and not size:
        raise PolicyError(
            f"{where} ({name}): a size in pixels; give the image size (--image-size) to "
            "convert it to a fraction of the width"
        )
    if name == "CutoutAbs" and value == 0:
        raise PolicyError(
            f"{where} ({name}): at level 0 FAA still cuts one pixel (PIL draws both ends of "
            "the rectangle); our Cutout at magnitude 0 cuts nothing"
        )
    direction = 1
    if faa.kind == "enhance" and value < spec.identity_argument:
        direction = -1
    target = abs(value) if faa.kind == "mirrored" else value
    if faa.kind == "pixels":
        target = value / size
    span = (spec.max_argument - spec.identity_argument) * direction
    magnitude = _solve_effect(
        ((target - spec.identity_argument) / span,),
        faa.kind,
        lambda m: (value, spec.argument(m, direction)),
        size,
    )
    if magnitude is None:
        if faa.kind == "pixels":
            limit = f"{spec.max_argument * size:g} px at {size} px"
            raise PolicyError(
                f"{where} ({name}): level {level!r} gives {value!r} px, more than "
                f"{faa.ours} can do ({limit})"
            )
        low, high = sorted((spec.identity_argument, spec.max_argument))
        raise PolicyError(
            f"{where} ({name}): level {level!r} gives {spec.unit} {value!r}, outside what "
            f"{faa.ours} can do ({low:g} to {high:g} {spec.unit})"
        )
    return OpSetting(faa.ours, chance, magnitude, direction if faa.kind == "enhance" else None)


def policy_from_faa(
    data: object, source: str, name: str | None = None, image_size: int | None = None
) -> Policy:
    """Our policy from a decoded FAA list ``[[[name, probability, level], ...], ...]``."""
    if isinstance(data, dict):
        raise PolicyError(
            f"{source}: expected a list of sub-policies [[name, probability, level], ...], got "
            "an object (a selfaugment policy is checked with `selfaugment policy validate`)"
        )
    if not isinstance(data, list) or not data:
        raise PolicyError(
            f"{source}: expected a non-empty list of sub-policies "
            f"[[name, probability, level], ...], got {_short(data)}"
        )
    sub_policies = []
    for index, raw_sub in enumerate(data):
        if not isinstance(raw_sub, list):
            raise PolicyError(
                f"{source}: [{index}]: expected a sub-policy, a list of "
                f"[name, probability, level], got {_short(raw_sub)}"
            )
        settings = []
        for position, raw in enumerate(raw_sub):
            where = f"{source}: [{index}][{position}]"
            if not isinstance(raw, list) or len(raw) != 3:
                raise PolicyError(
                    f"{where}: expected [name, probability, level], got {_short(raw)}"
                )
            op, probability, level = raw
            settings.append(setting_from_faa(op, probability, level, where, image_size))
        sub_policies.append(settings)
    return Policy(sub_policies, name=name)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_faa_policy(
    path: str | Path, name: str | None = None, image_size: int | None = None
) -> Policy:
    """Read an FAA/AutoAugment policy list from a JSON or YAML file (errors name the file
    and the entry)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise PolicyError(f"{source}: cannot read policy file: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(
            f"{source}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start})"
        ) from None
    data = _decode(text, source, as_json=Path(path).suffix.lower() == ".json")
    return policy_from_faa(data, source, name=name or Path(path).stem, image_size=image_size)


def _decode(text: str, source: str, as_json: bool) -> object:
    try:
        if as_json:
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise PolicyError(
            f"{source}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise PolicyError(f"{source}: not valid YAML: {error.problem}{place}") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: not valid YAML: {error}") from None
    except RecursionError:
        raise PolicyError(f"{source}: nested too deeply to read") from None
    except ValueError as error:  # an integer of more than 4300 digits
        raise PolicyError(f"{source}: {str(error).split(';')[0]}") from None


def faa_entry(setting: OpSetting, where: str) -> list[Any]:
    """FAA's ``[name, probability, level]`` that applies our ``setting`` exactly."""
    name, spec = EXPORT_NAMES[setting.op], OPS[setting.op]
    faa = FAA_OPS[name]
    if faa.kind == "plain":
        level = 0.5 if setting.magnitude is None else setting.magnitude
        return [name, setting.probability, level]
    if setting.magnitude is None:
        raise PolicyError(
            f"{where} ({setting.op}): a random magnitude; FAA's levels are fixed numbers"
        )
    if faa.kind == "mirrored" and setting.direction is not None:
        raise PolicyError(
            f"{where} ({setting.op}): a fixed direction; FAA mirrors {setting.op} at random"
        )
    if faa.kind == "enhance" and setting.direction is None:
        raise PolicyError(
            f"{where} ({setting.op}): a random direction; FAA's level fixes it "
            "(give the entry a direction, 1 or -1)"
        )
    ours = spec.argument(setting.magnitude, setting.direction or 1)
    if faa.kind == "mirrored":  # either side of 0.5: FAA mirrors the value at random
        starts: tuple[float, ...] = ((1.0 + setting.magnitude) / 2, (1.0 - setting.magnitude) / 2)
    else:
        starts = ((ours - faa.low) / (faa.high - faa.low),)
    solved = _solve_effect(starts, faa.kind, lambda x: (faa.value(x), ours))
    if solved is None:  # not reached for the 15 ops' ranges; kept as a guard
        raise PolicyError(f"{where} ({setting.op}): no FAA level gives {spec.unit} {ours!r}")
    return [name, setting.probability, solved]


def policy_to_faa(policy: Policy, source: str) -> FaaList:
    """FAA's list form of ``policy``; refuses (naming the entry) what FAA cannot express."""
    return [
        [
            faa_entry(setting, f"{source}: sub_policies[{index}][{position}]")
            for position, setting in enumerate(sub_policy)
        ]
        for index, sub_policy in enumerate(policy.sub_policies)
    ]


def faa_text(entries: FaaList, as_yaml: bool) -> str:
    """JSON (or YAML) text, one sub-policy per line; floats written so that they read back
    bit for bit."""
    lines = [json.dumps(sub_policy) for sub_policy in entries]
    if as_yaml:
        return "".join(f"- {line}\n" for line in lines)
    return "[\n  " + ",\n  ".join(lines) + "\n]\n"
