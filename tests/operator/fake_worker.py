"""A test-only stand-in for `selfaugment worker` used by the operator *mechanics* tests.

It trains nothing: it writes the progress and result files the operator reads, so that restart, retry,
failure, deletion and secret-handling tests take seconds. The real pipeline is exercised by
the end-to-end test with the real worker. Environment knobs:
FAKE_FAIL_TASKS (comma-separated task ids that exit 1), FAKE_SLEEP (seconds per task).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from selfaugment.trainer.store import open_store


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("group")
    parser.add_argument("action")
    parser.add_argument("--store", required=True)
    parser.add_argument("--task")
    parser.add_argument("--prefix")
    args = parser.parse_args()
    store = open_store(args.store)
    key = f"tasks/{args.task}" if args.action == "run" else args.prefix
    # Figures of a training task at its start, as the real worker writes them (read for metrics).
    store.write_json(f"{key}/progress.json", {"epoch": 0, "epochs": 1, "loss": 9.5})
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.5")))
    if args.task in os.environ.get("FAKE_FAIL_TASKS", "").split(","):
        print(f"fake worker: task {args.task} fails on purpose", file=sys.stderr)
        return 1
    saw_credentials = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
    result: dict[str, object] = {"fake": True, "saw_credentials": saw_credentials}
    if args.task and args.task.startswith("search-"):
        result.update(best_objective=-1.0 - len(args.task) / 100, trials_done=2)
    if args.task == "merge":
        store.write_json("policy.json", {"sub_policies": [[["Rotate", 0.5, 0.3]]]})
    if args.action == "pretrain" or args.task == "retrain":
        store.write_json(f"{key}/progress.json", {"epoch": 1, "epochs": 1, "loss": 4.2})
        result.update(loss=4.1, rotation_accuracy=0.5)
    store.write_json(f"{key}/result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
