"""The one S3 client factory and the one local cache directory of the product.

Every S3 request of the product goes through a client made here: the `minio` SDK's client
(AWS S3, MinIO or any S3-compatible server such as moto).

Endpoint: the `endpoint` argument (a spec's `storage.endpoint`), else AWS_ENDPOINT_URL, else
S3_ENDPOINT_URL; none means AWS itself. A custom endpoint (MinIO, moto) is addressed
path-style; it must be `http(s)://host[:port]`.

Credentials: given explicitly (`Credentials`, e.g. from a Kubernetes Secret the operator read
for one run), or else, in this order: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and
AWS_SESSION_TOKEN), MINIO_ACCESS_KEY / MINIO_SECRET_KEY, the AWS shared credentials file
(AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), then a web identity token, container or instance
role. They are never logged, stored or put in messages.

Transient failures (refused or dropped connections, timeouts, throttling, 5xx) are retried with
exponential backoff, up to $SELFAUGMENT_S3_MAX_ATTEMPTS attempts (5) per request, each waiting
at most CONNECT_TIMEOUT / READ_TIMEOUT seconds, and every retry is logged as a warning that names
the endpoint and the cause; then the store raises one StoreError naming both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from selfaugment.environ import env_int
from selfaugment.errors import SelfAugmentError

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
CACHE_VARIABLE = "SELFAUGMENT_CACHE"
DEFAULT_REGION = "us-east-1"
MAX_ATTEMPTS_VARIABLE = "SELFAUGMENT_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: Seconds between retries grow as 0.5, 1, 2, ... up to this (the first retry is immediate).
BACKOFF_FACTOR = 0.5
BACKOFF_MAX = 20.0
#: HTTP statuses that mean "try again": throttling and server errors.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Objects larger than this are uploaded in parts of this size (S3's minimum part is 5 MiB).
MULTIPART_PART_SIZE = 64 * 2**20
_MAX_PARTS = 10_000
AWS_HOST = "s3.amazonaws.com"
#: Connections kept open per client (threads of one process may call at once).
CONNECTIONS = 16


class EndpointError(SelfAugmentError):
    """An S3 endpoint that is not `http(s)://host[:port]`."""


class MissingCredentialsError(ValueError):
    """No credentials were given and none were found (a ValueError, as minio's providers)."""


@dataclass(frozen=True)
class Credentials:
    """An access key pair (and session token), e.g. from a run's Secret; repr hides them."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def endpoint_url(endpoint: str | None = None) -> str | None:
    """The S3 endpoint to use: `endpoint`, else the first variable of ENDPOINT_VARIABLES set."""
    if endpoint:
        return endpoint
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def _host_of(url: str) -> tuple[str, bool]:
    """(host[:port], https?) of an endpoint URL; EndpointError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"S3 endpoint {url!r}: expected http(s)://host[:port]")
    if parts.username or parts.password:
        # never echo the URL: it holds credentials
        raise EndpointError("S3 endpoint: credentials in the URL are not accepted")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EndpointError(f"S3 endpoint {url!r}: expected http(s)://host[:port], no path")
    return parts.netloc, parts.scheme == "https"


def _environment_credentials() -> Any:
    """The credentials chain used when none are given (see the module's docstring)."""
    import urllib3
    from minio.credentials import (
        AWSConfigProvider,
        EnvAWSProvider,
        EnvMinioProvider,
        IamAwsProvider,
        Provider,
    )

    class QuickRole(Provider):
        """A web identity, container or instance role, asked briefly (1 retry, short
        timeouts) so that a machine without one is not held up; failures mean "none"."""

        def __init__(self) -> None:
            quick = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=urllib3.Retry(1)
            )
            self.provider = IamAwsProvider(http_client=quick)

        def retrieve(self) -> Any:
            try:
                return self.provider.retrieve()
            except (urllib3.exceptions.HTTPError, OSError, KeyError) as error:
                raise ValueError(f"no role credentials: {type(error).__name__}") from None

    class Chain(Provider):
        """The first provider that has credentials; kept while they are valid."""

        def __init__(self) -> None:
            self.providers = [EnvAWSProvider(), EnvMinioProvider(), AWSConfigProvider()]
            self.role = QuickRole()
            self.found: Any = None

        def retrieve(self) -> Any:
            if self.found is not None and not self.found.is_expired():
                return self.found
            for provider in [*self.providers, self.role]:
                try:
                    self.found = provider.retrieve()
                    return self.found
                except ValueError:
                    continue
            raise MissingCredentialsError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or use an AWS credentials file or role"
            )

    return Chain()


class _OwnRetriesOnly(logging.Filter):
    """Drops urllib3's own line for a retry that this module already logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Retrying (") and "LoggedRetry" in str(record.args))


logging.getLogger("urllib3.connectionpool").addFilter(_OwnRetriesOnly())


def _retry_policy(where: str, attempts_total: int) -> Any:
    """urllib3's Retry for every request of a client, logging each retry with the cause."""
    from urllib3.util.retry import Retry

    class LoggedRetry(Retry):
        def new(self, **changes: Any) -> LoggedRetry:
            return LoggedRetry(**{**self._parameters(), **changes})

        def _parameters(self) -> dict[str, Any]:
            return {
                "total": self.total,
                "connect": self.connect,
                "read": self.read,
                "redirect": self.redirect,
                "status": self.status,
                "other": self.other,
                "allowed_methods": self.allowed_methods,
                "status_forcelist": self.status_forcelist,
                "backoff_factor": self.backoff_factor,
                "backoff_max": self.backoff_max,
                "raise_on_redirect": self.raise_on_redirect,
                "raise_on_status": self.raise_on_status,
                "history": self.history,
                "respect_retry_after_header": self.respect_retry_after_header,
                "remove_headers_on_redirect": self.remove_headers_on_redirect,
                "backoff_jitter": self.backoff_jitter,
            }

        def increment(self, *args: Any, **kwargs: Any) -> LoggedRetry:
            fresh: LoggedRetry = super().increment(*args, **kwargs)  # raises when exhausted
            error = kwargs.get("error", args[3] if len(args) > 3 else None)
            response = kwargs.get("response", args[2] if len(args) > 2 else None)
            cause = (
                describe(error) if error is not None else f"HTTP {getattr(response, 'status', '?')}"
            )
            attempt = len(fresh.history) + 1
            log.warning(
                "S3 at %s: %s; retrying (attempt %d of %d)", where, cause, attempt, attempts_total
            )
            return fresh

    return LoggedRetry(
        total=attempts_total - 1,
        redirect=0,
        raise_on_redirect=False,  # minio reads S3's redirects (wrong region) itself
        allowed_methods=None,  # every method, as S3 requests are safe to repeat
        status_forcelist=RETRIED_STATUSES,
        raise_on_status=False,  # the last answer goes to minio, which names its code
        backoff_factor=BACKOFF_FACTOR,
        backoff_max=BACKOFF_MAX,
        backoff_jitter=BACKOFF_FACTOR / 2,
    )


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    credentials: Credentials | None = None,
) -> Minio:
    """A minio client for `endpoint` (see endpoint_url), `region` and `credentials` (None:
    the environment's, see the module's docstring)."""
    import certifi
    import urllib3
    from minio import Minio

    resolved = endpoint_url(endpoint)
    host, secure = _host_of(resolved) if resolved else (AWS_HOST, True)
    attempts_total = max(1, env_int(MAX_ATTEMPTS_VARIABLE, DEFAULT_MAX_ATTEMPTS))
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
        retries=_retry_policy(endpoint_name(endpoint), attempts_total),
        maxsize=CONNECTIONS,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("AWS_CA_BUNDLE")
        or os.environ.get("SSL_CERT_FILE")
        or certifi.where(),
    )
    provider: Any
    if credentials is not None:
        from minio.credentials import StaticProvider

        provider = StaticProvider(
            credentials.access_key, credentials.secret_key, credentials.session_token
        )
    else:
        provider = _environment_credentials()
    return Minio(
        host,
        secure=secure,
        region=region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        http_client=http,
        credentials=provider,
    )


def endpoint_name(endpoint: str | None = None) -> str:
    """The endpoint as messages name it: its URL, or "AWS S3"."""
    return endpoint_url(endpoint) or "AWS S3"


def part_size(length: int) -> int:
    """Multipart part size for an object of `length` bytes (at most _MAX_PARTS parts)."""
    needed = -(-length // _MAX_PARTS)
    return max(MULTIPART_PART_SIZE, -(-needed // 2**20) * 2**20)


# -- what went wrong, in words (never credentials) --------------------------------------------
def error_code(error: BaseException) -> str | None:
    """The S3 error code of a minio error (NoSuchKey, AccessDenied, PreconditionFailed, ...)."""
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(error, S3Error):
        return error.code
    if isinstance(error, ServerError):
        return f"HTTP {error.status_code}"
    if isinstance(error, InvalidResponseError):  # its text holds the whole body: not that
        return f"HTTP {getattr(error, '_code', '?')} (not an S3 answer)"
    return None


def describe(error: BaseException) -> str:
    """One short line for a failed request: the S3 code, or the connection failure's kind
    and reason (urllib3's text without object addresses or request paths)."""
    import urllib3

    code = error_code(error)
    if code:
        return code
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, MissingCredentialsError):
        return str(error)
    text = str(error)
    if text.startswith("<") and ">: " in text:  # "<HTTPConnection(...) at 0x...>: reason"
        text = text.split(">: ", 1)[1]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_unreachable(error: BaseException) -> bool:
    """Whether `error` says the endpoint did not answer (refused, reset, timed out)."""
    import urllib3

    if isinstance(error, urllib3.exceptions.MaxRetryError):
        return True
    return isinstance(
        error,
        urllib3.exceptions.NewConnectionError
        | urllib3.exceptions.TimeoutError
        | urllib3.exceptions.ProtocolError
        | ConnectionError,
    )


def request_errors() -> tuple[type[BaseException], ...]:
    """What a minio request raises when it fails: S3 answers, transport errors, missing
    credentials or a name minio refuses (ValueError)."""
    import urllib3
    from minio.error import MinioException

    return (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


def cache_root() -> Path:
    """$SELFAUGMENT_CACHE, or ~/.cache/selfaugment: downloaded inputs and S3 runs' work files."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "selfaugment"
