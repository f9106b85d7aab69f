"""Tier health: one grpc.health.v1 Watch stream per service.

A Watch stream tells the orchestrator at once when a service starts
draining (NOT_SERVING) and, by breaking, when its process is gone
(UNREACHABLE); it reconnects by itself. Every change is recorded in the
core's HealthTable, which operations consult before they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import create_channel
from services.orchestrator.core import HealthTable, Serving

log = logging.getLogger(__name__)

_STATUSES = {
    health_pb2.HealthCheckResponse.SERVING: Serving.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: Serving.NOT_SERVING,
}

OnChange = Callable[[str, Serving, Serving, str], Awaitable[None]]


class HealthMonitor:
    def __init__(
        self,
        table: HealthTable,
        *,
        on_change: OnChange | None = None,
        retry_s: float = 0.5,
        check_timeout_s: float = 1.0,
    ) -> None:
        self.table = table
        self.on_change = on_change
        self.retry_s = retry_s
        self.check_timeout_s = check_timeout_s
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._known: dict[str, asyncio.Event] = {name: asyncio.Event() for name in table.services}

    def start(self) -> None:
        for name, health in self.table.services.items():
            channel = create_channel(health.address, retries=False)
            self._channels[name] = channel
            self._tasks.append(
                asyncio.create_task(self._watch(name, channel), name=f"health-{name}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self._channels.values():
            await channel.close()

    async def wait_known(self, names: tuple[str, ...], timeout_s: float) -> None:
        """Waits (at most ``timeout_s``) until each service has been heard of
        once, so the first operations after a start are not refused for an
        UNKNOWN status."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                for name in names:
                    await self._known[name].wait()

    async def _set(self, name: str, status: Serving, detail: str = "") -> None:
        previous = self.table.services[name].status
        changed = self.table.set(name, status, detail)
        self._known[name].set()
        if changed:
            log.info("%s is %s%s", name, status.name, f" ({detail})" if detail else "")
            if self.on_change is not None:
                try:
                    await self.on_change(name, previous, status, detail)
                except Exception:
                    log.exception("health change hook failed for %s", name)

    async def _watch(self, name: str, channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            started = time.monotonic()
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                async for response in call:
                    status = _STATUSES.get(response.status, Serving.NOT_SERVING)
                    await self._set(name, status)
                    if status is not Serving.SERVING:
                        # A draining server waits for its open calls: let go
                        # of this one, and check by polling until it serves again.
                        break
                else:
                    await self._set(name, Serving.UNREACHABLE, "the health stream ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    await self._set(
                        name, Serving.UNREACHABLE, f"{exc.code().name}: {exc.details()}"
                    )
            finally:
                call.cancel()
            await self._poll_until_serving(name, stub, started)

    async def _poll_until_serving(
        self, name: str, stub: health_pb2_grpc.HealthStub, started: float
    ) -> None:
        """Checks every ``retry_s`` until the service serves (then the caller
        watches again). A stream that lived a while is reopened at once."""
        if time.monotonic() - started >= self.retry_s and self.table.services[name].status is (
            Serving.SERVING
        ):
            return
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                await self._set(name, Serving.UNREACHABLE, f"{exc.code().name}: {exc.details()}")
                continue
            status = _STATUSES.get(response.status, Serving.NOT_SERVING)
            await self._set(name, status)
            if status is Serving.SERVING:
                return
