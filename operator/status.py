"""Pure helpers for status: Job states, stuck pods, conditions (metav1.Condition style), progress
and ETA."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from selfaugment.errors import EXIT_BAD_INPUT

JOB_ACTIVE = "active"
JOB_SUSPENDED = "suspended"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"


def now_iso() -> str:
    return (
        dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def number(data: Mapping[str, Any] | None, *keys: str) -> float | None:
    """The first of `keys` in `data` whose value is a number (not a bool), as a float."""
    for key in keys:
        value = (data or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _has_condition(job: Mapping[str, Any], kind: str) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def job_state(job: Mapping[str, Any]) -> str:
    """active, suspended, succeeded or failed, from the Job's status as the controller sets it."""
    status = job.get("status") or {}
    completions = (job.get("spec") or {}).get("completions") or 1
    if _has_condition(job, "Failed"):
        return JOB_FAILED
    if _has_condition(job, "Complete") or (status.get("succeeded") or 0) >= completions:
        return JOB_SUCCEEDED
    if (job.get("spec") or {}).get("suspend"):
        return JOB_SUSPENDED
    return JOB_ACTIVE


def job_failure(job: Mapping[str, Any]) -> str:
    """A one-line reason for a failed Job: condition reason and message, and attempts."""
    status = job.get("status") or {}
    failure = JobFailure.of(job)
    attempts = status.get("failed") or 0
    detail = f"{failure.reason}: {failure.message}" if failure.message else failure.reason
    return f"{detail} ({attempts} failed attempt{'s' if attempts != 1 else ''})"


#: The Job controller's reason for a Job stopped by its activeDeadlineSeconds.
DEADLINE_EXCEEDED = "DeadlineExceeded"
_EXIT_CODE = re.compile(r"failed with exit code (\d+)")


@dataclass(frozen=True)
class JobFailure:
    """Why a Job failed, from its Failed condition as the Job controller writes it."""

    reason: str
    message: str

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> JobFailure:
        for condition in (job.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Failed" and condition.get("status") == "True":
                return cls(condition.get("reason") or "Failed", condition.get("message") or "")
        return cls("Failed", "")

    @property
    def exit_code(self) -> int | None:
        """The exit code a podFailurePolicy FailJob rule matched ("Container worker for pod
        ns/name failed with exit code 2 matching FailJob rule at index 1"), if any."""
        found = _EXIT_CODE.search(self.message) if self.reason == "PodFailurePolicy" else None
        return int(found.group(1)) if found else None

    @property
    def deadline_exceeded(self) -> bool:
        return self.reason == DEADLINE_EXCEEDED


def job_deleting(job: Mapping[str, Any]) -> bool:
    """The Job is being deleted (a retry or a group restart): neither failed nor running."""
    return bool((job.get("metadata") or {}).get("deletionTimestamp"))


def classify_job_failure(job: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) of a failed Job: DeadlineExceeded (activeDeadlineSeconds), BadInput
    (the worker exited with EXIT_BAD_INPUT: not retried) or TaskFailed (retries used up)."""
    name = job["metadata"]["name"]
    failure = JobFailure.of(job)
    if failure.deadline_exceeded:
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return "DeadlineExceeded", (
            f"Job {name} ran longer than its deadline of {deadline} s and was stopped "
            "(spec.resources.activeDeadlineSeconds, else the operator's default for the stage)"
        )
    if failure.exit_code == EXIT_BAD_INPUT:
        return "BadInput", (
            f"Job {name}: the worker refused its input (exit code {EXIT_BAD_INPUT}), so it is not "
            f"retried; kubectl logs job/{name} names the field"
        )
    return "TaskFailed", f"Job {name} failed: {job_failure(job)}"


#: Waiting reasons the kubelet sets on a container that will not start without a fix (a missing
#: Secret or ConfigMap, a bad image name or tag, a registry that refuses the pull). Reasons of a
#: normal start (ContainerCreating, PodInitializing) are not among them.
STUCK_REASONS = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "RegistryUnavailable",
        "SignatureValidationFailed",
    }
)
#: Reasons the kubelet alternates between while it retries a pull: one kind of fault.
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull"})
#: Reasons about the image itself: its name is added to a message that does not name it.
_IMAGE_REASONS = IMAGE_PULL_REASONS | {"InvalidImageName", "ErrImageNeverPull"}


@dataclass(frozen=True)
class StuckPod:
    """A pod whose container waits for a cause that needs a fix, as the kubelet reports it."""

    pod: str
    job: str | None
    reason: str
    message: str

    def line(self) -> str:
        """`pod NAME of Job JOB: REASON: MESSAGE`, as in conditions and Events."""
        owner = f" of Job {self.job}" if self.job else ""
        detail = f"{self.reason}: {self.message}" if self.message else self.reason
        return f"pod {self.pod}{owner}: {detail}"

    @property
    def fault(self) -> tuple[str, str]:
        """(pod, kind of fault): what an Event was posted for (pull retries are one kind)."""
        return self.pod, "ImagePull" if self.reason in IMAGE_PULL_REASONS else self.reason


def _pod_job(pod: Mapping[str, Any]) -> str | None:
    metadata = pod.get("metadata") or {}
    for owner in metadata.get("ownerReferences") or []:
        if owner.get("kind") == "Job" and owner.get("name"):
            return str(owner["name"])
    labels = metadata.get("labels") or {}
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    return str(job) if job else None


def stuck_pods(pods: Sequence[Mapping[str, Any]]) -> list[StuckPod]:
    """Pods (sorted by name) with a container or init container waiting for a STUCK_REASONS
    cause; the image is added to the message when the kubelet's message does not name it."""
    found: list[StuckPod] = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if metadata.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        images = {
            c.get("name"): c.get("image")
            for key in ("initContainers", "containers")
            for c in (pod.get("spec") or {}).get(key) or []
        }
        statuses = [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]
        for container in statuses:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason not in STUCK_REASONS:
                continue
            message = " ".join(str(waiting.get("message") or "").split())
            image = container.get("image") or images.get(container.get("name"))
            if reason in _IMAGE_REASONS and image and image not in message:
                message = f"{message} (image {image})" if message else f"image {image}"
            found.append(StuckPod(str(metadata.get("name")), _pod_job(pod), reason, message))
            break
    return sorted(found, key=lambda stuck: stuck.pod)


_STUCK_LINE = re.compile(r"(?:^|; )pod (\S+)(?: of Job \S+)?: (\w+)")


def reported_faults(message: str) -> set[tuple[str, str]]:
    """The (pod, kind of fault) pairs a WorkersHealthy message built from StuckPod.line() names."""
    return {StuckPod(pod, None, reason, "").fault for pod, reason in _STUCK_LINE.findall(message)}


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new list with condition `kind` set; lastTransitionTime kept while status is unchanged."""
    text = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == kind), None)
    since = now_iso()
    if previous is not None and previous.get("status") == text:
        since = previous.get("lastTransitionTime") or since
    condition = {
        "type": kind,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    if previous is None:
        return [*conditions, condition]
    return [condition if c.get("type") == kind else c for c in conditions]


@dataclass(frozen=True)
class Eta:
    """An estimate of when a run finishes, from its start and its completed share."""

    start: dt.datetime
    done: int
    total: int

    def at(self, now: dt.datetime) -> str | None:
        if self.done <= 0 or self.done >= self.total:
            return None
        elapsed = (now - self.start).total_seconds()
        remaining = elapsed / self.done * (self.total - self.done)
        finish = now + dt.timedelta(seconds=remaining)
        return finish.replace(microsecond=0).isoformat().replace("+00:00", "Z")

    def seconds_left(self, now: dt.datetime) -> float | None:
        if self.done <= 0 or self.done >= self.total:
            return None
        elapsed = (now - self.start).total_seconds()
        return elapsed / self.done * (self.total - self.done)


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: what the API server stores after a merge-patch of `base`."""
    result = dict(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            previous = result.get(key)
            result[key] = merge_patch(previous if isinstance(previous, Mapping) else {}, value)
        else:
            result[key] = value
    return result
