"""The broker's ports over the network: the registry as its directory, agents
through AgentService, and the trust service and registry as report receivers.
Each turns client errors into what the core understands."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from agent2028.common.v1 import common_pb2
from clients import errors
from clients.agent_client import AgentClient, verify_receipt
from clients.channel import create_channel
from clients.registry import RegistryClient
from clients.trust import TrustClient, observe_request
from services.broker.core import (
    AgentAnswer,
    AttemptFailed,
    Candidate,
    DirectoryUnavailable,
    ReportRejected,
    ReportRetry,
)
from services.common.crypto import Identity
from services.common.timeutil import timestamp_ns

log = logging.getLogger(__name__)

# Failures worth trying again later: the receiver is away or overloaded.
_TRANSIENT = (
    errors.Unavailable,
    errors.DeadlineExceeded,
    errors.ResourceExhausted,
    errors.Aborted,
    errors.Cancelled,
    errors.Unknown,
    errors.Internal,
)
# The registry forgets agents when it restarts, until they register again.
REGISTRY_NOT_FOUND_TRIES = 20


class RegistryDirectory:
    def __init__(self, client: RegistryClient, *, timeout_s: float = 2.0) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def candidates(
        self, capability: str, order: str, limit: int, *, patient: bool = False
    ) -> tuple[list[Candidate], int]:
        try:
            response = await self.client.find_by_capability(
                capability,
                order=order,
                top_k=limit,
                timeout_s=self.timeout_s,
                # With nothing cached to fall back on, ride out a reconnect
                # (bounded by the deadline) rather than fail at once.
                wait_for_ready=patient,
            )
        except (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled) as exc:
            raise DirectoryUnavailable(str(exc)) from None
        return [_candidate(a) for a in response.agents], response.total_with_capability

    async def agent(self, agent_id: str) -> tuple[Candidate, int, list[str]] | None:
        try:
            a = await self.client.get_agent(agent_id, timeout_s=self.timeout_s)
        except errors.NotFound:
            return None
        except (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled) as exc:
            raise DirectoryUnavailable(str(exc)) from None
        return _candidate(a), a.status, list(a.card.capabilities)


def _candidate(a: Any) -> Candidate:
    return Candidate(
        agent_id=a.card.agent_id,
        address=a.card.address,
        public_key=a.card.public_key,
        latency_ms=a.latency_ms,
        reliability=a.reliability,
        fitness=a.fitness,
        health=a.health,
        load=a.load,
        max_concurrency=max(a.card.max_concurrency, 1),
    )


class GrpcAgentCaller:
    """Calls agents over channels kept per address (least recently used ones
    are closed past ``max_channels``). Channels do not retry by themselves:
    failover to another agent is the broker's decision."""

    def __init__(self, *, max_channels: int = 1024) -> None:
        self.max_channels = max_channels
        self._clients: OrderedDict[str, AgentClient] = OrderedDict()
        self._closing: set[Any] = set()

    def _client(self, address: str) -> AgentClient:
        client = self._clients.get(address)
        if client is not None:
            self._clients.move_to_end(address)
            return client
        client = AgentClient(create_channel(address, retries=False))
        client._owns_channel = True  # the channel is ours to close
        self._clients[address] = client
        while len(self._clients) > self.max_channels:
            _, old = self._clients.popitem(last=False)
            self._closing.add(old)
        return client

    async def close(self) -> None:
        for client in [*self._clients.values(), *self._closing]:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        self._closing.clear()

    async def execute(
        self,
        candidate: Candidate,
        *,
        command_id: str,
        session_id: str,
        capability: str,
        args: Sequence[str],
        timeout_s: float,
    ) -> AgentAnswer:
        if self._closing:
            old = self._closing.pop()
            with contextlib.suppress(Exception):
                await old.close()
        client = self._client(candidate.address)
        try:
            response = await client.execute(
                capability,
                args,
                command_id=command_id,
                session_id=session_id,
                timeout_s=timeout_s,
            )
        except errors.ClientError as exc:
            raise AttemptFailed(exc.code.name, exc.message) from None
        receipt = response.receipt
        return AgentAnswer(
            command_id=receipt.command_id,
            session_id=receipt.session_id,
            agent_id=receipt.agent_id,
            capability=receipt.capability,
            start_ns=timestamp_ns(receipt.start_time),
            finish_ns=timestamp_ns(receipt.finish_time),
            duration_ms=receipt.duration_ms,
            success=receipt.success,
            error=receipt.error,
            output_digest=receipt.output_digest,
            output=response.output,
            signature=response.signature,
            signature_valid=verify_receipt(response, candidate.public_key),
        )


class ClusterReporter:
    """Delivers the broker's reports: signed observations to the trust
    service, measured outcomes to the registry."""

    def __init__(
        self,
        trust: TrustClient,
        registry: RegistryClient,
        identity: Identity,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self.trust = trust
        self.registry = registry
        self.identity = identity
        self.timeout_s = timeout_s

    async def send(self, target: str, payload: dict[str, Any]) -> None:
        try:
            if target == "trust":
                await self._observe(payload)
            elif target == "registry":
                await self.registry.report_outcome(
                    payload["agent_id"],
                    success=payload["success"],
                    latency_ms=payload["latency_ms"],
                    request_id=payload["request_id"],
                    timeout_s=self.timeout_s,
                )
            else:
                raise ReportRejected(f"unknown report target {target!r}")
        except _TRANSIENT as exc:
            raise ReportRetry(str(exc)) from None
        except errors.NotFound as exc:
            if target == "registry":
                raise ReportRetry(str(exc), limit=REGISTRY_NOT_FOUND_TRIES) from None
            raise ReportRejected(str(exc)) from None
        except errors.ClientError as exc:
            raise ReportRejected(str(exc)) from None

    def batches(self, target: str) -> bool:
        return target == "trust"

    async def send_many(self, target: str, payloads: list[dict[str, Any]]) -> None:
        if target != "trust":
            raise ReportRejected(f"no batch delivery to {target!r}")
        try:
            await self.trust.observe_batch(
                [self._request(p) for p in payloads], timeout_s=self.timeout_s
            )
        except _TRANSIENT as exc:
            raise ReportRetry(str(exc)) from None
        except errors.ClientError as exc:
            raise ReportRejected(str(exc)) from None

    def _request(self, payload: dict[str, Any]) -> Any:
        return observe_request(
            payload["observer_id"],
            payload["subject_id"],
            common_pb2.Outcome(kind=payload["kind"], duration_ms=payload["duration_ms"]),
            capability=payload["capability"],
            observed_at=payload["observe_ns"] / 1e9,
            request_id=payload["request_id"],
            identity=self.identity,
        )

    async def _observe(self, payload: dict[str, Any]) -> None:
        await self.trust.observe(
            payload["observer_id"],
            payload["subject_id"],
            common_pb2.Outcome(kind=payload["kind"], duration_ms=payload["duration_ms"]),
            capability=payload["capability"],
            observed_at=payload["observe_ns"] / 1e9,
            request_id=payload["request_id"],
            identity=self.identity,
            timeout_s=self.timeout_s,
        )
