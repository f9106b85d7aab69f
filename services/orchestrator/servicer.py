"""OrchestratorService over gRPC, and the app that wires the orchestrator
together: the event bus, the health monitor, the watch sources, the bridge
and the operation runner, with one SQLite database for what must survive a
restart (retained events and watch positions, finished operations, the
bridge's pools and settlements)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from agent2028.orchestrator.v1 import orchestrator_pb2_grpc
from clients.broker import BrokerClient
from clients.consensus import ConsensusClient
from clients.market import MarketClient
from clients.registry import RegistryClient
from clients.stigmergy import StigmergyClient
from clients.swarm import SwarmClient
from clients.trust import TrustClient
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.crypto import Identity
from services.common.errors import DomainError, InvalidArgument, NotFound
from services.common.storage import Database
from services.common.timeutil import require_duration, to_timestamp
from services.common.validation import decode_page_token, encode_page_token, page_size
from services.orchestrator import bridge as bridge_module
from services.orchestrator import bus as bus_module
from services.orchestrator.bridge import Bridge
from services.orchestrator.bus import Batch, EventBus
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.core import (
    OPERATIONS_SCHEMA,
    ROUTES,
    SERVICE_TIERS,
    STATUS_EVENTS,
    HealthTable,
    Kind,
    OperationStore,
    Serving,
    Status,
    check_request_id,
    kind_of,
    same_request,
)
from services.orchestrator.events import (
    CATALOG,
    RESERVED,
    Draft,
    Event,
    TypeFilter,
    validate_publish,
)
from services.orchestrator.health import HealthMonitor
from services.orchestrator.operations import Runner
from services.orchestrator.sources import Sources

log = logging.getLogger(__name__)

# How long a first operation waits for the health of a just-started
# orchestrator's peers to be known.
FIRST_HEALTH_WAIT_S = 2.0


def event_to_proto(e: Event) -> pb.Event:
    return pb.Event(
        cursor=e.cursor,
        type=e.type,
        source=e.source,
        subject=e.subject,
        event_time=to_timestamp(e.wall),
        attributes=dict(e.attributes),
        summary=e.summary,
    )


def batch_to_proto(b: Batch) -> pb.SubscribeResponse:
    message = pb.SubscribeResponse(
        events=[event_to_proto(e) for e in b.events], cursor=b.cursor, caught_up=b.caught_up
    )
    if b.lag is not None:
        message.lag.CopyFrom(pb.Lag(resume_cursor=b.lag[0], missed=b.lag[1]))
    return message


def fingerprint(request: pb.SubmitRequest) -> bytes:
    """What a request asks for, whatever its request_id and timeout."""
    copy = pb.SubmitRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    copy.ClearField("timeout")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


@dataclass
class Pending:
    kind: Kind
    fingerprint: bytes
    submit_wall: float
    task: asyncio.Task[pb.Operation]


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, app: OrchestratorApp) -> None:
        self.app = app

    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitResponse:
        operation, duplicate = await self.app.submit(request)
        return pb.SubmitResponse(operation=operation, duplicate=duplicate)

    async def GetOperation(
        self, request: pb.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetOperationResponse:
        return pb.GetOperationResponse(operation=await self.app.get_operation(request.request_id))

    async def ListOperations(
        self, request: pb.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOperationsResponse:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        before = position.get("before", 0)
        if not isinstance(before, int) or before < 0:
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        kind = None
        if request.kind:
            try:
                kind = Kind(request.kind)
            except ValueError:
                raise InvalidArgument(
                    f"kind has no value {request.kind}", field="kind", reason="UNKNOWN_ENUM_VALUE"
                ) from None
        rows = await self.app.operations.page(before=before, size=size + 1, kind=kind)
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListOperationsResponse(
            operations=[pb.Operation.FromString(r.payload) for r in rows],
            next_page_token=encode_page_token({"before": rows[-1].seq}) if more else "",
        )

    async def GetTopology(
        self, request: pb.GetTopologyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTopologyResponse:
        return self.app.topology()

    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:
        draft = validate_publish(
            Draft(
                type=request.type,
                source=request.source or "external",
                subject=request.subject,
                attributes=dict(request.attributes),
                summary=request.summary,
                request_id=request.request_id,
            )
        )
        event, duplicate = await self.app.bus.publish_one(draft)
        return pb.PublishResponse(event=event_to_proto(event), duplicate=duplicate)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeResponse]:
        wants = TypeFilter(list(request.types))
        subscription = self.app.bus.subscribe(
            wants, from_cursor=request.from_cursor, from_oldest=request.from_oldest
        )
        async for batch in self.app.bus.stream(subscription):
            yield batch_to_proto(batch)

    async def ListEventTypes(
        self, request: pb.ListEventTypesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEventTypesResponse:
        return pb.ListEventTypesResponse(
            types=[
                pb.EventTypeInfo(type=name, source=source, description=text)
                for name, (source, text) in CATALOG.items()
            ],
            reserved_namespaces=sorted(RESERVED),
        )


class _Collector:
    app: OrchestratorApp | None = None

    def collect(self) -> Any:
        app = self.app
        if app is None:
            return
        yield CounterMetricFamily(
            "agent2028_orchestrator_events_published",
            "Events committed on the bus.",
            value=app.bus.published,
        )
        yield CounterMetricFamily(
            "agent2028_orchestrator_subscriber_lags",
            "Times a subscriber fell behind.",
            value=app.bus.lags,
        )
        subscribers = GaugeMetricFamily("agent2028_orchestrator_subscribers", "Open subscriptions.")
        subscribers.add_metric([], app.bus.subscribers)
        yield subscribers
        running = GaugeMetricFamily("agent2028_orchestrator_operations_running", "In flight.")
        running.add_metric([], len(app.pending))
        yield running
        serving = GaugeMetricFamily(
            "agent2028_orchestrator_peer_serving", "1 while a peer is SERVING.", labels=["service"]
        )
        for name, health in app.health.services.items():
            serving.add_metric([name], 1.0 if health.status is Serving.SERVING else 0.0)
        yield serving


COLLECTOR = _Collector()
REGISTRY.register(COLLECTOR)


class OrchestratorApp(ServiceApp):
    label = "orchestrator"

    def __init__(self, config: OrchestratorConfig, data_dir: str) -> None:
        super().__init__()
        self.config = config
        self.data_dir = data_dir
        self.db = Database(
            os.path.join(data_dir, "orchestrator.db"),
            schema=[*bus_module.SCHEMA, *OPERATIONS_SCHEMA, *bridge_module.SCHEMA],
            synchronous=config.db_synchronous,
        )
        self.identity = Identity.load_or_create(
            config.orchestrator_id, config.key_file or os.path.join(data_dir, "orchestrator.key")
        )
        self.bus = EventBus(
            self.db, history=config.event_history, queue_size=config.subscriber_queue
        )
        self.operations = OperationStore(self.db, retention=config.operation_history)
        addresses = config.addresses
        timeout = config.call_timeout_s
        self.registry = RegistryClient(addresses["registry"], timeout_s=timeout)
        self.broker = BrokerClient(addresses["broker"], timeout_s=timeout)
        self.consensus = ConsensusClient(addresses["consensus"], timeout_s=timeout)
        self.trust = TrustClient(addresses["trust"], timeout_s=timeout)
        self.market = MarketClient(addresses["market"], timeout_s=timeout)
        self.stigmergy = StigmergyClient(addresses["stigmergy"], timeout_s=timeout)
        self.swarm = SwarmClient(addresses["swarm"], timeout_s=timeout)
        self.health = HealthTable(dict(addresses))
        self.monitor = HealthMonitor(
            self.health, on_change=self._health_changed, retry_s=config.retry_s
        )
        self.bridge = Bridge(
            self.bus,
            self.db,
            market=self.market,
            broker=self.broker,
            swarm=self.swarm,
            concurrency=config.bridge_concurrency,
            adopt_all_pools=config.adopt_all_pools,
            retry_s=config.retry_s,
            call_timeout_s=timeout,
        )
        self.sources = Sources(
            self.bus,
            self.bridge,
            registry=self.registry,
            trust=self.trust,
            consensus=self.consensus,
            market=self.market,
            swarm=self.swarm,
            stigmergy=self.stigmergy,
            names=config.sources,
            retry_s=config.retry_s,
            pool_poll_s=config.pool_poll_s,
            field_poll_s=config.field_poll_s,
            field_change=config.field_change,
        )
        self.runner = Runner(
            orchestrator_id=config.orchestrator_id,
            identity=self.identity,
            bus=self.bus,
            bridge=self.bridge,
            broker=self.broker,
            consensus=self.consensus,
            trust=self.trust,
            market=self.market,
            swarm=self.swarm,
            stigmergy=self.stigmergy,
            call_timeout_s=timeout,
        )
        self.pending: dict[str, Pending] = {}
        self.servicer = OrchestratorServicer(self)
        self.address = ""
        COLLECTOR.app = self

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, pb.DESCRIPTOR.services_by_name["OrchestratorService"])]

    async def start(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        await self.db.open()
        await self.bus.open()
        await self.bridge.start()
        self.monitor.start()
        self.sources.start()

    async def stop(self) -> None:
        for pending in list(self.pending.values()):
            pending.task.cancel()
        await self.sources.stop()
        await self.bridge.stop()
        await self.monitor.stop()
        await self.bus.close()
        await self.db.close()
        for client in (
            self.registry,
            self.broker,
            self.consensus,
            self.trust,
            self.market,
            self.stigmergy,
            self.swarm,
        ):
            await client.close()

    async def _health_changed(
        self, name: str, before: Serving, after: Serving, detail: str
    ) -> None:
        if after is Serving.SERVING and before is not Serving.UNKNOWN:
            event_type, summary = "tier.up", f"{name} is serving again"
        elif before is Serving.SERVING or (
            before is Serving.UNKNOWN and after is not Serving.SERVING
        ):
            event_type = "tier.down"
            summary = f"{name} is {after.name.lower().replace('_', ' ')}" + (
                f" ({detail})" if detail else ""
            )
        else:
            return
        await self.bus.publish_one(
            Draft(
                event_type,
                "orchestrator",
                name,
                {
                    "service": name,
                    "tier": SERVICE_TIERS[name].name.lower(),
                    "status": after.name,
                    "address": self.health.services[name].address,
                },
                summary,
            )
        )

    # --- operations ----------------------------------------------------------------------

    async def submit(self, request: pb.SubmitRequest) -> tuple[pb.Operation, bool]:
        kind = kind_of(request.WhichOneof("operation"))
        given = check_request_id(request.request_id)
        request_id = given or f"op-{uuid.uuid4().hex[:24]}"
        timeout_s = self.config.default_timeout_s
        if request.HasField("timeout"):
            timeout_s = require_duration(
                request.timeout, "timeout", lo=0.1, hi=self.config.max_timeout_s
            )
        print_ = fingerprint(request)
        pending = self.pending.get(request_id)
        if pending is not None:
            same_request(pending.fingerprint, print_, request_id)
            return await asyncio.shield(pending.task), True
        if given:  # an id the orchestrator just made cannot have run before
            stored = await self.operations.get(request_id)
            if stored is not None:
                same_request(stored.fingerprint, print_, request_id)
                return pb.Operation.FromString(stored.payload), True
        op = getattr(request, request.WhichOneof("operation"))
        self.runner.validate(kind, op, timeout_s)
        route = ROUTES[kind]
        await self.monitor.wait_known(route.services, FIRST_HEALTH_WAIT_S)
        # A retry may have started it while this one waited: join it. From
        # here to registering the task there is no await.
        pending = self.pending.get(request_id)
        if pending is not None:
            same_request(pending.fingerprint, print_, request_id)
            return await asyncio.shield(pending.task), True
        self.health.require(kind)
        submit_wall = time.time()
        # The operation runs in its own task: a caller that hangs up does not
        # cut it short, and a retry with the same request_id joins it.
        task = asyncio.create_task(
            self._run(kind, op, request_id, timeout_s, submit_wall, print_),
            name=f"operation-{request_id}",
        )
        self.pending[request_id] = Pending(kind, print_, submit_wall, task)
        task.add_done_callback(lambda t: self._finished(request_id, t))
        return await asyncio.shield(task), False

    def _finished(self, request_id: str, task: asyncio.Task[pb.Operation]) -> None:
        self.pending.pop(request_id, None)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, DomainError):
                log.error("operation %s failed unexpectedly", request_id, exc_info=exc)

    async def _run(
        self,
        kind: Kind,
        op: Any,
        request_id: str,
        timeout_s: float,
        submit_wall: float,
        print_: bytes,
    ) -> pb.Operation:
        try:
            result = await self.runner.run(kind, op, request_id, timeout_s)
        except DomainError as exc:
            with contextlib.suppress(Exception):
                await self.bus.publish_one(
                    Draft(
                        "operation.error",
                        "orchestrator",
                        request_id,
                        {
                            "kind": kind.name.lower(),
                            "code": exc.code,
                            "reason": exc.reason,
                            **(
                                {"service": exc.metadata["service"]}
                                if "service" in exc.metadata
                                else {}
                            ),
                        },
                        f"{kind.name.lower()} {request_id}: {exc.code} {exc.message}"[:1000],
                    )
                )
            raise
        result.submit_time.CopyFrom(to_timestamp(submit_wall))
        result.finish_time.CopyFrom(to_timestamp(time.time()))
        status = Status(result.status)
        # Both commits at once: they share the database's group commit.
        await asyncio.gather(
            self.operations.save(
                request_id, kind, print_, status, result.SerializeToString(deterministic=True)
            ),
            self.bus.publish_one(
                Draft(
                    STATUS_EVENTS[status],
                    "orchestrator",
                    request_id,
                    {
                        "kind": kind.name.lower(),
                        "tier": ROUTES[kind].tier.name.lower(),
                        "status": status.name.lower(),
                    },
                    f"{kind.name.lower()}: {result.message}"[:1000],
                )
            ),
        )
        return result

    async def get_operation(self, request_id: str) -> pb.Operation:
        if not request_id:
            raise InvalidArgument(
                "request_id must not be empty", field="request_id", reason="EMPTY_FIELD"
            )
        # An id Submit would refuse names no operation: the same
        # INVALID_ARGUMENT, not NOT_FOUND.
        check_request_id(request_id)
        pending = self.pending.get(request_id)
        if pending is not None:
            route = ROUTES[pending.kind]
            return pb.Operation(
                request_id=request_id,
                kind=int(pending.kind),
                tier=int(route.tier),
                status=int(Status.RUNNING),
                message="running",
                submit_time=to_timestamp(pending.submit_wall),
                services=route.services,
            )
        stored = await self.operations.get(request_id)
        if stored is None:
            raise NotFound(
                f"no operation with request_id {request_id!r} (finished ones are kept; "
                "one that ended with an error status is not)",
                field="request_id",
                reason="UNKNOWN_OPERATION",
            )
        return pb.Operation.FromString(stored.payload)

    # --- topology ---------------------------------------------------------------------------

    def topology(self) -> pb.GetTopologyResponse:
        response = pb.GetTopologyResponse(
            event_cursor=self.bus.head, oldest_event_cursor=self.bus.oldest
        )
        for name, health in self.health.services.items():
            response.services.append(
                pb.ServiceNode(
                    name=name,
                    address=health.address,
                    tier=int(SERVICE_TIERS[name]),
                    status=int(health.status),
                    change_time=to_timestamp(health.since),
                    detail=health.detail,
                )
            )
        response.services.append(
            pb.ServiceNode(
                name="orchestrator",
                address=self.address,
                tier=0,
                status=int(Serving.NOT_SERVING if self.draining.is_set() else Serving.SERVING),
            )
        )
        for kind, route in ROUTES.items():
            response.routes.append(
                pb.OperationRoute(
                    kind=int(kind),
                    tier=int(route.tier),
                    services=route.services,
                    available=self.health.first_down(route.services) is None,
                )
            )
        statuses = list(self.sources.agents.values())
        response.agents_passing = statuses.count(1)
        response.agents_warning = statuses.count(2)
        response.agents_critical = statuses.count(3)
        return response


async def build(server_config: ServerConfig) -> OrchestratorApp:
    app = OrchestratorApp(OrchestratorConfig.from_env(), server_config.data_dir)
    if server_config.port:  # with PORT=0 the bound port is not known here
        host = server_config.host if server_config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        app.address = f"{host}:{server_config.port}"
    return app
