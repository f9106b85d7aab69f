"""The whole cluster in the test process, for the orchestrator's integration
tests: every service a real gRPC server on port 0, agents with their voting,
bidding and pool-voting behaviours, and the orchestrator in front."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from clients.agent import Agent, FaultPlan, swarm_voting
from clients.agent.bidding import MarketBehaviour
from clients.agent.voting import Voting
from clients.orchestrator import OrchestratorClient
from services.broker.config import BrokerConfig
from services.broker.servicer import BrokerApp
from services.common.bootstrap import Host, ServiceApp
from services.consensus.config import ConsensusConfig
from services.consensus.servicer import ConsensusApp
from services.market.config import MarketConfig
from services.market.servicer import MarketApp
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.servicer import OrchestratorApp
from services.swarm.config import SwarmConfig
from services.swarm.servicer import SwarmApp
from services.trust.config import TrustConfig
from services.trust.servicer import TrustApp
from tests.support import serve
from tests.swarm_tier import start_stigmergy

ORDER = ("trust", "broker", "consensus", "market", "stigmergy", "swarm")


class Stack:
    """Registry (the fixture's), trust, broker, consensus, market, stigmergy,
    swarm and the orchestrator, each on port 0 in this process."""

    def __init__(self, registry_addr: str, tmp: str) -> None:
        self.registry_addr = registry_addr
        self.tmp = tmp
        self.hosts: dict[str, Host] = {}
        self.apps: dict[str, ServiceApp] = {}
        self.agents: dict[str, Agent] = {}
        self.behaviours: dict[str, list[Any]] = {}
        self.orchestrator: OrchestratorClient | None = None

    def address(self, name: str) -> str:
        return self.registry_addr if name == "registry" else self.hosts[name].address

    def _dir(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _app(self, name: str) -> ServiceApp:
        env = {"REGISTRY_ADDR": self.registry_addr}
        if "trust" in self.hosts:
            env["TRUST_ADDR"] = self.hosts["trust"].address
        data = self._dir(name)
        if name == "trust":
            return TrustApp(TrustConfig.from_env({}), data)
        if name == "broker":
            env.update(BROKER_CANDIDATE_TTL_S="0", BROKER_OUTBOX_MAX_BACKOFF_S="0.2")
            return BrokerApp(BrokerConfig.from_env(data, env=env), data)
        if name == "consensus":
            env.update(CONSENSUS_VERIFY_WORKERS="0")
            return ConsensusApp(ConsensusConfig.from_env(env), data)
        if name == "market":
            return MarketApp(MarketConfig.from_env(env), data)
        if name == "swarm":
            env.update(SWARM_SWEEP_INTERVAL_S="0.05")
            return SwarmApp(SwarmConfig.from_env(env), data)
        raise KeyError(name)

    async def start_service(self, name: str, *, port: int = 0) -> None:
        if name == "stigmergy":
            host, app = await start_stigmergy(
                self._dir("stigmergy-host"), self.registry_addr, tick_interval_s=0.1
            )
            if port:  # pragma: no cover - not restarted in tests
                raise ValueError("stigmergy restarts are not supported here")
        else:
            app = self._app(name)
            host = await serve(app, self._dir(name), port=port)
        self.hosts[name] = host
        self.apps[name] = app

    async def stop_service(self, name: str) -> int:
        """Stops a service; returns its port for a restart."""
        host = self.hosts.pop(name)
        await host.stop(grace_s=0.2)
        return host.port

    async def start(self, **orchestrator: Any) -> None:
        for name in ORDER:
            await self.start_service(name)
        await self.start_orchestrator(**orchestrator)

    def orchestrator_config(self, **overrides: Any) -> OrchestratorConfig:
        addresses = {name: self.address(name) for name in ("registry", *ORDER)}
        base = OrchestratorConfig(
            addresses=addresses,
            pool_poll_s=0.1,
            field_poll_s=0.2,
            retry_s=0.1,
            call_timeout_s=3.0,
        )
        return replace(base, **overrides)

    async def start_orchestrator(self, *, port: int = 0, **overrides: Any) -> OrchestratorApp:
        app = OrchestratorApp(self.orchestrator_config(**overrides), self._dir("orchestrator"))
        host = await serve(app, self._dir("orchestrator"), port=port)
        self.hosts["orchestrator"] = host
        self.apps["orchestrator"] = app
        if self.orchestrator is not None:
            await self.orchestrator.close()
        self.orchestrator = OrchestratorClient(host.address, timeout_s=10.0)
        return app

    @property
    def app(self) -> OrchestratorApp:
        app = self.apps["orchestrator"]
        assert isinstance(app, OrchestratorApp)
        return app

    async def start_agent(
        self,
        agent_id: str,
        capabilities: Sequence[str],
        *,
        faults: Sequence[str] = (),
        vote: str | None = "approve",
        bid: bool = True,
        pool_vote: str | None = None,
        handlers: dict[str, Callable[..., Any]] | None = None,
        wait: bool = True,
    ) -> Agent:
        agent = Agent(
            agent_id,
            registry=self.registry_addr,
            capabilities=[c for c in capabilities if not handlers or c not in handlers],
            data_dir=os.path.join(self.tmp, "agents", agent_id),
            faults=FaultPlan.parse(list(faults)),
        )
        for capability, handler in (handlers or {}).items():
            agent.add_capability(capability, handler)
        behaviours: list[Any] = []
        if vote is not None:
            behaviours.append(Voting(self.address("consensus"), vote, reconnect_cap_s=0.2))
        if bid:
            behaviours.append(MarketBehaviour(self.address("market")))
        if pool_vote is not None:
            behaviours.append(
                swarm_voting.behaviour(
                    swarm_voting.VotePolicy.parse(pool_vote), self.address("swarm")
                )
            )
        for behaviour in behaviours:
            agent.add_behaviour(behaviour)
        await agent.start()
        self.agents[agent_id] = agent
        self.behaviours[agent_id] = behaviours
        if wait:
            await asyncio.wait_for(agent.registered.wait(), 15)
            for behaviour in behaviours:
                connected = getattr(behaviour, "connected", None)
                if connected is not None:
                    await asyncio.wait_for(connected.wait(), 15)
        return agent

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        if self.orchestrator is not None:
            await self.orchestrator.close()
        for name in ["orchestrator", *reversed(ORDER)]:
            host = self.hosts.pop(name, None)
            if host is not None:
                await host.stop(grace_s=0.2)


async def subscriber(
    client: OrchestratorClient, types: Sequence[str] = (), **kwargs: Any
) -> tuple[list[Any], asyncio.Task[None], Callable[[], Awaitable[None]]]:
    """Follows the bus into a list; returns (events, task, stop). Waits
    until the subscription is live."""
    events: list[Any] = []
    live = asyncio.Event()

    async def follow() -> None:
        async for response in client.subscribe(types, **kwargs):
            events.extend(response.events)
            if response.caught_up:
                live.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(live.wait(), 10)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    return events, task, stop
