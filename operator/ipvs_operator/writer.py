"""Every write of the operator goes through here: checked for leadership, and remembered.

Two things make writes safe. A replica that may have lost the Lease refuses to write
(:class:`NotLeading`). And the statuses this replica wrote are remembered until kopf's indexes
show them, so a reconcile that runs before the watch event of its own write still sees the
new status — otherwise it would compute the same transition twice (moving
``lastTransitionTime`` and repeating Events). Only the operator writes these statuses, so once
an index shows the remembered status it is the truth again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ipvs_operator import kube
from ipvs_operator.events import EventPoster
from ipvs_operator.workqueue import Key


class NotLeading(RuntimeError):
    """Raised instead of writing once this replica may no longer hold the Lease."""


def meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that turns status ``old`` into ``new`` (removed fields set to null)."""
    return {"status": {**{k: None for k in old if k not in new}, **new}}


class Writer:
    def __init__(self, client: kube.Kube, poster: EventPoster, leading: Callable[[], bool]) -> None:
        self._kube = client
        self._poster = poster
        self._leading = leading
        #: (uid, status) this replica wrote, by object, until the indexes show it.
        self._written: dict[Key, tuple[str, dict[str, Any]]] = {}

    def check_leading(self) -> None:
        if not self._leading():
            raise NotLeading

    def current(self, key: Key, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """The object's status as it is now, ours if the index has not caught up yet."""
        server = dict((body or {}).get("status") or {})
        written = self._written.get(key)
        uid = str(meta(body or {}).get("uid") or "")
        if written is None or written[0] != uid:
            self._written.pop(key, None)
            return server
        if server == written[1]:
            del self._written[key]
            return server
        return dict(written[1])

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
        """Apply ``patch`` to the status subresource at ``path``; ``new`` is the result."""
        self.check_leading()
        try:
            await self._kube.request("PATCH", path, patch, content_type=kube.MERGE_PATCH)
        except kube.ApiError as exc:
            if exc.status == 404:
                return  # deleted meanwhile; its DELETED event reconciles again
            raise
        self._written[key] = (str(meta(body).get("uid") or ""), new)

    async def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = kube.JSON
    ) -> dict[str, Any]:
        self.check_leading()
        return await self._kube.request(method, path, body, content_type=content_type)

    async def post(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.check_leading()
        await self._poster.post(obj, type_, reason, message)
