"""Typed async client of the broker, and verification of its receipts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

from agent2028.broker.v1 import broker_pb2, broker_pb2_grpc
from clients.agent_client import receipt_statement
from clients.base import ServiceClient
from services.common import crypto, signing
from services.common.timeutil import timestamp_ns, to_duration

STRATEGIES = {
    "min_latency": broker_pb2.STRATEGY_MIN_LATENCY,
    "max_reliability": broker_pb2.STRATEGY_MAX_RELIABILITY,
    "best_fit": broker_pb2.STRATEGY_BEST_FIT,
    "least_loaded": broker_pb2.STRATEGY_LEAST_LOADED,
    "round_robin": broker_pb2.STRATEGY_ROUND_ROBIN,
}
STRATEGY_NAMES = {v: k for k, v in STRATEGIES.items()}


def strategy_value(name: str) -> int:
    """A strategy by name: min_latency, max_reliability, best_fit,
    least_loaded, round_robin (dashes and upper case accepted)."""
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[key]


class BrokerClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = broker_pb2_grpc.BrokerServiceStub(self.channel)

    async def route(
        self, capability: str, *, strategy: str = "best_fit", exclude: Sequence[str] = ()
    ) -> broker_pb2.RouteResponse:
        return await self._unary(
            self.stub.Route,
            broker_pb2.RouteRequest(
                capability=capability,
                strategy=strategy_value(strategy),
                exclude_agent_ids=list(exclude),
            ),
        )

    async def execute(
        self,
        capability: str,
        args: Sequence[str] = (),
        *,
        session_id: str = "",
        strategy: str = "best_fit",
        deadline_s: float | None = None,
        request_id: str | None = None,
        max_attempts: int = 0,
        attempt_timeout_s: float | None = None,
        agent_id: str = "",
        timeout_s: float | None = None,
    ) -> broker_pb2.ExecuteDistributedResponse:
        """Runs a command through the broker. A request_id is made when none
        is given, so the call's own transparent retries are idempotent.
        ``agent_id`` pins the command to that agent (no failover)."""
        request = broker_pb2.ExecuteDistributedRequest(
            session_id=session_id,
            capability=capability,
            args=list(args),
            strategy=strategy_value(strategy),
            request_id=f"req-{uuid.uuid4().hex}" if request_id is None else request_id,
            max_attempts=max_attempts,
            agent_id=agent_id,
        )
        if deadline_s is not None:
            request.deadline.CopyFrom(to_duration(deadline_s))
        if attempt_timeout_s is not None:
            request.attempt_timeout.CopyFrom(to_duration(attempt_timeout_s))
        if timeout_s is None:
            timeout_s = (deadline_s if deadline_s is not None else 30.0) + 5.0
        return await self._unary(self.stub.ExecuteDistributed, request, timeout_s=timeout_s)

    async def get_receipt(self, command_id: str) -> broker_pb2.GetReceiptResponse:
        return await self._unary(
            self.stub.GetReceipt, broker_pb2.GetReceiptRequest(command_id=command_id)
        )

    async def list_receipts(
        self, *, session_id: str = "", agent_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> broker_pb2.ListReceiptsResponse:
        return await self._unary(
            self.stub.ListReceipts,
            broker_pb2.ListReceiptsRequest(
                session_id=session_id,
                agent_id=agent_id,
                page_size=page_size,
                page_token=page_token,
            ),
        )

    async def iter_receipts(
        self, *, session_id: str = "", agent_id: str = "", page_size: int = 500
    ) -> AsyncIterator[broker_pb2.ExecutionReceipt]:
        token = ""
        while True:
            page = await self.list_receipts(
                session_id=session_id, agent_id=agent_id, page_size=page_size, page_token=token
            )
            for receipt in page.receipts:
                yield receipt
            token = page.next_page_token
            if not token:
                return

    async def identity(self) -> broker_pb2.GetIdentityResponse:
        return await self._unary(self.stub.GetIdentity, broker_pb2.GetIdentityRequest())


def broker_statement(receipt: broker_pb2.ExecutionReceipt) -> tuple[object, ...]:
    return signing.broker_receipt(
        receipt.broker_signature.signer_id,
        receipt.command_id,
        receipt.session_id,
        receipt.agent_id,
        receipt.capability,
        timestamp_ns(receipt.start_time),
        timestamp_ns(receipt.finish_time),
        receipt.duration_ms,
        receipt.success,
        receipt.error,
        receipt.attempts,
        receipt.output_digest,
        receipt.args_digest,
        receipt.strategy,
        [(a.agent_id, a.result) for a in receipt.attempt_log],
        receipt.agent_signature.public_key,
        receipt.agent_signature.signature,
    )


def verify_broker_signature(receipt: broker_pb2.ExecutionReceipt, broker_public_key: bytes) -> bool:
    """True when the broker's signature covers this receipt, made with
    ``broker_public_key`` (get it once from BrokerClient.identity())."""
    return receipt.broker_signature.public_key == broker_public_key and crypto.verify(
        broker_public_key, receipt.broker_signature.signature, *broker_statement(receipt)
    )


def verify_agent_signature(
    receipt: broker_pb2.ExecutionReceipt, agent_public_key: bytes | None = None
) -> bool:
    """True when the agent's signature covers the agent receipt. Without a key
    the one carried in the receipt is used (which the broker's signature vouches for)."""
    if not receipt.HasField("agent_receipt"):
        return False
    key = agent_public_key if agent_public_key is not None else receipt.agent_signature.public_key
    return crypto.verify(
        key, receipt.agent_signature.signature, *receipt_statement(receipt.agent_receipt)
    )
