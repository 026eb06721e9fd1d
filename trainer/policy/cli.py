"""`selfaugment policy validate|show|render`."""

from __future__ import annotations

import argparse
import sys

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
