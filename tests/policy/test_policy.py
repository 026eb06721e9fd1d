"""Policies: JSON, validation, merge, strength, built-ins, and batched/PIL application."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from selfaugment.trainer.augment import geometric as augment_geometric
from selfaugment.trainer.augment.ops import OP_NAMES, OPS
from selfaugment.trainer.config import AugmentConfig
from selfaugment.trainer.policy import (
    BatchAugmenter,
    OpSetting,
    Policy,
    PolicyError,
    PolicyTransform,
    RandAugment,
    apply_policy_pil,
    describe,
    expected_strength,
    load_policy,
    merge,
    mocov2_policy,
    resolve_policy,
    sample_plan,
    save_policy,
)
from selfaugment.trainer.policy.apply import AugmentPlan, apply_plan
from selfaugment.trainer.policy.views import build_augmenter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def constant_images(count: int, value: float, size: int = 4) -> torch.Tensor:
    return torch.full((count, 3, size, size), value)


def sample_document() -> dict:
    return {
        "schema_version": 1,
        "name": "sample",
        "sub_policies": [
            [{"op": "Rotate", "p": 0.5, "magnitude": 0.3}, {"op": "Invert", "p": 0.2}],
            [{"op": "Color", "p": 1.0, "magnitude": None}],
            [
                {"op": "Cutout", "p": 0.1, "magnitude": 1.0},
                {"op": "Solarize", "p": 1, "magnitude": 0},
            ],
        ],
    }


def test_json_round_trip_and_file_round_trip(tmp_path: Path) -> None:
    policy = Policy.from_json(sample_document(), source="doc")
    assert policy.sub_policies[0][1] == OpSetting("Invert", 0.2, None)
    assert Policy.from_json(policy.to_json()) == policy
    assert json.loads(policy.to_json()) == policy.to_dict()
    target = save_policy(policy, tmp_path / "nested" / "policy.json")
    assert load_policy(target) == policy
    assert [p.name for p in target.parent.iterdir()] == ["policy.json"]  # no temporary left
    assert repr(policy).startswith("Policy(name='sample', sub_policies=[[Rotate(p=0.5, m=0.3)")


def _broken(path: str, value: object) -> dict:
    document = sample_document()
    target: object = document
    keys = path.split("/")
    for key in keys[:-1]:
        target = target[int(key) if key.isdigit() else key]  # type: ignore[index]
    if value is KeyError:
        del target[keys[-1]]  # type: ignore[attr-defined]
    else:
        target[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value  # type: ignore[index]
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (_broken("sub_policies/2/1/p", 1.5), "policy.json: sub_policies[2][1].p: must be within [0, 1], got 1.5"),
        (_broken("sub_policies/0/0/op", "Rotat"), "policy.json: sub_policies[0][0].op: unknown op 'Rotat'; did you mean 'Rotate'? valid ops: ShearX"),
        (_broken("sub_policies/1/0/magnitude", -0.1), "policy.json: sub_policies[1][0].magnitude: must be within [0, 1], got -0.1"),
        (_broken("sub_policies/1/0/magnitude", "high"), "sub_policies[1][0].magnitude: must be a number or null, got 'high'"),
        (_broken("sub_policies/0/0/p", True), "sub_policies[0][0].p: must be a number, got True"),
        (_broken("schema_version", 2), "policy.json: schema_version: expected 1, got 2"),
        (_broken("schema_version", KeyError), "policy.json: schema_version: missing field"),
        (_broken("sub_policies/0/0/p", KeyError), "policy.json: sub_policies[0][0]: missing field 'p'"),
        (_broken("sub_policies/0/0/magnitude", KeyError), "sub_policies[0][0]: missing field 'magnitude' (use null"),
        (_broken("sub_policies/0/0/prob", 0.5), "policy.json: sub_policies[0][0].prob: unknown field"),
        (_broken("sub_policies", []), "policy.json: sub_policies: must contain at least one sub-policy"),
        (_broken("sub_policies/1", {"op": "Color"}), "policy.json: sub_policies[1]: must be a list of ops"),
        (_broken("name", 3), "policy.json: name: must be a string or null, got 3"),
        (_broken("extra", 1), "policy.json: extra: unknown field"),
        ("{not json", "policy.json: not valid JSON: Expecting property name"),
        ("[1, 2]", "policy.json: expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_entry(document: object, message: str) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(PolicyError) as error:
        Policy.from_json(text, source="policy.json")
    assert message in str(error.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(PolicyError, match=r"OpSetting.p: must be within \[0, 1\], got 2"):
        OpSetting("Rotate", 2, 0.5)
    with pytest.raises(PolicyError, match="did you mean 'Sharpness'"):
        OpSetting("Sharpnes", 0.5, 0.5)
    with pytest.raises(PolicyError, match="must contain at least one sub-policy"):
        Policy([])
    with pytest.raises(PolicyError, match="RandAugment.level: must be an integer within"):
        RandAugment(2, 31)


def test_load_policy_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"absent\.json: cannot read policy file"):
        load_policy(tmp_path / "absent.json")


def test_merge_deduplicates_after_rounding_and_keeps_order() -> None:
    rotate, invert = OpSetting("Rotate", 0.5, 0.3), OpSetting("Invert", 0.2, None)
    first = Policy([[rotate], [invert, rotate]], name="a")
    second = Policy([[OpSetting("Rotate", 0.50001, 0.29999)], [OpSetting("Color", 1, 0.5)]])
    merged = merge([first, second, first])
    assert merged.sub_policies == ((rotate,), (invert, rotate), (OpSetting("Color", 1, 0.5),))
    assert merged.name == "merged"
    assert len(merge([first, second], decimals=6).sub_policies) == 4


def test_expected_strength_on_a_hand_computed_example() -> None:
    policy = Policy(
        [
            [OpSetting("Rotate", 0.5, 0.4), OpSetting("Rotate", 1.0, 0.2)],
            [OpSetting("Invert", 0.3), OpSetting("Color", 0.8, None)],
        ]
    )
    strength = expected_strength(policy)
    assert list(strength) == list(OP_NAMES)
    assert strength["Rotate"] == pytest.approx((0.5 * 0.4 + 1.0 * 0.2) / 2)  # 0.2
    assert strength["Invert"] == pytest.approx(0.3 / 2)  # no magnitude: counts as 1
    assert strength["Color"] == pytest.approx(0.8 * 0.5 / 2)  # random magnitude: mean 0.5
    assert strength["Cutout"] == 0.0
    assert expected_strength(RandAugment(3, 15))["Rotate"] == pytest.approx(3 / 15 * 0.5)
    table = describe(policy)
    assert "Rotate(p=0.5, m=0.4) -> Rotate(p=1, m=0.2)" in table and "Rotate        0.200" in table


def test_builtins_resolve() -> None:
    assert resolve_policy("none").sub_policies == ((),)
    assert resolve_policy("mocov2") == mocov2_policy()
    assert load_policy(EXAMPLES / "mocov2-policy.json") == mocov2_policy()
    assert resolve_policy("randaugment:2:9") == RandAugment(2, 9)
    assert resolve_policy("rotate") == Policy([[OpSetting("Rotate", 1.0, None)]], name="Rotate")
    assert resolve_policy(str(EXAMPLES / "base-crop-policy.json")).sub_policies == ((),)
    with pytest.raises(PolicyError, match="did you mean 'mocov2'"):
        resolve_policy("mocov3")
    with pytest.raises(PolicyError, match="expected randaugment:N:M"):
        resolve_policy("randaugment:2")


def test_bernoulli_probability_is_respected_per_sample() -> None:
    policy = Policy([[OpSetting("Invert", 0.3)]])
    output = BatchAugmenter(policy, crop=False, flip=False)(
        constant_images(2000, 0.2), torch.Generator().manual_seed(0)
    )
    inverted = (output[:, 0, 0, 0] > 0.5).float().mean().item()
    assert abs(inverted - 0.3) < five_sigma(0.3, 2000)
    rng = random.Random(0)
    image = Image.new("RGB", (2, 2), (50, 50, 50))
    pil_inverted = [
        apply_policy_pil(policy, image, rng).getpixel((0, 0))[0] > 128 for _ in range(2000)
    ]  # type: ignore[index]
    assert abs(np.mean(pil_inverted) - 0.3) < five_sigma(0.3, 2000)


def test_sub_policy_choice_and_sign_are_uniform_per_sample() -> None:
    policy = Policy(
        [
            [OpSetting("Invert", 1.0)],  # 0.4 -> 0.6
            [OpSetting("Posterize", 1.0, 1.0)],  # 102 -> 96 (4 bits)
            [OpSetting("Brightness", 1.0, 1.0)],  # 0.4 * 0.1 or 0.4 * 1.9
            [],  # identity
        ]
    )
    count = 4000
    output = BatchAugmenter(policy, crop=False, flip=False)(
        constant_images(count, 102 / 255), torch.Generator().manual_seed(1)
    )[:, 0, 0, 0]
    # PIL truncates the blend: floor(102 * 0.1) = 10, floor(102 * 1.9) = 193 (float32 factors)
    groups = {
        "invert": 153 / 255, "posterize": 96 / 255, "darker": 10 / 255, "brighter": 193 / 255,
        "none": 0.4,
    }  # fmt: skip
    fractions = {k: ((output - v).abs() < 2e-3).float().mean().item() for k, v in groups.items()}
    assert sum(fractions.values()) == pytest.approx(1.0)
    for key in ("invert", "posterize", "none"):
        assert abs(fractions[key] - 0.25) < five_sigma(0.25, count), fractions
    assert abs(fractions["darker"] + fractions["brighter"] - 0.25) < five_sigma(0.25, count)
    assert abs(fractions["darker"] - 0.125) < five_sigma(0.125, count)  # sign: 1/2 each


def test_random_magnitude_single_transform() -> None:
    output = BatchAugmenter("Brightness", crop=False, flip=False)(
        constant_images(3000, 128 / 255), torch.Generator().manual_seed(2)
    )[:, 0, 0, 0]
    factors = output * 255 / 128  # 1 +- 0.9 * U[0, 1], truncated to a level (1/128 of 1)
    assert factors.min() >= 0.1 - 1 / 128 and factors.max() <= 1.9 + 1e-5
    assert abs((factors - 1).abs().mean().item() - 0.45) < 0.03  # E|0.9 U| = 0.45
    assert len(torch.unique(output)) >= 225  # nearly every level from 128 * 0.1 to 128 * 1.9


def test_randaugment_plan_draws_ops_uniformly() -> None:
    plan = sample_plan(RandAugment(2, 9), 6000, torch.Generator().manual_seed(0))
    assert plan.op_ids.shape == (6000, 2) and np.allclose(plan.magnitudes, 0.3)
    counts = np.bincount(plan.op_ids.ravel(), minlength=len(OP_NAMES)) / plan.op_ids.size
    assert np.abs(counts - 1 / 15).max() < five_sigma(1 / 15, plan.op_ids.size)


def _reference_apply(images: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
    """Apply a plan one sample and one op at a time, through the op table's public ops."""
    outputs = []
    levels = (images * 255).round() / 255  # apply_plan reads its input as 8-bit levels
    for index, image in enumerate(levels):
        sample = image[None].clone()
        for position, op_id in enumerate(plan.op_ids[index]):
            if op_id < 0:
                continue
            spec = OPS[OP_NAMES[op_id]]
            magnitude, sign = plan.magnitudes[index, position], plan.signs[index, position]
            argument = torch.tensor([spec.argument(float(magnitude), float(sign))])
            if spec.name == "Cutout":
                assert plan.centers is not None
                center = torch.from_numpy(plan.centers[index, position] * sample.shape[-1])
                sample = augment_geometric.cutout(sample, argument, centers=center[None])
            else:
                sample = spec.tensor(sample, argument.double(), None)
        outputs.append(sample[0])
    return torch.stack(outputs)


@pytest.mark.parametrize("spec", ["mocov2", "randaugment:3:20", "random"])
def test_grouped_application_equals_one_op_at_a_time(spec: str) -> None:
    rng = random.Random(5)
    policy = (
        Policy([[OpSetting(rng.choice(OP_NAMES), rng.random(), rng.random())
                 for _ in range(2)] for _ in range(5)])
        if spec == "random"
        else resolve_policy(spec)
    )  # fmt: skip
    plan = sample_plan(policy, 64, torch.Generator().manual_seed(3))
    images = torch.rand(64, 3, 12, 12)
    grouped = apply_plan(images.clone(), plan, None)
    assert torch.equal(grouped, _reference_apply(images, plan))


def test_batch_augmenter_output_and_determinism() -> None:
    images = (torch.rand(16, 3, 16, 16) * 255).to(torch.uint8)
    augmenter = BatchAugmenter("mocov2")
    first = augmenter(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.device == images.device and first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, augmenter(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augmenter(images, torch.Generator().manual_seed(1)))
    floats = images.float() / 255
    kept = floats.clone()
    BatchAugmenter("randaugment:2:20", crop=False, flip=False)(floats)
    assert torch.equal(floats, kept)  # the caller's batch is not modified
    # The one factory of views from a config honours every field, the base transform included.
    views = build_augmenter(AugmentConfig(base="Rotate", policy="none", crop=False, flip=False))
    rotate = BatchAugmenter(resolve_policy("Rotate"), crop=False, flip=False)
    same_draws = (torch.Generator().manual_seed(5), torch.Generator().manual_seed(5))
    assert torch.equal(views(images, same_draws[0]), rotate(images, same_draws[1]))
    with pytest.raises(ValueError, match="crop_scale: must satisfy"):
        BatchAugmenter("none", crop_scale=(0.0, 1.0))


def test_batch_augmenter_runs_cpu_batches_on_its_own_threads_and_restores_the_callers() -> None:
    """One thread by default (the thread policy), the caller's count after the call, and the
    same views whatever the thread count."""
    images = (torch.rand(32, 3, 16, 16) * 255).to(torch.uint8)
    seen: list[int] = []

    class Recording(BatchAugmenter):
        def _augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return super()._augment(images, generator)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        single = Recording("mocov2")(images, torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == 2
        callers = Recording("mocov2", cpu_threads=None)(images, torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2] and torch.equal(single, callers)
    with pytest.raises(ValueError, match="cpu_threads"):
        BatchAugmenter("none", cpu_threads=0)


def test_policy_transform_in_a_torchvision_pipeline() -> None:
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    on_pil = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            PolicyTransform("Invert", seed=0),
            transforms.ToTensor(),
        ]
    )
    inverted = on_pil(image)
    assert inverted.shape == (3, 16, 16)
    original = transforms.ToTensor()(image)
    assert torch.allclose(inverted, 1 - original, atol=1e-6) or torch.allclose(
        inverted, 1 - original.flip(-1), atol=1e-6
    )
    on_tensor = transforms.Compose([transforms.PILToTensor(), PolicyTransform("mocov2", seed=0)])
    result = on_tensor(image)
    assert result.dtype == torch.uint8 and result.shape == (3, 16, 16)
    as_float = PolicyTransform("Invert")(original)
    assert as_float.dtype == torch.float32 and torch.allclose(as_float, 1 - original, atol=1e-6)
    with pytest.raises(TypeError, match="expected a PIL image or a CHW tensor"):
        PolicyTransform("Invert")(original[None])


def test_apply_policy_pil_is_seeded() -> None:
    image = Image.fromarray((np.random.default_rng(1).random((12, 12, 3)) * 255).astype(np.uint8))
    policy = RandAugment(3, 25)
    first = [np.asarray(apply_policy_pil(policy, image, random.Random(7))) for _ in range(2)]
    other = np.asarray(apply_policy_pil(policy, image, random.Random(8)))
    assert np.array_equal(first[0], first[1]) and not np.array_equal(first[0], other)


def test_randaugment_as_policy_is_the_same_distribution() -> None:
    import itertools

    from selfaugment.trainer.augment.ops import OP_NAMES
    from selfaugment.trainer.policy import RandAugment, expected_strength
    from selfaugment.trainer.policy.builtins import randaugment_as_policy

    randaugment = RandAugment(2, 9)
    policy = randaugment_as_policy(randaugment)
    assert policy.name == "randaugment:2:9" and len(policy.sub_policies) == 15**2
    pairs = [tuple(setting.op for setting in sub) for sub in policy.sub_policies]
    assert pairs == list(itertools.product(OP_NAMES, repeat=2))  # every ordered pair once
    assert {(s.probability, s.magnitude) for sub in policy.sub_policies for s in sub} == {
        (1.0, 0.3)
    }
    explicit, implicit = expected_strength(policy), expected_strength(randaugment)
    assert explicit.keys() == implicit.keys()
    for op in explicit:
        assert explicit[op] == pytest.approx(implicit[op])
