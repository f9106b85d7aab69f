"""StigmergyService over gRPC: converts protos to field calls and back, checks
depositors' signatures against the keys they registered, and runs the tick and
the snapshots in the background.

Durability: the field is soft state by nature (it decays to nothing without
fresh deposits). It is saved to DATA_DIR/field.npz every
STIGMERGY_SNAPSHOT_INTERVAL_S and on a graceful shutdown, and loaded at start
with the decay of the ticks missed while the service was down (diffusion is not
replayed). After kill -9, deposits since the last snapshot are lost; agents
that keep depositing restore the trails they use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from agent2028.stigmergy.v1 import stigmergy_pb2, stigmergy_pb2_grpc
from clients.registry import RegistryClient, public_key_fetch
from services.common import signing
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument
from services.common.registered_keys import RegisteredKeys
from services.common.timeutil import from_duration, timestamp_ns, to_duration
from services.common.validation import optional_id, require_id
from services.stigmergy.config import StigmergyConfig
from services.stigmergy.core import (
    Aggregation,
    PheromoneField,
    SenseResult,
    load_snapshot,
    save_snapshot,
)

log = logging.getLogger(__name__)

DEPOSITS = Counter("agent2028_stigmergy_deposits_total", "Deposits applied.")
TICK_SECONDS = Histogram(
    "agent2028_stigmergy_tick_seconds",
    "Time spent computing one tick of every active layer.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
FIELD_TOTAL = Gauge(
    "agent2028_stigmergy_field_total", "Total intensity per pheromone type.", ["type"]
)

# Grids smaller than this tick inline: a thread hop costs more than the arithmetic.
THREAD_TICK_CELLS = 250_000
DEFAULT_WATCH_CELLS = 64


def _aggregation(value: int) -> Aggregation:
    if value == stigmergy_pb2.AGGREGATION_UNSPECIFIED:
        return Aggregation.MEAN
    try:
        return Aggregation(value)
    except ValueError:
        raise InvalidArgument(
            f"aggregation has no value {value}", field="aggregation", reason="UNKNOWN_ENUM_VALUE"
        ) from None


def view_to_proto(name: str, view: SenseResult, tick: int) -> stigmergy_pb2.FieldView:
    return stigmergy_pb2.FieldView(
        pheromone_type=name,
        region=stigmergy_pb2.Region(
            x_min=view.x_min, y_min=view.y_min, x_max=view.x_max, y_max=view.y_max
        ),
        columns=view.columns,
        rows=view.rows,
        values=view.values.ravel().tolist(),
        maximum=view.maximum,
        total=view.total,
        tick=tick,
    )


class StigmergyServicer(stigmergy_pb2_grpc.StigmergyServiceServicer):
    def __init__(self, app: StigmergyApp) -> None:
        self.app = app
        self.field = app.field

    @property
    def keys(self) -> RegisteredKeys:
        assert self.app.keys is not None, "the stigmergy service is not started"
        return self.app.keys

    async def Deposit(
        self, request: stigmergy_pb2.DepositRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.DepositResponse:
        require_id(request.agent_id, "agent_id")
        optional_id(request.request_id, "request_id")
        self.field.check_deposit(request.x, request.y, request.pheromone_type, request.amount)
        if not request.HasField("issue_time"):
            raise InvalidArgument(
                "issue_time is required", field="issue_time", reason="EMPTY_FIELD"
            )
        issue_ns = timestamp_ns(request.issue_time)
        self.field.check_issue_time(issue_ns)
        await self.keys.verify(
            request.agent_id,
            request.signature,
            signing.deposit(
                request.agent_id,
                request.x,
                request.y,
                request.pheromone_type,
                request.amount,
                issue_ns,
                request.request_id,
            ),
        )
        result = self.field.deposit(
            request.agent_id,
            request.x,
            request.y,
            request.pheromone_type,
            request.amount,
            issue_ns=issue_ns,
            replay_key=request.request_id.encode() if request.request_id else request.signature,
        )
        if not result.duplicate:
            DEPOSITS.inc()
        return stigmergy_pb2.DepositResponse(
            intensity=result.intensity, duplicate=result.duplicate, capped=result.capped
        )

    async def Read(
        self, request: stigmergy_pb2.ReadRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.ReadResponse:
        return stigmergy_pb2.ReadResponse(
            intensity=self.field.read(request.x, request.y, request.pheromone_type)
        )

    async def Gradient(
        self, request: stigmergy_pb2.GradientRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.GradientResponse:
        result = self.field.gradient(request.x, request.y, request.pheromone_type, request.radius)
        return stigmergy_pb2.GradientResponse(
            dx=result.dx, dy=result.dy, magnitude=result.magnitude, flat=result.flat
        )

    async def FindNearest(
        self, request: stigmergy_pb2.FindNearestRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.FindNearestResponse:
        result = self.field.find_nearest(
            request.x, request.y, request.pheromone_type, request.radius, request.min_intensity
        )
        return stigmergy_pb2.FindNearestResponse(
            found=result.found,
            x=result.x,
            y=result.y,
            intensity=result.intensity,
            distance=result.distance,
        )

    def _sense(
        self,
        name: str,
        region: stigmergy_pb2.Region,
        columns: int,
        rows: int,
        aggregation: int,
    ) -> stigmergy_pb2.FieldView:
        view = self.field.sense(
            name,
            x_min=region.x_min,
            y_min=region.y_min,
            x_max=region.x_max,
            y_max=region.y_max,
            columns=columns,
            rows=rows,
            aggregation=_aggregation(aggregation),
        )
        return view_to_proto(name, view, self.field.ticks)

    async def Sense(
        self, request: stigmergy_pb2.SenseRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.SenseResponse:
        return stigmergy_pb2.SenseResponse(
            view=self._sense(
                request.pheromone_type,
                request.region,
                request.columns,
                request.rows,
                request.aggregation,
            )
        )

    async def GetField(
        self, request: stigmergy_pb2.GetFieldRequest, context: grpc.aio.ServicerContext
    ) -> stigmergy_pb2.GetFieldResponse:
        s = self.field.settings
        return stigmergy_pb2.GetFieldResponse(
            width=s.width,
            height=s.height,
            types_declared=self.field.declared,
            layers=[
                stigmergy_pb2.Layer(
                    pheromone_type=info.name,
                    total=info.total,
                    maximum=info.maximum,
                    active=info.active,
                )
                for info in self.field.info()
            ],
            decay_rate=s.decay_rate,
            diffusion_rate=s.diffusion_rate,
            tick_interval=to_duration(self.app.config.tick_interval_s),
            ticks=self.field.ticks,
            max_intensity=s.max_intensity,
            default_sense_radius=s.default_sense_radius,
            deposits=self.field.deposits,
            last_tick_duration=to_duration(self.field.last_tick_seconds),
        )

    async def WatchField(
        self, request: stigmergy_pb2.WatchFieldRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stigmergy_pb2.WatchFieldResponse]:
        interval = from_duration(request.min_interval) if request.HasField("min_interval") else 0.0
        if not math.isfinite(interval) or interval < 0:
            raise InvalidArgument(
                "min_interval must not be negative", field="min_interval", reason="OUT_OF_RANGE"
            )
        interval = max(interval or self.app.config.tick_interval_s or 1.0, 0.05)
        columns = request.columns or DEFAULT_WATCH_CELLS
        rows = request.rows or DEFAULT_WATCH_CELLS
        # Validates everything before the first frame.
        view = self._sense(
            request.pheromone_type, request.region, columns, rows, request.aggregation
        )
        sent_version = self.field.version
        yield stigmergy_pb2.WatchFieldResponse(view=view)
        while True:
            await asyncio.sleep(interval)
            if self.field.version == sent_version:
                continue
            sent_version = self.field.version
            view = self._sense(
                request.pheromone_type, request.region, columns, rows, request.aggregation
            )
            yield stigmergy_pb2.WatchFieldResponse(view=view)


class StigmergyApp(ServiceApp):
    label = "stigmergy"

    def __init__(self, config: StigmergyConfig, data_dir: str) -> None:
        super().__init__()
        self.config = config
        self.data_dir = data_dir
        self.snapshot_path = os.path.join(data_dir, "field.npz")
        self.field = PheromoneField(config.settings)
        self.keys: RegisteredKeys | None = None
        self.registry: RegistryClient | None = None
        self.servicer = StigmergyServicer(self)
        self._ticker: asyncio.Task[None] | None = None
        self._last_snapshot = time.monotonic()
        self._snapshot_version = -1

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, stigmergy_pb2.DESCRIPTOR.services_by_name["StigmergyService"])]

    async def start(self) -> None:
        loaded = await asyncio.to_thread(load_snapshot, self.snapshot_path)
        if loaded is not None:
            layers, meta = loaded
            if (meta.get("width"), meta.get("height")) != (
                self.config.settings.width,
                self.config.settings.height,
            ):
                log.warning(
                    "snapshot %s is for a %sx%s grid, not %dx%d; starting empty",
                    self.snapshot_path,
                    meta.get("width"),
                    meta.get("height"),
                    self.config.settings.width,
                    self.config.settings.height,
                )
            else:
                missed = 0
                saved_wall = meta.get("wall")
                if self.config.tick_interval_s > 0 and isinstance(saved_wall, int | float):
                    missed = max(int((time.time() - saved_wall) / self.config.tick_interval_s), 0)
                skipped = self.field.restore(layers, meta, decay_ticks=missed)
                for name in skipped:
                    log.warning("snapshot layer %r does not fit this field; dropped", name)
                log.info(
                    "field restored from %s (%d layers, %d missed ticks of decay applied)",
                    self.snapshot_path,
                    len(layers) - len(skipped),
                    missed,
                )
        self._snapshot_version = self.field.version
        self.registry = RegistryClient(self.config.registry_addr, timeout_s=2.0)
        self.keys = RegisteredKeys(
            public_key_fetch(self.registry), ttl_s=self.config.key_cache_ttl_s
        )
        self._ticker = asyncio.create_task(self._tick_loop(), name="stigmergy-ticker")

    async def _tick_once(self) -> None:
        job = self.field.begin_tick()
        if job is None:
            return
        s = self.config.settings
        if s.width * s.height < THREAD_TICK_CELLS:
            job.run()
        else:
            running = asyncio.ensure_future(asyncio.to_thread(job.run))
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                # The thread cannot be stopped midway: let it finish, then swap,
                # so the layers stay whole for the final snapshot.
                await running
                self.field.finish_tick(job)
                raise
        self.field.finish_tick(job)
        TICK_SECONDS.observe(job.seconds)

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.tick_interval_s
        next_at = loop.time() + (interval or 1.0)
        while True:
            await asyncio.sleep(max(next_at - loop.time(), 0.0))
            now = loop.time()
            next_at = max(next_at + (interval or 1.0), now)
            try:
                if interval > 0:
                    await self._tick_once()
                for info in self.field.info():
                    FIELD_TOTAL.labels(info.name).set(info.total)
                if (
                    self.config.snapshot_interval_s > 0
                    and time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s
                ):
                    await self._snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stigmergy tick failed")

    async def _snapshot(self) -> None:
        self._last_snapshot = time.monotonic()
        if self.field.version == self._snapshot_version:
            return
        version = self.field.version
        layers = self.field.export()
        meta = self.field.snapshot_meta()
        await asyncio.to_thread(save_snapshot, self.snapshot_path, layers, meta)
        self._snapshot_version = version

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        try:
            await self._snapshot()
            log.info("field saved to %s", self.snapshot_path)
        except Exception:
            log.exception("could not save the field to %s", self.snapshot_path)
        if self.registry is not None:
            await self.registry.close()


async def build(server_config: ServerConfig) -> StigmergyApp:
    return StigmergyApp(StigmergyConfig.from_env(), server_config.data_dir)
