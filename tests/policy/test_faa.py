"""Fast AutoAugment policy lists: import exactly, export where FAA can express it, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from selfaugment.cli import main
from selfaugment.trainer.augment import pil
from selfaugment.trainer.augment.ops import OPS
from selfaugment.trainer.policy import OpSetting, Policy, PolicyError, load_policy
from selfaugment.trainer.policy.faa import (
    FAA_OPS,
    policy_from_faa,
    policy_to_faa,
    read_faa_policy,
)

# The first sub-policies of FAA's published CIFAR-10 policy (archive.py, fa_reduced_cifar10),
# in FAA's own format: [name, probability, level].
FA_REDUCED_CIFAR10 = [
    [["Contrast", 0.8320659688593578, 0.49884310562180767], ["TranslateX", 0.41849883971249136, 0.394023086494538]],
    [["Color", 0.3500483749890918, 0.43355143929883955], ["Color", 0.5120716140300229, 0.7508299643325016]],
    [["Rotate", 0.9447932604389472, 0.29723465088990375], ["Sharpness", 0.1564936149799504, 0.47169309978091745]],
    [["Rotate", 0.5430015349185097, 0.6518626678905443], ["Color", 0.5694844928020679, 0.3494533005430269]],
    [["AutoContrast", 0.5558922032451064, 0.783136004977799], ["TranslateY", 0.683914191471972, 0.7597025305860181]],
    [["TranslateX", 0.03489224481658926, 0.021025488042663354], ["Equalize", 0.4788637403857401, 0.3535481281496117]],
    [["Invert", 0.8222011603194572, 0.6597915864008403], ["Posterize", 0.31858707654447327, 0.9541013715579584]],
    [["Sharpness", 0.41314621282107045, 0.9437344470879956], ["Cutout", 0.6610495837889337, 0.674411664255093]],
    [["Contrast", 0.24894431199700073, 0.09578870500994707], ["Solarize", 0.2273713345927395, 0.6214942914963707]],
    [["ShearX", 0.328798428243695, 0.2769563264079157], ["Cutout", 0.9037632437023772, 0.4915809476763595]],
]  # fmt: skip
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def faa_value(name: str, level: float) -> float:
    """FAA's apply_augment: level * (high - low) + low, with augment_list's ranges."""
    low, high = FAA_OPS[name].low, FAA_OPS[name].high
    return level * (high - low) + low


def faa_image(name: str, value: float) -> Image.Image:
    """What FAA's op does to IMAGE with ``value`` (ops whose semantics we share exactly)."""
    if name in ("Contrast", "Color", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(IMAGE).enhance(value)
    if name == "Solarize":
        return ImageOps.solarize(IMAGE, value)  # type: ignore[arg-type]
    assert name == "Posterize"
    return ImageOps.posterize(IMAGE, int(value))


def test_a_published_faa_cifar10_policy_imports_exactly() -> None:
    policy = policy_from_faa(FA_REDUCED_CIFAR10, "fa_reduced_cifar10")
    for sub_faa, sub_ours in zip(FA_REDUCED_CIFAR10, policy.sub_policies, strict=True):
        for (name, probability, level), setting in zip(sub_faa, sub_ours, strict=True):
            assert (setting.op, setting.probability) == (name, probability)
            spec, value = OPS[name], faa_value(name, level)
            if FAA_OPS[name].kind == "plain":
                assert setting.magnitude == level and setting.direction is None
                continue
            assert setting.magnitude is not None
            argument = spec.argument(setting.magnitude, setting.direction or 1)
            if FAA_OPS[name].kind == "mirrored":  # FAA mirrors at random, as we do
                assert setting.direction is None and argument == pytest.approx(abs(value), 1e-12)
            elif name == "Cutout":  # the same fraction of the width, so the same box
                assert argument == value
            else:  # enhance ops (with their direction), Solarize, Posterize: the same image
                assert setting.direction == (None if name in ("Solarize", "Posterize") else
                                             (1 if value >= 1 else -1))  # fmt: skip
                ours = OPS[name].pil(IMAGE, argument, None)
                assert np.array_equal(np.asarray(ours), np.asarray(faa_image(name, value))), name
    assert policy.sub_policies[0][0] == OpSetting("Contrast", 0.8320659688593578,
                                                  policy.sub_policies[0][0].magnitude, -1)  # fmt: skip


def test_cutout_cuts_faas_square() -> None:
    """FAA's Cutout (CutoutAbs of v = level * 0.2 * width): corner int(max(0, c - v/2)), PIL
    rectangle to corner + v, both ends included."""
    for level in (0.05, 0.4915809476763595, 0.674411664255093, 1.0):
        v = faa_value("Cutout", level) * IMAGE.width
        for center in ((3.7, 30.2), (16.0, 16.0), (31.9, 0.2)):
            x0, y0 = int(max(0, center[0] - v / 2.0)), int(max(0, center[1] - v / 2.0))
            expected = Image.new("L", IMAGE.size)
            ImageDraw.Draw(expected).rectangle(
                (x0, y0, min(IMAGE.width, x0 + v), min(IMAGE.height, y0 + v)), 255
            )
            blank = Image.new("L", IMAGE.size)
            ours = pil.cutout(blank, faa_value("Cutout", level), None, center=center)
            assert np.array_equal(np.asarray(ours) > 0, np.asarray(expected) > 0), (level, center)


def test_round_trips() -> None:
    """FAA -> ours -> FAA gives the same ops and probabilities and levels that do the same
    (a mirrored op's level may come back as its mirror image 1 - level); ours -> FAA -> ours
    gives the same policy."""
    policy = policy_from_faa(FA_REDUCED_CIFAR10, "faa")
    exported = policy_to_faa(policy, "ours")
    for sub_faa, sub_back in zip(FA_REDUCED_CIFAR10, exported, strict=True):
        for (name, probability, level), (name_back, p_back, level_back) in zip(
            sub_faa, sub_back, strict=True
        ):
            assert (name_back, p_back) == (name, probability)
            if FAA_OPS[name].kind == "mirrored":
                assert abs(faa_value(name, level_back)) == pytest.approx(
                    abs(faa_value(name, level)), rel=1e-12
                )
            else:
                assert level_back == pytest.approx(level, abs=1e-12)
    again = policy_from_faa(exported, "faa")
    assert again == Policy(policy.sub_policies, name=None)
    assert policy_to_faa(again, "ours") == exported  # a fixed point after one round


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_cli_import_then_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    source = tmp_path / f"fa_reduced_cifar10{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    source.write_text(dump(FA_REDUCED_CIFAR10))
    assert main(["policy", "import", str(source)]) == 0
    printed = Policy.from_json(capsys.readouterr().out)
    assert printed == policy_from_faa(FA_REDUCED_CIFAR10, "x", name="fa_reduced_cifar10")
    target = tmp_path / "imported.json"
    assert main(["policy", "import", str(source), "-o", str(target), "--name", "faa"]) == 0
    assert load_policy(target) == Policy(printed.sub_policies, name="faa")
    assert main(["policy", "validate", str(target)]) == 0
    capsys.readouterr()
    exported = tmp_path / "exported.yaml"
    assert main(["policy", "export", str(target), "-o", str(exported)]) == 0
    assert yaml.safe_load(exported.read_text()) == policy_to_faa(printed, "x")
    assert main(["policy", "export", str(target)]) == 0  # JSON on stdout
    assert json.loads(capsys.readouterr().out) == policy_to_faa(printed, "x")


def test_autoaugment_pixel_ops_need_the_image_size() -> None:
    pixels = [[["TranslateXAbs", 0.3, 0.9], ["Posterize2", 0.5, 1.0], ["CutoutAbs", 0.2, 0.2]]]
    policy = policy_from_faa(pixels, "aa", image_size=40)
    translate, posterize, cutout = policy.sub_policies[0]
    assert translate.op == "TranslateX" and translate.magnitude is not None
    assert OPS["TranslateX"].argument(translate.magnitude) * 40 == 9.0  # 9 px
    assert posterize.op == "Posterize" and pil.posterize_bits(
        OPS["Posterize"].argument(posterize.magnitude or 0.0)
    ) == 4  # fmt: skip
    assert cutout.op == "Cutout" and OPS["Cutout"].argument(cutout.magnitude or 0.0) * 40 == 4.0
    with pytest.raises(PolicyError, match=r"aa: \[0\]\[0\] \(TranslateXAbs\): .*--image-size"):
        policy_from_faa(pixels, "aa")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (["Flip", 0.5, 0.5], r"\[1\]\[0\]: unknown op 'Flip'; Fast AutoAugment ops read: ShearX"),
        (["Rotate", 1.5, 0.5], r"\[1\]\[0\] \(Rotate\): probability must be within \[0, 1\], got 1.5"),
        (["Rotate", 0.5, -0.1], r"\[1\]\[0\] \(Rotate\): level must be within \[0, 1\], got -0.1"),
        (["Rotate", 0.5, "high"], r"\[1\]\[0\] \(Rotate\): level must be a number, got 'high'"),
        (["Rotate", 0.5], r"\[1\]\[0\]: expected \[name, probability, level\], got \['Rotate', 0.5\]"),
        ("Rotate", r"\[1\]\[0\]: expected \[name, probability, level\], got 'Rotate'"),
        (["Posterize2", 0.5, 0.7], r"\[1\]\[0\] \(Posterize2\): level 0.7 gives bits 2.8.*outside what Posterize can do \(4 to 8 bits\)"),
        (["CutoutAbs", 0.5, 0.0], r"\[1\]\[0\] \(CutoutAbs\): at level 0 FAA still cuts one pixel"),
        (["CutoutAbs", 0.5, 1.0], r"\[1\]\[0\] \(CutoutAbs\): level 1.0 gives 20.0 px, more than Cutout can do \(6.4 px at 32 px\)"),
    ],
)  # fmt: skip
def test_bad_entries_name_the_position(entry: object, message: str) -> None:
    data = [[["Invert", 0.1, 0.0]], [entry]]
    with pytest.raises(PolicyError, match="^faa.json: " + message):
        policy_from_faa(data, "faa.json", image_size=32)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", b"\xff\xfe[]", r"bad.json: not UTF-8 text \(byte 0xff at offset 0\)"),
        ("bad.json", b'[[["Rotate", 0.5, 0.5]]', r"bad.json: not valid JSON: .*\(line 1, column"),
        ("bad.yaml", b"- [Rotate, 0.5\n", r"bad.yaml: not valid YAML: .*\(line 2, column 1\)"),
        ("bad.yaml", b"- [Rotate, 0.5, 0.5]\n", r"bad.yaml: \[0\]\[0\]: expected \[name, probability, level\], got 'Rotate'"),
        ("bad.json", b'["Rotate", 0.5, 0.5]', r"bad.json: \[0\]: expected a sub-policy, a list of \[name, probability, level\], got 'Rotate'"),
        ("bad.json", b"[]", r"bad.json: expected a non-empty list of sub-policies"),
        ("bad.json", b'{"schema_version": 1}', r"bad.json: expected a list of sub-policies .*policy validate"),
        ("bad.json", b"[" * 100000, r"bad.json: nested too deeply to read"),
    ],
)  # fmt: skip
def test_bad_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PolicyError, match=message):
        read_faa_policy(path)
    assert main(["policy", "import", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"selfaugment: error: {path}: ")


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("Rotate", r"Rotate: sub_policies\[0\]\[0\] \(Rotate\): a random magnitude"),
        ("mocov2", r"mocov2: sub_policies\[0\]\[0\] \(Brightness\): a random direction; FAA's level fixes it"),
        ("randaugment:2:9", r"RandAugment is not a list of sub-policies"),
    ],
)  # fmt: skip
def test_export_refuses_what_faa_cannot_express(
    capsys: pytest.CaptureFixture[str], policy: str, message: str
) -> None:
    assert main(["policy", "export", policy]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error


def test_export_refuses_a_fixed_geometric_direction() -> None:
    policy = Policy([[OpSetting("ShearX", 0.5, 0.5, direction=1)]])
    with pytest.raises(
        PolicyError, match=r"p: sub_policies\[0\]\[0\] \(ShearX\): a fixed direction"
    ):
        policy_to_faa(policy, "p")
