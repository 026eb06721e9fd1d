"""The operator at scale: N concurrent AugmentSearches on the Kubernetes API emulator.

The real operator (`python -m selfaugment.operator`, one process, leader election on) runs
against the emulated API server of tests/operator/conftest.py and a moto S3 server, each in a
process of its own (so that none waits for another's interpreter lock). The
kubelet here runs no process: for each new Job it writes the task's result to the store (what
tests/operator/fake_worker.py writes) and marks the Job Complete at once, so what is measured is
the operator's own work. Each search is the tests' small one: 7 Jobs (2 folds, 2 TPE tasks,
merge, the retraining Pretrain's Job, report).

Per N (default 10, 50, 100):

- latency from a Job's completion to the creation of the Job it unblocked (for each Job created
  after a completion in its search: its creation time minus the latest completion before it
  in that search), p50 and p99;
- the operator's CPU seconds (user + system, /proc) and its peak resident memory;
- the API requests the operator made per minute of the run (the emulator counts them; the
  benchmark's own requests carry another User-Agent and are left out);
- the CPU seconds of the emulated API server and of the S3 server: where the time went when
  the operator's own CPU stays low (both are far slower than a real API server and MinIO).

Limits: kmock's emulator answers from one thread and keeps every request and every version of
every object in memory. Measured on a 2-core machine, it saturated one core from about 10
concurrent searches on (640 MB after a few minutes) while the operator used under 10% of one,
so beyond that the figures are the emulator's; the operator's Lease then lapses too (its API
calls take seconds), which is the design (a leader that cannot renew stops acting). A real API
server, or a faster emulator, is needed for the goal of p99 < 1 s at 100 searches.

Usage: python benchmarks/bench_operator.py [--searches 10 50 100] [--interval 30] [--write]
Prints the results; with --write, also benchmarks/results/operator-emulator.json and .md
(marked when the load average exceeded the number of cores: benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import common

from selfaugment.operator import names
from selfaugment.trainer.store.s3 import Credentials, s3_client

REPO = Path(__file__).resolve().parents[1]
BENCH_AGENT = "selfaugment-bench"
_TASK = re.compile(r"--task (\S+)")


def emulator_module() -> Any:
    """tests/operator/conftest.py: the emulated cluster and the operator process."""
    path = REPO / "tests" / "operator" / "conftest.py"
    spec = importlib.util.spec_from_file_location("selfaugment_bench_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def serve_emulator(workdir: str, connection: Connection) -> None:
    """In a child process: the emulated API server, until asked for what it recorded."""
    emulator = emulator_module()
    cluster = emulator.Cluster(Path(workdir))
    connection.send((cluster.url, str(cluster.kubeconfig)))
    connection.recv()  # the run is over
    requests = [agent(request) for request in list(cluster.emulator._requests)]
    creations = list(cluster.emulator.creations())
    times = list(cluster.emulator.creation_times())
    connection.send((creations, times, requests))
    cluster.close()


class Remote:
    """The parts of conftest.Cluster the benchmark uses, for an emulator in another process."""

    def __init__(self, emulator: Any, url: str, kubeconfig: str) -> None:
        self.url = url
        self.kubeconfig = Path(kubeconfig)
        self.kube = emulator.Kube(emulator._api_client(url))
        self.kube.api.user_agent = BENCH_AGENT
        self.create_secret = partial(emulator.Cluster.create_secret, self)
        self.apply = partial(emulator.Cluster.apply, self)
        self.jobs = partial(emulator.Cluster.jobs, self)
        self.wait_for = partial(emulator.Cluster.wait_for, self)


class InstantKubelet:
    """Completes each new Job at once, after writing what its worker would have written."""

    def __init__(self, cluster: Any, s3: Any) -> None:
        self.cluster = cluster
        self.s3 = s3
        self.completed: dict[str, list[float]] = {}  # search -> completion times
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def _loop(self) -> None:
        while not self.stop.is_set():
            for job in self.cluster.jobs():
                uid = job["metadata"]["uid"]
                if uid not in self.seen and not job["spec"].get("suspend"):
                    self.seen.add(uid)
                    self._complete(job)
            self.stop.wait(0.25)  # a completion's time is taken after its patch

    def _write(self, uri: str, key: str, body: str) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        data = body.encode()
        self.s3.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))

    def _complete(self, job: dict[str, Any]) -> None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        command = " ".join(container["command"])
        task = _TASK.search(command).group(1)  # type: ignore[union-attr]
        uri = command.split("--store ", 1)[1].split()[0]
        result = '{"fake": true}'
        if task.startswith("search-"):
            result = '{"best_objective": -1.0, "trials_done": 2}'
        if task == "merge":
            self._write(uri, "policy.json", '{"sub_policies": [[["Rotate", 0.5, 0.3]]]}')
        if task == "retrain":
            self._write(uri, "tasks/retrain/progress.json", '{"epoch": 1, "epochs": 1}')
            result = '{"loss": 4.1, "rotation_accuracy": 0.5}'
        self._write(uri, f"tasks/{task}/result.json", result)
        meta = job["metadata"]
        done = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        self.cluster.kube.patch_status(
            "batch/v1",
            "jobs",
            meta["namespace"],
            meta["name"],
            {"active": 0, "succeeded": 1, "conditions": [done]},
        )
        search = meta["labels"][names.LABEL_SEARCH]
        self.completed.setdefault(search, []).append(time.monotonic())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def leading(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return b'"leading": true' in answer.read()
    except OSError as error:  # 503 (not ready) or not serving yet
        return b'"leading": true' in getattr(error, "read", lambda: b"")()


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def measure(
    emulator: Any, endpoint: str, searches: int, interval: float, store_pid: int
) -> dict[str, Any]:
    """One run: `searches` AugmentSearches from creation to Succeeded."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=serve_emulator, args=(str(workdir), theirs), daemon=True
    )
    server.start()
    cluster = Remote(emulator, *ours.recv())
    s3 = s3_client(endpoint, "us-east-1", Credentials("bench", "bench"))
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    operator = emulator.OperatorProcess(
        cluster,
        workdir,
        {
            **credentials,
            "AWS_DEFAULT_REGION": "us-east-1",
            "SELFAUGMENT_TIMER_INTERVAL": str(interval),
        },
    )
    operator.env["PATH"] = os.environ.get("PATH", operator.env["PATH"])
    kubelet = InstantKubelet(cluster, s3)
    try:
        cluster.create_secret("store-credentials", credentials)
        operator.start()
        cluster.wait_for("the operator leads", lambda: leading(operator.metrics_port), 120)
        pid = operator.process.pid
        cpu_before = cpu_seconds(pid)
        servers_before = cpu_seconds(server.pid) + cpu_seconds(store_pid)
        started = time.monotonic()
        for index in range(searches):
            name = f"bench-{index}"
            manifest = emulator.fake_search(name, endpoint)
            manifest["spec"]["storage"]["uri"] = f"s3://selfaugment/bench/{workdir.name}/{name}"
            cluster.apply(manifest)

        def all_done() -> bool:
            bodies = cluster.kube.list(names.API_VERSION, names.SEARCH_PLURAL, "default", {})
            phases = [(b.get("status") or {}).get("phase") for b in bodies]
            if "Failed" in phases:
                raise RuntimeError(f"a search failed; see {operator.log}")
            return len(bodies) == searches and all(p == "Succeeded" for p in phases)

        cluster.wait_for("every search Succeeded", all_done, 60 * 60)
        wall = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu_before
        servers = cpu_seconds(server.pid) + cpu_seconds(store_pid) - servers_before
        rss = peak_rss_mb(pid)
    finally:
        operator.stop()
        kubelet.close()
        ours.send("report")
        creations, times, agents = ours.recv()
        server.join(30)
    # The operator's requests, from its start (its first listings included) to the end.
    made = [seen for seen in agents if seen != BENCH_AGENT]
    by_kind = reaction_latencies(creations, times, kubelet)
    latencies = [value for values in by_kind.values() for value in values]
    return {
        "latency_by_job_kind": {
            kind: {
                "jobs": len(values),
                "p50_seconds": round(percentile(values, 50), 3),
                "max_seconds": round(max(values), 3),
            }
            for kind, values in sorted(by_kind.items())
        },
        "searches": searches,
        "jobs": sum(len(times) for times in kubelet.completed.values()),
        "wall_seconds": round(wall, 1),
        "latency_p50_seconds": round(percentile(latencies, 50), 3),
        "latency_p99_seconds": round(percentile(latencies, 99), 3),
        "latency_max_seconds": round(max(latencies), 3),
        "operator_cpu_seconds": round(cpu, 1),
        "operator_cpu_percent": round(100 * cpu / wall, 1),
        "operator_peak_rss_mb": round(rss, 1),
        "emulator_and_s3_cpu_seconds": round(servers, 1),
        "api_requests": len(made),
        "api_requests_per_minute": round(len(made) / wall * 60),
    }


def agent(request: Any) -> str:
    headers = {str(k).lower(): v for k, v in dict(request.headers or {}).items()}
    return str(headers.get("user-agent", ""))


def reaction_latencies(
    creations: list[tuple[str, str]], times: list[float], kubelet: InstantKubelet
) -> dict[str, list[float]]:
    """For each Job created after a completion in its search: creation - latest completion
    (time.monotonic is the system's monotonic clock, shared by the processes), by the kind
    of Job created (fold, search, merge, retrain, report)."""
    latencies: dict[str, list[float]] = {}
    for (plural, name), created in zip(creations, times, strict=True):
        if plural != "jobs":
            continue
        match = re.search(r"-(fold|search|merge|retrain|report).*$", name)
        search = name[: match.start()] if match else name
        before = [t for t in kubelet.completed.get(search, []) if t < created]
        if before:
            kind = match.group(1) if match else "other"
            latencies.setdefault(kind, []).append(created - max(before))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--searches", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--interval", type=float, default=30.0, help="SELFAUGMENT_TIMER_INTERVAL")
    common.add_output_arguments(parser)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    load = common.Load()
    emulator = emulator_module()
    port = emulator.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    s3 = s3_client(endpoint, "us-east-1", Credentials("bench", "bench"))
    try:
        deadline = time.monotonic() + 60
        while True:  # the server starts in a second or two
            try:
                s3.make_bucket("selfaugment")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        runs = [measure(emulator, endpoint, n, args.interval, server.pid) for n in args.searches]
    finally:
        server.terminate()
        server.wait(10)
    # the emulated API server, the S3 server and the operator run beside this process: the
    # load average at the end counts the cores they kept busy, which is not other load
    busy = sum(r["emulator_and_s3_cpu_seconds"] + r["operator_cpu_seconds"] for r in runs)
    load.finish(own=busy / sum(r["wall_seconds"] for r in runs))
    lines = [
        "# Operator at scale (API emulator, instant fake worker)",
        "",
        f"`{common.command()}`; {load.line()}.",
        f"Resync interval {args.interval:g} s; 7 Jobs per search; one operator process.",
        "",
        "| searches | Jobs | wall s | completion -> next Job p50 s | p99 s | max s "
        "| operator CPU s | CPU % | peak RSS MB | API requests/min | API server + S3 CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run['searches']} | {run['jobs']} | {run['wall_seconds']} "
            f"| {run['latency_p50_seconds']} | {run['latency_p99_seconds']} "
            f"| {run['latency_max_seconds']} | {run['operator_cpu_seconds']} "
            f"| {run['operator_cpu_percent']} | {run['operator_peak_rss_mb']} "
            f"| {run['api_requests_per_minute']} | {run['emulator_and_s3_cpu_seconds']} |"
        )
    lines += ["", "Completion -> next Job by the kind of Job created (p50 / max seconds):", ""]
    for run in runs:
        kinds = ", ".join(
            f"{kind} {value['p50_seconds']} / {value['max_seconds']} ({value['jobs']})"
            for kind, value in run["latency_by_job_kind"].items()
        )
        lines.append(f"- {run['searches']} searches: {kinds}")
    report = {"machine": common.machine(), "interval_seconds": args.interval, "runs": runs}
    common.finish(args, "operator-emulator", report, "\n".join(lines) + "\n", load)


if __name__ == "__main__":
    main()
