"""What the market's integration tests share: a registry with calm timings
(bidders registered by a test do not heartbeat), an in-process double of the
trust service (a real TrustService server whose conservative scores the test
sets), and the market itself, restartable on the same data directory."""

from __future__ import annotations

from typing import Any

import grpc

from agent2028.trust.v1 import trust_pb2, trust_pb2_grpc
from clients.market import MarketClient
from clients.registry import RegistryClient
from services.common.bootstrap import Host, ServiceApp
from services.common.crypto import Identity
from services.common.errors import InvalidArgument
from services.market.config import MarketConfig
from services.market.core import MarketSettings
from services.market.servicer import MarketApp
from services.registry.core import RegistrySettings
from tests.support import serve

CALM_REGISTRY = RegistrySettings(
    heartbeat_interval_s=30.0,
    lease_ttl_s=120.0,
    deregister_critical_after_s=60.0,
)


class TrustDouble(trust_pb2_grpc.TrustServiceServicer):
    """The trust service as the market sees it: ConservativeScore answers
    from ``scores`` (0.5 for an unknown subject, as the contract says)."""

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.asked: list[str] = []

    async def ConservativeScore(
        self, request: trust_pb2.ConservativeScoreRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ConservativeScoreResponse:
        if not request.subject_id:
            raise InvalidArgument("subject_id is required", field="subject_id")
        self.asked.append(request.subject_id)
        lower = self.scores.get(request.subject_id, 0.5)
        return trust_pb2.ConservativeScoreResponse(
            subject_id=request.subject_id, lower_bound=lower, mean=lower, observers=1
        )


class TrustApp(ServiceApp):
    label = "trust-double"

    def __init__(self) -> None:
        super().__init__()
        self.servicer = TrustDouble()

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, trust_pb2.DESCRIPTOR.services_by_name["TrustService"])]


class RunningMarket:
    def __init__(self, data_dir: str, registry_addr: str, trust_addr: str | None) -> None:
        self.data_dir = data_dir
        self.registry_addr = registry_addr
        self.trust_addr = trust_addr
        self.host: Host | None = None
        self.app: MarketApp | None = None
        self.client: MarketClient | None = None

    def config(self) -> MarketConfig:
        return MarketConfig(
            settings=MarketSettings(watch_history=100_000),
            registry_addr=self.registry_addr,
            trust_addr=self.trust_addr,
            registry_timeout_s=2.0,
            trust_timeout_s=1.0,
            watch_queue=10_000,
            db_synchronous="NORMAL",
        )

    async def start(self) -> None:
        self.app = MarketApp(self.config(), self.data_dir)
        self.host = await serve(self.app, self.data_dir)
        self.client = MarketClient(self.host.address)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.host is not None:
            await self.host.stop(grace_s=0.5)

    async def restart(self) -> None:
        """Stops and starts the market on the same data directory and port."""
        assert self.host is not None
        port = self.host.port
        await self.stop()
        self.app = MarketApp(self.config(), self.data_dir)
        self.host = await serve(self.app, self.data_dir, port=port)
        self.client = MarketClient(self.host.address)

    @property
    def core(self):  # type: ignore[no-untyped-def]
        assert self.app is not None
        return self.app.core


async def register(
    registry: RegistryClient, agent_id: str, *capabilities: str, port: int = 9000
) -> Identity:
    identity = Identity.generate(agent_id)
    await registry.register(
        identity, address=f"127.0.0.1:{port}", capabilities=list(capabilities) or ["compute"]
    )
    return identity
