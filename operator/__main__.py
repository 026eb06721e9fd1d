"""`python -m selfaugment.operator`: run the operator (kopf) in this process."""

from __future__ import annotations

import argparse
import sys

from selfaugment.logs import quiet_client_libraries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfaugment.operator", description="SelfAugment Kubernetes operator."
    )
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], help="Watch only these namespaces."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    args = parser.parse_args(argv)

    import kopf

    from selfaugment.operator import handlers  # registers the handlers

    handlers.RUNTIME.namespaces = tuple(args.namespace)  # the resync lists these (or all)
    kopf.configure(verbose=args.verbose, log_prefix=True)
    quiet_client_libraries()  # no request headers (tokens, signatures) in debug logs
    kopf.run(
        standalone=True,  # no kopf peering: leader election is a Lease (operator/leader.py)
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
