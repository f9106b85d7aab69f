"""RegistryService over gRPC: converts protos to core calls and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

from agent2028.common.v1 import common_pb2
from agent2028.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.rpc import read_request
from services.common.timeutil import (
    from_duration,
    timestamp_from_ns,
    timestamp_ns,
    to_duration,
    to_timestamp,
)
from services.common.validation import optional_id, page_size, require_capability
from services.registry.config import RegistryConfig
from services.registry.core import AgentRecord, Event, Order, RegistryCore, Status

log = logging.getLogger(__name__)

AGENTS = Gauge("agent2028_registry_agents", "Registered agents by health status.", ["status"])
EVENTS = Counter("agent2028_registry_events_total", "Registry watch events by type.", ["type"])

WATCH_BATCH_EVENTS = 256


def _card(record: AgentRecord) -> tuple[registry_pb2.AgentCard, Any]:
    """The card and registration time in wire form, built once per card."""
    cached = record.card_cache
    if cached is None:
        cached = record.card_cache = (
            registry_pb2.AgentCard(
                agent_id=record.agent_id,
                address=record.address,
                capabilities=record.capabilities,
                max_concurrency=record.max_concurrency,
                metadata=record.metadata,
                public_key=record.public_key,
            ),
            to_timestamp(record.register_wall),
        )
    return cached


def agent_to_proto(record: AgentRecord) -> registry_pb2.Agent:
    card, register_time = _card(record)
    return registry_pb2.Agent(
        card=card,
        status=record.status,
        health=record.health,
        latency_ms=record.latency_ms,
        reported_latency_ms=record.reported_latency_ms,
        reliability=record.reliability,
        load=record.load,
        fitness=record.fitness,
        outcomes_observed=record.outcomes,
        lease_id=record.lease_id,
        register_time=register_time,
        last_heartbeat_time=to_timestamp(record.last_heartbeat_wall),
        status_change_time=to_timestamp(record.status_change_wall),
        create_index=record.create_index,
        modify_index=record.modify_index,
    )


def event_to_proto(event: Event) -> registry_pb2.WatchEvent:
    return registry_pb2.WatchEvent(
        index=event.index,
        type=int(event.type),
        agent=agent_to_proto(event.agent),
        previous_status=int(event.previous_status)
        if event.previous_status
        else common_pb2.HEALTH_STATUS_UNSPECIFIED,
        event_time=to_timestamp(event.wall),
    )


def _status(value: int, field: str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} has no health status {value}", field=field, reason="UNKNOWN_ENUM_VALUE"
        ) from None


def _order(value: int) -> Order:
    if value == registry_pb2.ORDER_UNSPECIFIED:
        return Order.FITNESS
    try:
        return Order(value)
    except ValueError:
        raise InvalidArgument(
            f"order has no value {value}", field="order", reason="UNKNOWN_ENUM_VALUE"
        ) from None


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        core: RegistryCore,
        config: RegistryConfig,
        draining: asyncio.Event,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.core = core
        self.config = config
        self.draining = draining
        self._interval = to_duration(core.settings.heartbeat_interval_s)
        # Half the limit leaves room for the response's own framing.
        self.batch_bytes = max(max_message_bytes // 2, 64 * 1024)

    def _lease(self, record: AgentRecord) -> registry_pb2.Lease:
        return registry_pb2.Lease(
            lease_id=record.lease_id,
            ttl=to_duration(record.lease_ttl_s),
            heartbeat_interval=self._interval,
            expire_time=to_timestamp(record.last_heartbeat_wall + record.lease_ttl_s),
        )

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        if not request.HasField("card"):
            raise InvalidArgument("card is required", field="card", reason="EMPTY_FIELD")
        if not request.HasField("issue_time"):
            raise InvalidArgument(
                "issue_time is required", field="issue_time", reason="EMPTY_FIELD"
            )
        card = request.card
        record, refreshed = self.core.register(
            agent_id=card.agent_id,
            address=card.address,
            capabilities=list(card.capabilities),
            max_concurrency=card.max_concurrency,
            metadata=dict(card.metadata),
            public_key=card.public_key,
            issue_ns=timestamp_ns(request.issue_time),
            proof=request.proof_of_possession,
            lease_ttl_s=from_duration(request.lease_ttl) if request.HasField("lease_ttl") else 0.0,
        )
        log.info(
            "agent %s %s at %s",
            record.agent_id,
            "refreshed" if refreshed else "registered",
            record.address,
        )
        return registry_pb2.RegisterResponse(
            lease=self._lease(record), agent=agent_to_proto(record), refreshed=refreshed
        )

    async def Heartbeat(
        self,
        requests: AsyncIterator[registry_pb2.HeartbeatRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # Driven with read()/write() rather than as a generator: this is the
        # hottest stream of the cluster (see services.common.rpc).
        core = self.core
        agent_id = lease_id = None
        last_status = None
        while (request := await read_request(context)) is not None:
            if agent_id is None:
                if not request.HasField("send_time"):
                    raise InvalidArgument(
                        "send_time is required on the first heartbeat",
                        field="send_time",
                        reason="EMPTY_FIELD",
                    )
                core.open_heartbeat(
                    request.agent_id,
                    request.lease_id,
                    timestamp_ns(request.send_time),
                    request.signature,
                )
                agent_id, lease_id = request.agent_id, request.lease_id
            elif request.agent_id != agent_id or request.lease_id != lease_id:
                raise InvalidArgument(
                    "a heartbeat stream carries one agent's lease; open another stream for another",
                    field="agent_id",
                    reason="STREAM_IDENTITY_CHANGED",
                )
            record = core.heartbeat(
                agent_id,
                lease_id,
                load=request.load,
                health=request.health,
                latency_ms=request.observed_latency_ms,
            )
            if record.status is last_status:
                await context.write(
                    registry_pb2.HeartbeatResponse(sequence=request.sequence, status=record.status)
                )
                continue
            last_status = record.status
            expire_ns = int((record.last_heartbeat_wall + record.lease_ttl_s) * 1e9)
            await context.write(
                registry_pb2.HeartbeatResponse(
                    sequence=request.sequence,
                    status=record.status,
                    lease_expire_time=timestamp_from_ns(expire_ns),
                    heartbeat_interval=self._interval,
                )
            )

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        if not request.HasField("issue_time"):
            raise InvalidArgument(
                "issue_time is required", field="issue_time", reason="EMPTY_FIELD"
            )
        index = self.core.deregister(
            request.agent_id, timestamp_ns(request.issue_time), request.signature
        )
        log.info("agent %s deregistered", request.agent_id)
        return registry_pb2.DeregisterResponse(index=index)

    async def GetAgent(
        self, request: registry_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetAgentResponse:
        return registry_pb2.GetAgentResponse(agent=agent_to_proto(self.core.get(request.agent_id)))

    async def ListAgents(
        self, request: registry_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAgentsResponse:
        size = page_size(request.page_size)
        statuses = [_status(s, f"statuses[{i}]") for i, s in enumerate(request.statuses)]
        page, token, total = self.core.list_agents(
            page_size=size,
            page_token=request.page_token,
            capability=request.capability,
            statuses=statuses,
        )
        return registry_pb2.ListAgentsResponse(
            agents=[agent_to_proto(r) for r in page], next_page_token=token, total_size=total
        )

    async def FindByCapability(
        self, request: registry_pb2.FindByCapabilityRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.FindByCapabilityResponse:
        if request.top_k < 0:
            raise InvalidArgument(
                "top_k must not be negative", field="top_k", reason="OUT_OF_RANGE"
            )
        found, total = self.core.find_by_capability(
            request.capability,
            order=_order(request.order),
            top_k=request.top_k or 10,
            include_unhealthy=request.include_unhealthy,
            latency_weight=request.latency_weight if request.HasField("latency_weight") else None,
            reliability_weight=request.reliability_weight
            if request.HasField("reliability_weight")
            else None,
        )
        return registry_pb2.FindByCapabilityResponse(
            agents=[agent_to_proto(r) for r, _ in found],
            scores=[score for _, score in found],
            total_with_capability=total,
        )

    async def ReportOutcome(
        self, request: registry_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ReportOutcomeResponse:
        optional_id(request.request_id, "request_id")
        record = self.core.report_outcome(
            request.agent_id,
            success=request.success,
            latency_ms=request.latency_ms,
            request_id=request.request_id,
        )
        return registry_pb2.ReportOutcomeResponse(
            reliability=record.reliability, latency_ms=record.latency_ms, fitness=record.fitness
        )

    def _batches(
        self, events: list[registry_pb2.WatchEvent], *, always_one: bool = False
    ) -> Iterator[list[registry_pb2.WatchEvent]]:
        """Events cut into responses that stay well under the message size
        limit (a card can carry kilobytes of metadata), at most 256 each."""
        batch: list[registry_pb2.WatchEvent] = []
        size = 0
        for event in events:
            n = event.ByteSize() + 8
            if batch and (size + n > self.batch_bytes or len(batch) >= WATCH_BATCH_EVENTS):
                yield batch
                batch, size = [], 0
            batch.append(event)
            size += n
        if batch or always_one:
            yield batch

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        capability = request.capability
        if request.from_index < 0:
            raise InvalidArgument(
                "from_index must not be negative", field="from_index", reason="OUT_OF_RANGE"
            )
        if capability:
            require_capability(capability, "capability")
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=self.config.watch_queue)
        lagged: list[int] = []

        def on_event(event: Event) -> None:
            if capability and capability not in event.agent.capabilities:
                return
            if lagged:
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                lagged.append(event.index)

        # No await between subscribing and reading the snapshot or backlog, so
        # nothing falls between them and nothing is delivered twice.
        self.core.add_listener(on_event)
        try:
            if request.from_index == 0:
                records = self.core.snapshot(capability)
                current = self.core.index
                snapshot = [
                    registry_pb2.WatchEvent(
                        index=r.modify_index,
                        type=registry_pb2.EVENT_TYPE_REGISTERED,
                        agent=agent_to_proto(r),
                        event_time=to_timestamp(r.status_change_wall),
                    )
                    for r in records
                ]
                for batch in self._batches(snapshot, always_one=True):
                    yield registry_pb2.WatchResponse(events=batch, index=current, snapshot=True)
                last = current
            else:
                backlog = [
                    event_to_proto(e)
                    for e in self.core.events_since(request.from_index)
                    if not capability or capability in e.agent.capabilities
                ]
                last = request.from_index
                for batch in self._batches(backlog):
                    last = batch[-1].index
                    yield registry_pb2.WatchResponse(events=batch, index=last)
            while True:
                event = await queue.get()
                events = [event]
                while not queue.empty():
                    events.append(queue.get_nowait())
                for batch in self._batches([event_to_proto(e) for e in events]):
                    last = batch[-1].index
                    yield registry_pb2.WatchResponse(events=batch, index=last)
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        f"watcher fell behind at index {last}; watch again from {last}",
                        reason="WATCHER_LAGGED",
                        metadata={"resume_index": str(last)},
                    )
        finally:
            self.core.remove_listener(on_event)


class _RegistryCollector:
    """Prometheus collector for counters the core keeps as plain integers (a
    Counter takes a lock, which on every heartbeat costs more than the
    heartbeat). Exports the most recently started RegistryApp's counts."""

    app: RegistryApp | None = None

    def collect(self) -> Any:
        if self.app is not None:
            yield CounterMetricFamily(
                "agent2028_registry_heartbeats",
                "Heartbeats received.",
                value=self.app.core.heartbeats,
            )


COLLECTOR = _RegistryCollector()
REGISTRY.register(COLLECTOR)


class RegistryApp(ServiceApp):
    label = "registry"

    def __init__(self, config: RegistryConfig, *, max_message_bytes: int = 4 * 1024 * 1024) -> None:
        super().__init__()
        self.config = config
        self.core = RegistryCore(config.settings)
        self.servicer = RegistryServicer(
            self.core, config, self.draining, max_message_bytes=max_message_bytes
        )
        self._sweeper: asyncio.Task[None] | None = None
        self.core.add_listener(self._count_event)
        COLLECTOR.app = self

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, registry_pb2.DESCRIPTOR.services_by_name["RegistryService"])]

    def _count_event(self, event: Event) -> None:
        EVENTS.labels(event.type.name).inc()
        if event.type.name in ("EXPIRED", "HEALTH_CHANGED", "DEREGISTERED"):
            log.info(
                "agent %s %s (%s -> %s)",
                event.agent.agent_id,
                event.type.name.lower(),
                event.previous_status.name if event.previous_status else "-",
                event.agent.status.name,
            )

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="registry-sweeper")

    async def _sweep_loop(self) -> None:
        while True:
            try:
                self.core.sweep()
                for status, count in self.core.counts().items():
                    AGENTS.labels(status.name).set(count)
            except Exception:
                log.exception("registry sweep failed")
            await asyncio.sleep(self.config.sweep_interval_s)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


async def build(server_config: ServerConfig) -> RegistryApp:
    return RegistryApp(RegistryConfig.from_env(), max_message_bytes=server_config.max_message_bytes)
