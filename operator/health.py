"""What /livez and /healthz report: whether the operator can do its work, not only that its HTTP
thread answers.

- `kubernetes`: the periodic resync listed the resources within `grace` seconds (the API
  server answers, with the operator's credentials and rights).
- `watch`: every version of a resource that a listing showed was also delivered by kopf's
  watch within `grace` seconds. A watch that silently stopped delivering (a half-open
  connection, a stuck stream) leaves versions undelivered; restarting the operator fixes it.
- `store`: the operator's default S3 endpoint (SELFAUGMENT_S3_ENDPOINT) accepted a connection
  at the last probe. A search's own endpoint is that search's StorageReady condition, not the
  operator's health.
- `leader`: information only (which replica reconciles); a standby is healthy.

/livez (the liveness probe) fails on `kubernetes` or `watch`, which a restart can fix; /healthz
(the readiness probe) fails on any check, the store included, which a restart cannot fix.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

#: (plural, namespace, name) of a watched resource.
Key = tuple[str, str, str]
#: Versions kept per resource as delivered by the watch (a listing may lag behind the watch).
_DELIVERED_KEPT = 16


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def probe_endpoint(url: str, timeout: float = 5.0) -> Check:
    """Whether the S3 endpoint `url` accepts a TCP connection (any S3 library would need that)."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return Check(False, f"store endpoint {url}: no host in the URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Check(True, f"store endpoint {url} accepts connections")
    except OSError as error:
        return Check(False, f"store endpoint {url} is unreachable: {error}")


class Health:
    """Thread-safe record of the checks, fed by the watch handlers and the resync loop."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.clock = clock
        self.started = clock()
        self.listed_at: float | None = None
        self.list_error: str | None = None
        self.store = Check(True, "no default store endpoint (each run names its own)")
        self.leader: dict[str, Any] = {"leading": False, "holder": None}
        self._delivered: dict[Key, list[str]] = {}
        self._pending: dict[Key, dict[str, float]] = {}  # listed, not delivered: since when
        self._lock = threading.Lock()

    # -- inputs --------------------------------------------------------------------------------

    def delivered(self, key: Key, version: str | None, deleted: bool = False) -> None:
        """The watch delivered `version` of `key` (or its deletion)."""
        with self._lock:
            if deleted:
                self._delivered.pop(key, None)
                self._pending.pop(key, None)
                return
            if version is None:
                return
            kept = self._delivered.setdefault(key, [])
            kept.append(version)
            del kept[:-_DELIVERED_KEPT]
            self._pending.get(key, {}).pop(version, None)

    def listed(self, plural: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A listing of `plural` succeeded; its versions the watch has not delivered wait."""
        now = self.clock()
        with self._lock:
            self.listed_at, self.list_error = now, None
            seen = set()
            for item in items:
                meta = item.get("metadata") or {}
                key = (plural, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
                seen.add(key)
                version = meta.get("resourceVersion")
                if version is None or version in self._delivered.get(key, ()):
                    continue
                self._pending.setdefault(key, {}).setdefault(str(version), now)
            for key in [k for k in self._pending if k[0] == plural and k not in seen]:
                del self._pending[key]  # gone since: its deletion is the watch's to deliver

    def list_failed(self, error: str) -> None:
        with self._lock:
            self.list_error = error

    # -- the checks ----------------------------------------------------------------------------

    def kubernetes(self) -> Check:
        now = self.clock()
        since = self.listed_at if self.listed_at is not None else self.started
        if now - since <= self.grace:
            detail = "listed resources" if self.listed_at is not None else "starting"
            return Check(True, detail)
        return Check(
            False,
            f"no successful listing for {now - since:.0f} s (last error: {self.list_error})",
        )

    def watch(self) -> Check:
        now = self.clock()
        with self._lock:
            late = sorted(
                (since, key)
                for key, versions in self._pending.items()
                for since in versions.values()
                if now - since > self.grace
            )
        if not late:
            return Check(True, "the watch delivers every change")
        since, (plural, namespace, name) = late[0]
        return Check(
            False,
            f"the watch has not delivered a change of {plural} {namespace}/{name} listed "
            f"{now - since:.0f} s ago ({len(late)} changes late)",
        )

    def report(self) -> dict[str, Any]:
        """The checks and whether each probe passes, as /livez and /healthz serve them."""
        kubernetes, watch, store = self.kubernetes(), self.watch(), self.store
        live = kubernetes.ok and watch.ok
        return {
            "live": live,
            "healthy": live and store.ok,
            "checks": {
                "kubernetes": kubernetes.as_dict(),
                "watch": watch.as_dict(),
                "store": store.as_dict(),
            },
            "leader": dict(self.leader),
        }
