"""Leader election with a coordination.k8s.io Lease: only one replica allocates.

Two replicas run; the one holding the Lease runs the kopf operator, the other waits. A leader
that cannot renew within ``renew_deadline`` stops acting (:meth:`LeaderElector.leading` turns
false before the Lease can expire for others) and exits, to start again as a standby. On a
clean shutdown it releases the Lease so the standby takes over at once instead of after
``duration``. The rules themselves are in :mod:`ipvs_operator.lease`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipvs_operator import kube, lease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    def __init__(
        self,
        client: kube.Kube,
        settings: LeaseSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = client
        self.settings = settings
        self._clock = clock
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None

    @property
    def _path(self) -> str:
        return kube.lease_path(self.settings.namespace, self.settings.name)

    def leading(self) -> bool:
        """True while the last successful renewal is recent enough to be sure of the Lease."""
        return self.time_left() > 0

    def time_left(self) -> float:
        """Seconds until :meth:`leading` turns false unless the Lease is renewed meanwhile."""
        return lease.time_left(self._renewed_at, self._clock(), self.settings.renew_deadline)

    def _observe(self, spec: dict[str, Any]) -> None:
        if spec != self._observed:
            self._observed = spec
            self._observed_at = self._clock()

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        me, duration = self.settings.identity, round(self.settings.duration)
        now_text = lease.micro_time()
        current = await self._kube.get(self._path)
        if current is None:
            spec = lease.claimed({}, me, duration, now_text)
            body = lease.lease(self.settings.namespace, self.settings.name, spec)
            try:
                await self._kube.request("POST", kube.lease_path(self.settings.namespace), body)
            except kube.ApiError as exc:
                if exc.status == 409:
                    return False
                raise
            self._renewed(body["spec"])
            return True
        spec = dict(current.get("spec") or {})
        self._observe(spec)
        if not lease.may_take(spec, me, self._observed_at, self._clock()):
            return False
        new = lease.claimed(spec, me, duration, now_text)
        body = {**current, "spec": new}
        try:
            await self._kube.request("PUT", self._path, body)
        except kube.ApiError as exc:
            if exc.status in (404, 409):
                return False
            raise
        if lease.holder(spec) != me:
            log.info("took the Lease %s from %r", self._path, lease.holder(spec) or "nobody")
        self._renewed(new)
        return True

    def _renewed(self, spec: dict[str, Any]) -> None:
        now = self._clock()
        self._observed, self._observed_at, self._renewed_at = spec, now, now

    async def _attempt(self) -> bool:
        try:
            return await asyncio.wait_for(
                self.try_acquire_or_renew(), timeout=self.settings.renew_deadline
            )
        except (kube.ApiError, OSError, TimeoutError) as exc:
            log.warning("Lease %s: %s", self._path, exc)
            return False

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        log.info("waiting for the Lease %s as %s", self._path, self.settings.identity)
        while not await self._attempt():
            await asyncio.sleep(self.settings.retry_period * random.uniform(1.0, 1.2))
        log.info("became the leader (Lease %s)", self._path)

    async def hold(self) -> None:
        """Renew every ``retry_period``; return once the Lease is lost."""
        while True:
            await asyncio.sleep(self.settings.retry_period)
            if await self._attempt():
                continue
            if not self.leading():
                log.error("lost the Lease %s", self._path)
                return

    async def release(self) -> None:
        """Step down so a standby need not wait for the Lease to expire."""
        if not self.leading():
            return
        self._renewed_at = None
        try:
            current = await self._kube.get(self._path)
            if current is None or lease.holder(current.get("spec") or {}) != self.settings.identity:
                return
            spec = lease.released(current.get("spec") or {}, lease.micro_time())
            await self._kube.request("PUT", self._path, {**current, "spec": spec})
            log.info("released the Lease %s", self._path)
        except (kube.ApiError, OSError, TimeoutError) as exc:
            log.warning("could not release the Lease %s: %s", self._path, exc)
