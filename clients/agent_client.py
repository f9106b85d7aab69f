"""Typed async client of an agent's AgentService, and receipt verification."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from agent2028.agent.v1 import agent_pb2, agent_pb2_grpc
from clients.base import ServiceClient
from services.common import crypto, signing
from services.common.timeutil import timestamp_ns


class AgentClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)

    async def execute(
        self,
        capability: str,
        args: Sequence[str] = (),
        *,
        command_id: str,
        session_id: str = "",
        timeout_s: float | None = None,
    ) -> agent_pb2.ExecuteResponse:
        return await self._unary(
            self.stub.Execute,
            agent_pb2.ExecuteRequest(
                command_id=command_id, session_id=session_id, capability=capability, args=list(args)
            ),
            timeout_s=timeout_s,
        )

    async def ping(self, *, timeout_s: float | None = None) -> agent_pb2.PingResponse:
        return await self._unary(self.stub.Ping, agent_pb2.PingRequest(), timeout_s=timeout_s)


def receipt_statement(receipt: agent_pb2.AgentReceipt) -> tuple[object, ...]:
    return signing.agent_receipt(
        receipt.command_id,
        receipt.session_id,
        receipt.agent_id,
        receipt.capability,
        timestamp_ns(receipt.start_time),
        timestamp_ns(receipt.finish_time),
        receipt.success,
        receipt.error,
        receipt.output_digest,
    )


def verify_receipt(response: agent_pb2.ExecuteResponse, public_key: bytes) -> bool:
    """True when the agent's signature covers this receipt and the output
    matches the digest it signed."""
    if hashlib.sha256(response.output.encode()).digest() != response.receipt.output_digest:
        return False
    return crypto.verify(public_key, response.signature, *receipt_statement(response.receipt))
