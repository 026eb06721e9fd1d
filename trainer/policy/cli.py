"""`selfaugment policy validate|show|render|import|export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfaugment.trainer.config import DatasetConfig


def policy_command(args: argparse.Namespace) -> int:
    from selfaugment.trainer.policy import PolicyError, describe, load_policy, resolve_policy

    if args.policy_command == "validate":
        failures = 0
        for path in args.files:
            try:
                policy = load_policy(path)
            except (PolicyError, OSError) as error:
                failures += 1
                print(f"INVALID {error}", file=sys.stderr)
                continue
            print(f"ok {path}: {len(policy.sub_policies)} sub-policies")
        return 1 if failures else 0
    if args.policy_command == "import":
        return import_command(args.file, args.output, args.name, args.image_size)
    if args.policy_command == "export":
        return export_command(args.policy, args.output, args.format)
    resolved = resolve_policy(args.policy)
    if args.policy_command == "show":
        print(describe(resolved))
        return 0
    from selfaugment.trainer.data import load_dataset
    from selfaugment.trainer.policy.render import render_policy_grid

    dataset = DatasetConfig(uri=args.dataset, image_size=args.image_size, limit=args.images)
    images = load_dataset(dataset, seed=args.seed).images
    render_policy_grid(
        resolved, images, args.output, samples_per_image=args.samples, seed=args.seed
    )
    print(f"wrote {args.output}")
    return 0


def import_command(
    path: Path, output: Path | None, name: str | None, image_size: int | None
) -> int:
    """Convert an FAA policy list; print the policy JSON or write it to ``output``."""
    from selfaugment.trainer.policy import save_policy
    from selfaugment.trainer.policy.faa import read_faa_policy

    policy = read_faa_policy(path, name=name, image_size=image_size)
    if output is None:
        sys.stdout.write(policy.to_json())
        return 0
    save_policy(policy, output)
    print(f"wrote {output}: {len(policy.sub_policies)} sub-policies", file=sys.stderr)
    return 0


def export_command(spec: str, output: Path | None, text_format: str | None) -> int:
    """Write a policy as an FAA list (JSON or YAML), or fail naming what FAA cannot express."""
    from selfaugment.trainer.policy import Policy, PolicyError, resolve_policy
    from selfaugment.trainer.policy.faa import faa_text, policy_to_faa

    policy = resolve_policy(spec)
    if not isinstance(policy, Policy):
        raise PolicyError(f"{spec}: RandAugment is not a list of sub-policies; FAA has no form")
    if text_format is None:
        suffix = output.suffix.lower() if output is not None else ""
        text_format = "yaml" if suffix in (".yaml", ".yml") else "json"
    text = faa_text(policy_to_faa(policy, spec), as_yaml=text_format == "yaml")
    if output is None:
        sys.stdout.write(text)
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}: {len(policy.sub_policies)} sub-policies", file=sys.stderr)
    return 0
