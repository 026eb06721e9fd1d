"""Opening a run's store: only with the run's own credentials Secret, named in every refusal
(never its values)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from selfaugment.operator.kube import KubeError
from selfaugment.operator.runtime import StoreUnavailable, open_run_store, run_credentials
from selfaugment.operator.settings import OperatorSettings
from selfaugment.trainer.spec import StorageConfig
from selfaugment.trainer.store import S3Store

SECRET_VALUE = "s3cr3t-never-shown"


class Secrets:
    """The one API call run_credentials makes (GET of a Secret), answering as a server would:
    the object, None for 404, or KubeError (403 when RBAC does not allow the read)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[tuple[str, ...]] = []

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        self.asked.append((api_version, plural, namespace, name))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def secret(**values: str) -> dict[str, Any]:
    return {"data": {key: base64.b64encode(v.encode()).decode() for key, v in values.items()}}


def storage(**fields: Any) -> StorageConfig:
    return StorageConfig.model_validate(
        {"uri": "s3://team/run", "endpoint": "http://minio.example:9000", **fields}
    )


def test_the_runs_secret_in_the_runs_namespace_gives_the_credentials() -> None:
    kube = Secrets(secret(AWS_ACCESS_KEY_ID="team-key", AWS_SECRET_ACCESS_KEY=SECRET_VALUE))
    credentials = run_credentials(kube, "team-ns", storage(secretRef="team"), OperatorSettings())
    assert (credentials.access_key, credentials.secret_key) == ("team-key", SECRET_VALUE)
    assert kube.asked == [("v1", "secrets", "team-ns", "team")]
    assert SECRET_VALUE not in repr(credentials)
    # the operator's default name is looked up in the run's namespace too, never its own
    kube.asked.clear()
    run_credentials(kube, "team-ns", storage(), OperatorSettings(s3_secret="default-name"))
    assert kube.asked == [("v1", "secrets", "team-ns", "default-name")]
    store = open_run_store(storage(secretRef="team"), OperatorSettings(), kube, "team-ns")
    assert isinstance(store, S3Store) and store.endpoint == "http://minio.example:9000"


@pytest.mark.parametrize(
    "answer, reason, said",
    [
        (None, "SecretNotFound", "Secret team (spec.storage.secretRef) not found in namespace ns"),
        (KubeError("GET ...: 403 Forbidden", 403), "SecretForbidden", "rbac.secretNames"),
        (secret(AWS_ACCESS_KEY_ID="k"), "SecretInvalid", "key AWS_SECRET_ACCESS_KEY is missing"),
        ({"data": {"AWS_ACCESS_KEY_ID": "%%%", "AWS_SECRET_ACCESS_KEY": "eA=="}}, "SecretInvalid",
         "key AWS_ACCESS_KEY_ID is missing, empty or not base64"),
    ],
)  # fmt: skip
def test_a_secret_that_cannot_be_used_is_named_with_a_reason(
    answer: Any, reason: str, said: str
) -> None:
    with pytest.raises(StoreUnavailable) as refused:
        open_run_store(storage(secretRef="team"), OperatorSettings(), Secrets(answer), "ns")
    assert refused.value.reason == reason and said in str(refused.value), str(refused.value)


def test_a_run_without_a_secret_is_refused_without_any_store_access() -> None:
    kube = Secrets(secret(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s"))
    with pytest.raises(StoreUnavailable) as refused:
        open_run_store(storage(), OperatorSettings(), kube, "ns")
    assert refused.value.reason == "NoCredentials" and "spec.storage.secretRef" in str(
        refused.value
    )
    assert kube.asked == []
