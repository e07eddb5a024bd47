"""Every write of the operator goes through here: fenced by the Lease, conditional, remembered.

Three things make writes safe.

- **Fencing.** A replica writes only while it may still act as the leader, and every write —
  status patches, creates, deletes, Events — carries a client timeout no longer than the time
  left before :meth:`ipvs_operator.leader.LeaderElector.leading` turns false
  (:func:`ipvs_operator.lease.write_timeout`). So a write that the API server is slow to answer
  is cut off by then, and with too little time left none is sent (:class:`NotLeading`).
- **Conditional status patches.** A status patch carries the ``metadata.resourceVersion`` its
  status was computed from, so a status someone else changed meanwhile gives 409 Conflict
  instead of being overwritten; the reconcile is retried on fresh state.
- **Remembered writes.** The statuses this replica wrote are remembered until kopf's indexes
  show them, so a reconcile that runs before the watch event of its own write still sees the
  new status — otherwise it would compute the same transition twice (moving
  ``lastTransitionTime`` and repeating Events) — and patches on top of the version it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ipvs_operator import kube, lease
from ipvs_operator.events import EventPoster
from ipvs_operator.workqueue import Key

#: No write is started with less leadership left than this (seconds).
WRITE_FLOOR: Final = 0.5


class NotLeading(RuntimeError):
    """Raised instead of writing once this replica may no longer hold the Lease."""


def meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that turns status ``old`` into ``new`` (removed fields set to null)."""
    return {"status": _merge_patch(old, new)}


def _merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merges objects key by key at every depth, so a field removed inside an object
    that stays (``realServers.unhealthy`` once every real server is back) must be set to null
    there too; lists are replaced whole."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = _merge_patch(before, value)
        else:
            patch[key] = value
    return patch


def always_leading() -> float:
    """Leadership time left without leader election: unlimited."""
    return math.inf


@dataclass(frozen=True)
class _Written:
    """A status this replica wrote, until the index shows it."""

    uid: str
    #: resourceVersions the index may still show that do not include this write.
    before: frozenset[str]
    status: dict[str, Any]
    #: The resourceVersion the write produced: the next patch is conditional on it.
    version: str


class Writer:
    def __init__(
        self,
        client: kube.Kube,
        poster: EventPoster,
        time_left: Callable[[], float] = always_leading,
    ) -> None:
        self._kube = client
        self._poster = poster
        self._time_left = time_left
        self._written: dict[Key, _Written] = {}

    def timeout(self) -> float:
        """The client timeout for a write started now; :class:`NotLeading` if none may be."""
        found = lease.write_timeout(self._time_left(), cap=self._kube.timeout, floor=WRITE_FLOOR)
        if found is None:
            raise NotLeading
        return found

    def _pending(self, key: Key, body: Mapping[str, Any] | None) -> _Written | None:
        """Our write to ``key`` that the index does not show yet, if any."""
        written = self._written.get(key)
        if written is None:
            return None
        m = meta(body or {})
        if written.uid != str(m.get("uid") or "") or (
            str(m.get("resourceVersion") or "") not in written.before
        ):
            # Another object of that name, or the index moved past the version the write was
            # conditional on — so it shows the write (or something newer): the truth again.
            del self._written[key]
            return None
        return written

    def current(self, key: Key, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """The object's status as it is now, ours if the index has not caught up yet."""
        pending = self._pending(key, body)
        if pending is not None:
            return dict(pending.status)
        return dict((body or {}).get("status") or {})

    def forget(self, key: Key) -> None:
        self._written.pop(key, None)

    async def patch_status(
        self,
        key: Key,
        body: Mapping[str, Any],
        path: str,
        patch: dict[str, Any],
        new: dict[str, Any],
    ) -> None:
        """Apply ``patch`` to the status subresource at ``path``; ``new`` is the result.

        Conditional on the resourceVersion the status was read at: a conflict (409) raises
        :class:`kube.ApiError` and the caller retries on fresh state.
        """
        timeout = self.timeout()
        pending = self._pending(key, body)
        read = str(meta(body).get("resourceVersion") or "")
        based_on = pending.version if pending is not None else read
        if based_on:
            patch = {**patch, "metadata": {"resourceVersion": based_on}}
        try:
            result = await self._kube.request(
                "PATCH", path, patch, content_type=kube.MERGE_PATCH, timeout=timeout
            )
        except kube.ApiError as exc:
            if exc.status == 404:
                return  # deleted meanwhile; its DELETED event reconciles again
            if exc.status == 409:
                self._written.pop(key, None)
            raise
        before = (pending.before | {pending.version}) if pending is not None else frozenset({read})
        self._written[key] = _Written(
            uid=str(meta(body).get("uid") or ""),
            before=before,
            status=new,
            version=str(meta(result).get("resourceVersion") or ""),
        )

    async def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = kube.JSON
    ) -> dict[str, Any]:
        return await self._kube.request(
            method, path, body, content_type=content_type, timeout=self.timeout()
        )

    async def post(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await self._poster.post(obj, type_, reason, message, timeout=self.timeout())
