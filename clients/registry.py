"""Typed async client of the registry."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

from agent2028.registry.v1 import registry_pb2, registry_pb2_grpc
from clients.base import ServiceClient
from clients.errors import ClientError, NotFound, OutOfRange, ResourceExhausted, Unavailable
from services.common import signing
from services.common.crypto import Identity
from services.common.errors import Unavailable as DomainUnavailable
from services.common.timeutil import timestamp_from_ns, to_duration

log = logging.getLogger(__name__)

ORDERS = {
    "fitness": registry_pb2.ORDER_FITNESS,
    "latency": registry_pb2.ORDER_LATENCY,
    "reliability": registry_pb2.ORDER_RELIABILITY,
    "load": registry_pb2.ORDER_LOAD,
}
STATUSES = {"passing": 1, "warning": 2, "critical": 3}


def now_timestamp() -> tuple[int, object]:
    """(unix nanoseconds, the same instant as a protobuf Timestamp)."""
    ns = time.time_ns()
    return ns, timestamp_from_ns(ns)


class RegistryClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    async def register(
        self,
        identity: Identity,
        *,
        address: str,
        capabilities: Iterable[str],
        max_concurrency: int = 8,
        metadata: Mapping[str, str] | None = None,
        lease_ttl_s: float = 0.0,
        wait_for_ready: bool | None = None,
        timeout_s: float | None = None,
    ) -> registry_pb2.RegisterResponse:
        """Registers ``identity`` (its signer_id is the agent id) with a proof
        of possession of its key."""
        caps = list(capabilities)
        meta = dict(metadata or {})
        issue_ns, issue_time = now_timestamp()
        proof = identity.sign(
            *signing.registration(
                identity.signer_id,
                address,
                caps,
                max_concurrency,
                meta,
                identity.public_key,
                issue_ns,
            )
        )
        request = registry_pb2.RegisterRequest(
            card=registry_pb2.AgentCard(
                agent_id=identity.signer_id,
                address=address,
                capabilities=caps,
                max_concurrency=max_concurrency,
                metadata=meta,
                public_key=identity.public_key,
            ),
            issue_time=issue_time,
            proof_of_possession=proof,
        )
        if lease_ttl_s:
            request.lease_ttl.CopyFrom(to_duration(lease_ttl_s))
        return await self._unary(
            self.stub.Register, request, wait_for_ready=wait_for_ready, timeout_s=timeout_s
        )

    async def deregister(self, identity: Identity) -> registry_pb2.DeregisterResponse:
        issue_ns, issue_time = now_timestamp()
        signature = identity.sign(*signing.deregistration(identity.signer_id, issue_ns))
        return await self._unary(
            self.stub.Deregister,
            registry_pb2.DeregisterRequest(
                agent_id=identity.signer_id, issue_time=issue_time, signature=signature
            ),
        )

    async def get_agent(
        self, agent_id: str, *, timeout_s: float | None = None
    ) -> registry_pb2.Agent:
        response = await self._unary(
            self.stub.GetAgent, registry_pb2.GetAgentRequest(agent_id=agent_id), timeout_s=timeout_s
        )
        return response.agent

    async def list_agents(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        capability: str = "",
        statuses: Iterable[str] = (),
    ) -> registry_pb2.ListAgentsResponse:
        return await self._unary(
            self.stub.ListAgents,
            registry_pb2.ListAgentsRequest(
                page_size=page_size,
                page_token=page_token,
                capability=capability,
                statuses=[STATUSES[s] for s in statuses],
            ),
        )

    async def iter_agents(
        self, *, capability: str = "", statuses: Iterable[str] = (), page_size: int = 500
    ) -> AsyncIterator[registry_pb2.Agent]:
        """Every agent, page by page."""
        token = ""
        statuses = list(statuses)
        while True:
            page = await self.list_agents(
                page_size=page_size, page_token=token, capability=capability, statuses=statuses
            )
            for agent in page.agents:
                yield agent
            token = page.next_page_token
            if not token:
                return

    async def find_by_capability(
        self,
        capability: str,
        *,
        order: str = "fitness",
        top_k: int = 10,
        include_unhealthy: bool = False,
        latency_weight: float | None = None,
        reliability_weight: float | None = None,
        timeout_s: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> registry_pb2.FindByCapabilityResponse:
        request = registry_pb2.FindByCapabilityRequest(
            capability=capability,
            order=ORDERS[order],
            top_k=top_k,
            include_unhealthy=include_unhealthy,
        )
        if latency_weight is not None:
            request.latency_weight = latency_weight
        if reliability_weight is not None:
            request.reliability_weight = reliability_weight
        return await self._unary(
            self.stub.FindByCapability, request, timeout_s=timeout_s, wait_for_ready=wait_for_ready
        )

    async def report_outcome(
        self,
        agent_id: str,
        *,
        success: bool,
        latency_ms: float,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> registry_pb2.ReportOutcomeResponse:
        return await self._unary(
            self.stub.ReportOutcome,
            registry_pb2.ReportOutcomeRequest(
                agent_id=agent_id, success=success, latency_ms=latency_ms, request_id=request_id
            ),
            timeout_s=timeout_s,
        )

    async def watch(
        self,
        *,
        from_index: int = 0,
        capability: str = "",
        resume: bool = True,
        retry_delay_s: float = 0.5,
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        """Registry changes. With ``resume``, a lagging or interrupted watch
        continues from the last index seen, and a compacted or restarted
        registry starts over with a fresh snapshot."""
        index = from_index
        while True:
            try:
                async for response in self._stream(
                    self.stub.Watch,
                    registry_pb2.WatchRequest(from_index=index, capability=capability),
                ):
                    index = response.index
                    yield response
                if not resume:
                    return
            except (ResourceExhausted, Unavailable) as exc:
                if not resume:
                    raise
                log.info(
                    "watch interrupted (%s); resuming from %d", exc.reason or exc.code.name, index
                )
                await asyncio.sleep(retry_delay_s)
            except OutOfRange:
                if not resume:
                    raise
                log.info("watch index %d no longer retained; starting over from a snapshot", index)
                index = 0


def public_key_fetch(registry: RegistryClient) -> Callable[[str], Awaitable[bytes | None]]:
    """For ``services.common.registered_keys.RegisteredKeys``: an agent's
    registered public key through ``registry`` (whose own deadline bounds each
    lookup), None for an unknown agent, and UNAVAILABLE (a domain error, so a
    service answers its caller with it) when the registry cannot answer."""

    async def fetch(agent_id: str) -> bytes | None:
        try:
            agent = await registry.get_agent(agent_id)
        except NotFound:
            return None
        except ClientError as exc:
            raise DomainUnavailable(
                f"the registry cannot confirm agent {agent_id!r} right now ({exc.code.name}); retry",
                reason="REGISTRY_UNAVAILABLE",
            ) from None
        return bytes(agent.card.public_key)

    return fetch
