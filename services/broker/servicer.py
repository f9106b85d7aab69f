"""BrokerService over gRPC: converts protos to core calls and back, and wires
the broker's ports to the registry, the agents and the trust service."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from agent2028.agent.v1 import agent_pb2
from agent2028.broker.v1 import broker_pb2, broker_pb2_grpc
from agent2028.common.v1 import common_pb2
from clients.registry import RegistryClient
from clients.trust import TrustClient
from services.broker.adapters import ClusterReporter, GrpcAgentCaller, RegistryDirectory
from services.broker.config import BrokerConfig, database_path
from services.broker.core import (
    Broker,
    Outbox,
    Ranked,
    Receipt,
    ReceiptStore,
    Strategy,
)
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.crypto import Identity
from services.common.errors import InvalidArgument
from services.common.timeutil import from_duration, require_duration, timestamp_from_ns
from services.common.validation import page_size

log = logging.getLogger(__name__)

EXECUTIONS = Counter(
    "agent2028_broker_executions_total", "Commands executed, by result.", ["result", "strategy"]
)
OUTBOX_PENDING = Gauge("agent2028_broker_outbox_pending", "Reports waiting to be delivered.")
INFLIGHT = Gauge("agent2028_broker_inflight", "Commands in flight through the broker.")


def strategy_of(value: int) -> Strategy:
    if value == broker_pb2.STRATEGY_UNSPECIFIED:
        return Strategy.BEST_FIT
    try:
        return Strategy(value)
    except ValueError:
        raise InvalidArgument(
            f"strategy has no value {value}", field="strategy", reason="UNKNOWN_ENUM_VALUE"
        ) from None


def candidate_to_proto(ranked: Ranked) -> broker_pb2.Candidate:
    c = ranked.candidate
    return broker_pb2.Candidate(
        agent=common_pb2.AgentRef(agent_id=c.agent_id, address=c.address),
        score=ranked.score,
        latency_ms=c.latency_ms,
        reliability=c.reliability,
        fitness=c.fitness,
        health=c.health,
        broker_inflight=ranked.inflight,
        reported_load=c.load,
        max_concurrency=c.max_concurrency,
    )


def receipt_to_proto(r: Receipt) -> broker_pb2.ExecutionReceipt:
    out = broker_pb2.ExecutionReceipt(
        command_id=r.command_id,
        session_id=r.session_id,
        agent_id=r.agent_id,
        capability=r.capability,
        start_time=timestamp_from_ns(r.start_ns),
        finish_time=timestamp_from_ns(r.finish_ns),
        duration_ms=r.duration_ms,
        success=r.success,
        error=r.error,
        attempts=r.attempts,
        output_digest=r.output_digest,
        args_digest=r.args_digest,
        strategy=r.strategy,
        attempt_log=[
            broker_pb2.Attempt(
                agent_id=a.agent_id,
                address=a.address,
                result=a.result,
                error=a.error,
                duration_ms=a.duration_ms,
            )
            for a in r.attempt_log
        ],
        broker_signature=common_pb2.Signature(
            signer_id=r.broker_id, public_key=r.broker_public_key, signature=r.broker_signature
        ),
    )
    a = r.agent
    if a is not None:
        out.agent_receipt.CopyFrom(
            agent_pb2.AgentReceipt(
                command_id=a.command_id,
                session_id=a.session_id,
                agent_id=a.agent_id,
                capability=a.capability,
                start_time=timestamp_from_ns(a.start_ns),
                finish_time=timestamp_from_ns(a.finish_ns),
                duration_ms=a.duration_ms,
                success=a.success,
                error=a.error,
                output_digest=a.output_digest,
            )
        )
        out.agent_signature.CopyFrom(
            common_pb2.Signature(
                signer_id=a.agent_id, public_key=r.agent_public_key, signature=a.signature
            )
        )
    elif r.agent_public_key:
        # No agent answered, but the broker's signature covers the key of the
        # agent it last tried: carried (with no signature) so it can be checked.
        out.agent_signature.CopyFrom(
            common_pb2.Signature(signer_id=r.agent_id, public_key=r.agent_public_key)
        )
    return out


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def Route(
        self, request: broker_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.RouteResponse:
        strategy = strategy_of(request.strategy)
        decision = await self.broker.route(
            request.capability, strategy, list(request.exclude_agent_ids)
        )
        return broker_pb2.RouteResponse(
            chosen=candidate_to_proto(decision.chosen),
            strategy=int(strategy),
            reason=decision.reason,
            ranking=[candidate_to_proto(r) for r in decision.ranking],
        )

    async def ExecuteDistributed(
        self, request: broker_pb2.ExecuteDistributedRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.ExecuteDistributedResponse:
        strategy = strategy_of(request.strategy)
        deadline_s = None
        if request.HasField("deadline"):
            d = request.deadline
            if d.seconds < 0 or d.nanos < 0:
                raise InvalidArgument(
                    f"deadline must not be negative, got {from_duration(d)}s",
                    field="deadline",
                    reason="OUT_OF_RANGE",
                )
            deadline_s = require_duration(d, "deadline", lo=0.0, hi=float("inf"))
        attempt_timeout_s = None
        if request.HasField("attempt_timeout"):
            attempt_timeout_s = require_duration(
                request.attempt_timeout, "attempt_timeout", lo=0.001, hi=86_400.0
            )
        INFLIGHT.inc()
        try:
            receipt, duplicate = await self.broker.execute(
                capability=request.capability,
                args=list(request.args),
                session_id=request.session_id,
                strategy=strategy,
                deadline_s=deadline_s,
                call_remaining_s=context.time_remaining(),
                request_id=request.request_id,
                max_attempts=request.max_attempts,
                attempt_timeout_s=attempt_timeout_s,
                agent_id=request.agent_id,
            )
        finally:
            INFLIGHT.dec()
            OUTBOX_PENDING.set(self.broker.outbox.pending())
        if not duplicate:
            EXECUTIONS.labels("success" if receipt.success else "failure", strategy.name).inc()
        return broker_pb2.ExecuteDistributedResponse(
            receipt=receipt_to_proto(receipt), output=receipt.output, duplicate=duplicate
        )

    async def GetReceipt(
        self, request: broker_pb2.GetReceiptRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.GetReceiptResponse:
        receipt = await self.broker.get_receipt(request.command_id)
        return broker_pb2.GetReceiptResponse(
            receipt=receipt_to_proto(receipt), output=receipt.output
        )

    async def ListReceipts(
        self, request: broker_pb2.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.ListReceiptsResponse:
        rows, token = await self.broker.list_receipts(
            session_id=request.session_id,
            agent_id=request.agent_id,
            page_size=page_size(request.page_size),
            page_token=request.page_token,
        )
        return broker_pb2.ListReceiptsResponse(
            receipts=[receipt_to_proto(r) for r in rows], next_page_token=token
        )

    async def GetIdentity(
        self, request: broker_pb2.GetIdentityRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.GetIdentityResponse:
        identity = self.broker.identity
        return broker_pb2.GetIdentityResponse(
            broker_id=identity.signer_id, public_key=identity.public_key
        )


class BrokerApp(ServiceApp):
    label = "broker"

    def __init__(self, config: BrokerConfig, data_dir: str, *, drain_s: float = 5.0) -> None:
        super().__init__()
        self.config = config
        # How long stop() waits for commands whose callers hung up.
        self.drain_s = drain_s
        os.makedirs(data_dir, exist_ok=True)
        self.identity = Identity.load_or_create(config.settings.broker_id, config.key_file)
        self.registry = RegistryClient(config.registry_addr)
        self.trust = TrustClient(config.trust_addr)
        self.caller = GrpcAgentCaller()
        self.store = ReceiptStore(database_path(data_dir), synchronous=config.synchronous)
        self.outbox = Outbox(
            self.store,
            ClusterReporter(
                self.trust, self.registry, self.identity, timeout_s=config.peer_timeout_s
            ),
            batch=config.outbox_batch,
            max_backoff_s=config.outbox_max_backoff_s,
            linger_s=config.outbox_linger_s,
        )
        self.broker = Broker(
            config.settings,
            self.identity,
            RegistryDirectory(self.registry, timeout_s=config.peer_timeout_s),
            self.caller,
            self.store,
            self.outbox,
        )
        self.servicer = BrokerServicer(self.broker)

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, broker_pb2.DESCRIPTOR.services_by_name["BrokerService"])]

    async def start(self) -> None:
        await self.store.open()
        await self.outbox.start()
        # Everything alive now (modules, grpc, protobuf, the loaded state) lives
        # as long as the process: keep it out of the collector's full passes,
        # whose pauses otherwise show up in the latency tail.
        gc.collect()
        gc.freeze()
        OUTBOX_PENDING.set(self.outbox.pending())
        log.info(
            "broker %s (key %s...) routing through %s, reporting to %s; %d reports pending",
            self.identity.signer_id,
            self.identity.public_key.hex()[:16],
            self.config.registry_addr,
            self.config.trust_addr,
            self.outbox.pending(),
        )

    async def stop(self) -> None:
        left = await self.broker.drain(self.drain_s)
        if left:
            log.warning("%d commands still running at shutdown; their receipts are lost", left)
        await self.outbox.stop(flush_s=1.0)
        if self.outbox.pending():
            log.info("%d reports stay stored for the next start", self.outbox.pending())
        await self.store.close()
        await self.caller.close()
        await self.registry.close()
        await self.trust.close()


async def build(server_config: ServerConfig) -> BrokerApp:
    return BrokerApp(
        BrokerConfig.from_env(server_config.data_dir),
        server_config.data_dir,
        drain_s=server_config.grace_s,
    )
