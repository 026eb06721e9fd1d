"""A test-only stand-in for `selfaugment worker` used by the operator *mechanics* tests.

It trains nothing: it writes the progress and result files the operator reads, so that restart, retry,
failure, deletion and secret-handling tests take seconds. The real pipeline is exercised by
the end-to-end test with the real worker. Environment knobs:

- FAKE_SLEEP: seconds per task (0.5);
- FAKE_FAIL_TASKS: comma-separated task ids (or Pretrain prefixes) that fail, after
  FAKE_FAIL_SLEEP seconds (FAKE_SLEEP), with exit code FAKE_EXIT_CODE (1);
- FAKE_FAIL_TIMES: fail only that many times in all (counted in files under FAKE_STATE_DIR);
- FAKE_FAIL_RANK: in a multi-node Pretrain (JOB_COMPLETION_INDEX set), only that rank fails.

In a multi-node Pretrain, rank 0 writes the files; the other ranks only sleep.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from selfaugment.trainer.store import open_store


def fails(run: str) -> bool:
    """Whether this process fails, as the FAKE_FAIL_* knobs say (and counts the failure)."""
    if run not in os.environ.get("FAKE_FAIL_TASKS", "").split(","):
        return False
    rank = os.environ.get("FAKE_FAIL_RANK")
    if rank is not None and os.environ.get("JOB_COMPLETION_INDEX", "0") != rank:
        return False
    times = os.environ.get("FAKE_FAIL_TIMES")
    if times is None:
        return True
    counter = Path(os.environ["FAKE_STATE_DIR"]) / f"{run.replace('/', '_')}.failures"
    failed = int(counter.read_text()) if counter.exists() else 0
    if failed >= int(times):
        return False
    counter.write_text(str(failed + 1))
    return True


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
    sleep = float(os.environ.get("FAKE_SLEEP", "0.5"))
    if fails(args.task or args.prefix):
        time.sleep(float(os.environ.get("FAKE_FAIL_SLEEP", sleep)))
        print(f"fake worker: {args.task or args.prefix} fails on purpose", file=sys.stderr)
        return int(os.environ.get("FAKE_EXIT_CODE", "1"))
    if os.environ.get("JOB_COMPLETION_INDEX", "0") != "0":  # another rank: rank 0 writes
        time.sleep(sleep)
        return 0
    # Figures of a training task at its start, as the real worker writes them (read for metrics).
    store.write_json(f"{key}/progress.json", {"epoch": 0, "epochs": 1, "loss": 9.5})
    time.sleep(sleep)
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
