"""Status of the custom resources: typed models (the CRD status schema is generated from them).

Status fields follow the Kubernetes API conventions (camelCase, `conditions` as metav1.Condition
in a list-map keyed by `type`, times as RFC 3339 `date-time`, `observedGeneration`), so generic
tools (kubectl wait --for=condition, kstatus, Argo CD, server-side apply) read them; the spec is
camelCase too (trainer/config.py StrictModel).

Terminal conditions: `Finished` turns True when a run ends either way (reason Succeeded or
Failed), so `kubectl wait --for=condition=Finished` returns on failure too; `Succeeded` and
`Failed` say which.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
#: RFC 3339 times: the CRD says `format: date-time`, so the API server checks them.
_DATE_TIME: dict[str, Any] = {"format": "date-time"}
#: Conditions are a map keyed by `type` (metav1.Condition): server-side apply merges by type.
_CONDITIONS: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Status):
    """A metav1.Condition: the latest observation of one aspect of the resource."""

    type: str = Field(
        ...,
        description=(
            "Finished, Succeeded, Failed, Ready, Progressing, Queued (Jobs suspended until "
            "Kueue admits them), SpecValid, SpecImmutable, StorageReady or WorkersHealthy."
        ),
    )
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase machine-readable reason.")
    message: str = Field("", description="Human-readable details (names the task or field).")
    lastTransitionTime: str = Field(
        ..., description="When status last changed (RFC 3339).", json_schema_extra=_DATE_TIME
    )
    observedGeneration: int | None = Field(None, description="Generation this was computed for.")


class Progress(_Status):
    """How far a search is: tasks done of all tasks, and an estimate of the time left."""

    done: int = Field(0, description="Tasks whose result exists in the store.")
    total: int = Field(0, description="All tasks of the search (from the planner).")
    running: int = Field(0, description="Tasks with an active Job.")
    percent: int = Field(0, description="done / total in percent (rounded down).")
    eta: str | None = Field(
        None, description="Estimated completion time (RFC 3339).", json_schema_extra=_DATE_TIME
    )
    trialsDone: int = Field(0, description="Candidate policies scored so far.")
    trialsTotal: int = Field(0, description="Candidate policies to score in all.")


class PolicyRef(_Status):
    """A policy artifact in the store."""

    uri: str | None = Field(None, description="URI of the policy JSON in the store.")
    summary: str | None = Field(None, description="Short readable summary of the policy.")
    objective: float | None = Field(None, description="Objective value (lower is better).")


class AugmentSearchStatus(_Status):
    """Status of an AugmentSearch."""

    phase: Phase = Field("Pending", description="Pending, Running, Succeeded or Failed.")
    stage: str | None = Field(
        None, description="Current stage: base, folds, search, merge, retrain, report or done."
    )
    progress: Progress = Field(default_factory=Progress)
    conditions: list[Condition] = Field(
        default_factory=list, description="Latest conditions.", json_schema_extra=_CONDITIONS
    )
    basePolicy: str | None = Field(None, description="Base transform chosen (or given).")
    bestPolicy: PolicyRef = Field(default_factory=PolicyRef, description="Best policy found.")
    bestObjective: float | None = Field(None, description="Best objective value so far.")
    results: str | None = Field(None, description="URI of the run's artifacts (the store).")
    pretrainRef: str | None = Field(None, description="Name of the retraining Pretrain.")
    startTime: str | None = Field(
        None,
        description="When the first task was started (RFC 3339).",
        json_schema_extra=_DATE_TIME,
    )
    failedTask: str | None = Field(None, description="Task whose Job failed, when Failed.")
    retryToken: str | None = Field(
        None, description="The last value of the selfaugment.io/retry annotation acted on."
    )
    observedGeneration: int | None = Field(None, description="Generation last reconciled.")


class PretrainStatus(_Status):
    """Status of a Pretrain."""

    phase: Phase = Field("Pending", description="Pending, Running, Succeeded or Failed.")
    epoch: int | None = Field(None, description="Current training epoch.")
    epochs: int | None = Field(None, description="Epochs in all.")
    loss: float | None = Field(None, description="Latest epoch-mean InfoNCE loss.")
    rotationAccuracy: float | None = Field(None, description="Rotation accuracy after training.")
    checkpoint: str | None = Field(None, description="URI of the trained checkpoint.")
    jobName: str | None = Field(None, description="Name of the Job that runs the training.")
    restarts: int = Field(
        0,
        description=(
            "Times the whole Job was started again after a rank failed (multi-node training; "
            "at most spec.maxRetries)."
        ),
    )
    restartedJobUid: str | None = Field(
        None, description="uid of the last failed Job started again (counted once)."
    )
    retryToken: str | None = Field(
        None, description="The last value of the selfaugment.io/retry annotation acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Latest conditions.", json_schema_extra=_CONDITIONS
    )
    observedGeneration: int | None = Field(None, description="Generation last reconciled.")
