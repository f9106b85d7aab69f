"""The broker over gRPC with a real registry, trust service and agents (in
this process, on port 0): the guide's sections 2.2-2.4, signatures, failure
verdicts, idempotent retries, bad input and a trust outage."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from agent2028.broker.v1 import broker_pb2
from clients import errors
from clients.agent import Agent, FaultPlan
from clients.broker import (
    BrokerClient,
    verify_agent_signature,
    verify_broker_signature,
)
from clients.registry import RegistryClient
from clients.trust import TrustClient
from services.broker.config import BrokerConfig
from services.broker.servicer import BrokerApp
from services.common.bootstrap import Host
from services.trust.config import TrustConfig
from services.trust.core import TrustSettings
from services.trust.servicer import TrustApp
from tests.support import eventually, serve


@dataclass
class Loop:
    """A registry, trust service and broker, each a real server on port 0."""

    tmp: str
    registry_address: str
    trust_host: Host
    broker_host: Host
    broker_app: BrokerApp
    broker: BrokerClient
    registry: RegistryClient
    trust: TrustClient
    start_agent: Callable[..., Awaitable[Agent]]

    async def start_trust(self, port: int) -> None:
        self.trust_host = await serve(trust_app(self.tmp), self.tmp, port=port)


def trust_app(tmp: str) -> TrustApp:
    return TrustApp(
        TrustConfig(settings=TrustSettings(), synchronous="NORMAL", watch_queue=64),
        os.path.join(tmp, "trust"),
    )


@pytest.fixture
async def loop_(registry_server, tmp_path) -> AsyncIterator[Loop]:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    trust_host = await serve(trust_app(tmp), os.path.join(tmp, "trust"))
    broker_dir = os.path.join(tmp, "broker")
    config = BrokerConfig.from_env(
        broker_dir,
        env={
            "REGISTRY_ADDR": registry_server.address,
            "TRUST_ADDR": trust_host.address,
            # Every route sees the registry's latest numbers.
            "BROKER_CANDIDATE_TTL_S": "0",
            "BROKER_OUTBOX_MAX_BACKOFF_S": "0.2",
        },
    )
    broker_app = BrokerApp(config, broker_dir)
    broker_host = await serve(broker_app, broker_dir)
    agents: list[Agent] = []

    async def start_agent(agent_id: str, caps: list[str], *faults: str, **kwargs) -> Agent:  # type: ignore[no-untyped-def]
        agent = Agent(
            agent_id,
            registry=registry_server.address,
            capabilities=caps,
            data_dir=os.path.join(tmp, "agents", agent_id),
            faults=FaultPlan.parse(faults),
            **kwargs,
        )
        await agent.start()
        agents.append(agent)
        await asyncio.wait_for(agent.registered.wait(), 10)
        return agent

    loop = Loop(
        tmp,
        registry_server.address,
        trust_host,
        broker_host,
        broker_app,
        BrokerClient(broker_host.address),
        RegistryClient(registry_server.address),
        TrustClient(trust_host.address),
        start_agent,
    )
    try:
        yield loop
    finally:
        for agent in agents:
            await agent.stop()
        for client in (loop.broker, loop.registry, loop.trust):
            await client.close()
        await broker_host.stop(grace_s=0.5)
        await loop.trust_host.stop(grace_s=0.5)


async def reports_delivered(loop: Loop) -> bool:
    return loop.broker_app.outbox.pending() == 0


async def test_guide_2_2_best_agents_sorted_by_fitness(loop_: Loop) -> None:
    for i in range(7):
        await loop_.start_agent(f"db-{i}", ["database.query"])
    # Give the agents different measured latencies, as receipts would.
    for i in range(7):
        await loop_.registry.report_outcome(f"db-{i}", success=i % 3 != 0, latency_ms=10.0 * i)
    found = await loop_.registry.find_by_capability("database.query", top_k=5)
    fitness = [a.fitness for a in found.agents]
    assert len(found.agents) == 5
    assert fitness == sorted(fitness, reverse=True)
    route = await loop_.broker.route("database.query", strategy="best_fit")
    ranked = [c.fitness for c in route.ranking]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 7
    assert route.chosen.agent.agent_id == found.agents[0].card.agent_id
    assert "highest fitness" in route.reason


async def test_guide_2_3_each_strategy_picks_by_a_real_difference(loop_: Loop) -> None:
    """Two agents whose differences are real: one fails every command at
    once (fast, unreliable), the other takes 150 ms (slow, reliable). After
    a few commands the registry has measured both from receipts."""
    await loop_.start_agent("quick-flaky", ["compute"], "fail")
    await loop_.start_agent("slow-steady", ["compute"], "slow:150")
    for _ in range(4):
        await loop_.broker.execute("compute", ["sum", "1", "2"], strategy="round_robin")
    await eventually(lambda: reports_delivered(loop_), what="reports delivered")

    async def measured() -> bool:
        agents = {a.card.agent_id: a async for a in loop_.registry.iter_agents()}
        return all(a.outcomes_observed >= 2 for a in agents.values())

    await eventually(measured, what="both agents measured")
    agents = {a.card.agent_id: a async for a in loop_.registry.iter_agents()}
    assert agents["slow-steady"].latency_ms > 100 > agents["quick-flaky"].latency_ms
    assert agents["slow-steady"].reliability > agents["quick-flaky"].reliability

    fastest = await loop_.broker.route("compute", strategy="min_latency")
    assert fastest.chosen.agent.agent_id == "quick-flaky"
    assert "lowest latency" in fastest.reason
    steadiest = await loop_.broker.route("compute", strategy="max_reliability")
    assert steadiest.chosen.agent.agent_id == "slow-steady"
    assert "reliability" in steadiest.reason

    async def best_fit_is_steady() -> bool:
        route = await loop_.broker.route("compute", strategy="best_fit")
        fit = {c.agent.agent_id: c.fitness for c in route.ranking}
        return route.chosen.agent.agent_id == "slow-steady" and fit["slow-steady"] == max(
            fit.values()
        )

    # Fitness includes the agents' self-reported health, which arrives by heartbeat.
    await eventually(best_fit_is_steady, what="BEST_FIT choosing the reliable agent")


async def test_guide_2_3_least_loaded_and_round_robin(loop_: Loop) -> None:
    await loop_.start_agent("worker-a", ["compute"])
    await loop_.start_agent("worker-b", ["compute"])
    # A long command through the broker keeps worker-a busy (ties go by id).
    long_call = asyncio.create_task(
        loop_.broker.execute("compute", ["wait", "1500"], strategy="least_loaded")
    )

    async def busy() -> bool:
        route = await loop_.broker.route("compute", strategy="least_loaded")
        return {c.agent.agent_id: c.broker_inflight for c in route.ranking}.get("worker-a") == 1

    await eventually(busy, what="worker-a busy")
    route = await loop_.broker.route("compute", strategy="least_loaded")
    assert route.chosen.agent.agent_id == "worker-b"
    assert "0/8" in route.reason and "1/8" in route.reason
    quick = await loop_.broker.execute("compute", ["sum", "2", "3"], strategy="least_loaded")
    assert quick.receipt.agent_id == "worker-b"
    assert json.loads(quick.output)["sum"] == 5.0
    long_done = await long_call
    assert long_done.receipt.agent_id == "worker-a" and long_done.receipt.success
    turns = [
        (
            await loop_.broker.execute("compute", ["sum", "1"], strategy="round_robin")
        ).receipt.agent_id
        for _ in range(4)
    ]
    assert turns == ["worker-a", "worker-b", "worker-a", "worker-b"]


async def test_guide_2_4_receipt_is_signed_by_agent_and_broker(loop_: Loop) -> None:
    agent = await loop_.start_agent("db-agent", ["database.query"])
    session_id = "session-2-4"
    response = await loop_.broker.execute(
        "database.query",
        ["SELECT * FROM users WHERE active = true"],
        session_id=session_id,
        strategy="best_fit",
    )
    receipt = response.receipt
    assert receipt.session_id == session_id
    assert receipt.duration_ms > 0 and receipt.success and receipt.attempts == 1
    assert receipt.agent_id == "db-agent" and receipt.capability == "database.query"
    assert receipt.command_id.startswith("req-")
    assert receipt.start_time.ToNanoseconds() < receipt.finish_time.ToNanoseconds()
    assert '"rows"' in response.output
    identity = await loop_.broker.identity()
    assert verify_broker_signature(receipt, identity.public_key)
    assert verify_agent_signature(receipt, agent.identity.public_key)
    assert receipt.agent_receipt.agent_id == "db-agent"
    tampered = broker_pb2.ExecutionReceipt()
    tampered.CopyFrom(receipt)
    tampered.duration_ms += 1
    assert not verify_broker_signature(tampered, identity.public_key)
    listed = [r async for r in loop_.broker.iter_receipts(session_id=session_id)]
    assert [r.command_id for r in listed] == [receipt.command_id]
    assert listed[0] == receipt
    got = await loop_.broker.get_receipt(receipt.command_id)
    assert got.receipt == receipt and got.output == response.output
    # The loop closes: trust and the registry hear about it.
    await eventually(lambda: reports_delivered(loop_), what="reports delivered")
    score = await loop_.trust.score("broker", "db-agent")
    assert score.observations == 1 and score.score == pytest.approx(0.8)
    assert (await loop_.registry.get_agent("db-agent")).outcomes_observed == 1


async def test_forged_receipts_are_recorded_as_failures(loop_: Loop) -> None:
    await loop_.start_agent("forger", ["compute"], "forge-receipts")
    before = await loop_.registry.get_agent("forger")
    response = await loop_.broker.execute("compute", ["sum", "1", "2"])
    receipt = response.receipt
    assert not receipt.success and response.output == ""
    assert receipt.attempt_log[0].result == "BAD_SIGNATURE"
    assert not verify_agent_signature(receipt, before.card.public_key)
    identity = await loop_.broker.identity()
    assert verify_broker_signature(receipt, identity.public_key)  # the broker's verdict stands
    await eventually(lambda: reports_delivered(loop_), what="reports delivered")
    score = await loop_.trust.score("broker", "forger")
    assert score.score < 0.5 and score.negative_evidence == pytest.approx(1.0)
    after = await loop_.registry.get_agent("forger")
    assert after.reliability < before.reliability


async def test_refused_arguments_cost_the_agent_nothing(loop_: Loop) -> None:
    """A typo is the caller's: the agent refuses it before running anything,
    the receipt says so and still verifies, and trust and the registry hear
    only of the command that ran."""
    await loop_.start_agent("calc", ["compute"])
    before = await loop_.registry.get_agent("calc")
    refused = (await loop_.broker.execute("compute", ["fib", "abc"])).receipt
    assert not refused.success and refused.attempts == 1
    assert [a.result for a in refused.attempt_log] == ["INVALID_ARGUMENT"]
    assert "refused the arguments" in refused.error and "integer" in refused.error
    identity = await loop_.broker.identity()
    assert verify_broker_signature(refused, identity.public_key)
    assert not verify_agent_signature(refused)  # nothing ran, so nothing signed
    ran = (await loop_.broker.execute("compute", ["fib", "10"])).receipt
    assert ran.success
    await eventually(lambda: reports_delivered(loop_), what="reports delivered")
    score = await loop_.trust.score("broker", "calc")
    assert score.observations == 1 and score.negative_evidence == 0
    after = await loop_.registry.get_agent("calc")
    assert after.outcomes_observed == before.outcomes_observed + 1


async def test_a_retried_request_returns_the_same_receipt(loop_: Loop) -> None:
    agent = await loop_.start_agent("once", ["compute"])
    first = await loop_.broker.execute("compute", ["sum", "4"], request_id="retry-me")
    again = await loop_.broker.execute("compute", ["sum", "4"], request_id="retry-me")
    assert not first.duplicate and again.duplicate
    assert again.receipt == first.receipt and again.output == first.output
    assert agent.executed == 1
    assert first.receipt.command_id == "retry-me"


async def test_bad_input_and_routing_errors(loop_: Loop) -> None:
    await loop_.start_agent("sick", ["ml.inference"], "unhealthy")
    await loop_.start_agent("fine", ["compute"])
    with pytest.raises(errors.NotFound) as not_found:
        await loop_.broker.execute("quantum.teleport", [])
    assert not_found.value.field == "capability" and "quantum.teleport" in not_found.value.message

    async def sick_not_passing() -> bool:
        return (await loop_.registry.get_agent("sick")).status != 1

    await eventually(sick_not_passing, what="the unhealthy agent leaving passing")
    with pytest.raises(errors.Unavailable) as unavailable:
        await loop_.broker.route("ml.inference")
    assert "no passing agent" in unavailable.value.message
    cases = [
        (dict(deadline_s=-1.0), "deadline"),
        (dict(deadline_s=0.001), "deadline"),
        (dict(deadline_s=10**7), "deadline"),
        (dict(max_attempts=50), "max_attempts"),
        (dict(session_id="not a session"), "session_id"),
        (dict(request_id="no/slashes"), "request_id"),
    ]
    for kwargs, field in cases:
        with pytest.raises(errors.InvalidArgument) as info:
            await loop_.broker.execute("compute", [], timeout_s=5, **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field, kwargs
    with pytest.raises(errors.InvalidArgument) as info:
        await loop_.broker._unary(
            loop_.broker.stub.Route, broker_pb2.RouteRequest(capability="compute", strategy=42)
        )
    assert info.value.field == "strategy"
    with pytest.raises(errors.InvalidArgument):
        await loop_.broker.execute("compute", ["x"] * 257)
    with pytest.raises(errors.NotFound):
        await loop_.broker.get_receipt("cmd-nope")
    raw = loop_.broker.channel.unary_unary("/agent2028.broker.v1.BrokerService/ExecuteDistributed")
    with pytest.raises(grpc.aio.AioRpcError) as raw_info:
        await raw(b"\xff\x01", timeout=5)
    assert raw_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r async for r in loop_.broker.iter_receipts()] == []


async def test_a_trust_outage_neither_fails_calls_nor_loses_evidence(loop_: Loop) -> None:
    await loop_.start_agent("worker", ["compute"])
    port = loop_.trust_host.port
    await loop_.trust_host.stop(grace_s=0)
    responses = [await loop_.broker.execute("compute", ["sum", str(i)]) for i in range(3)]
    assert all(r.receipt.success for r in responses)
    await eventually(lambda: loop_.broker_app.outbox.retries > 0, what="the outbox retrying")
    assert loop_.broker_app.outbox.pending() >= 3
    await loop_.start_trust(port)

    async def delivered() -> bool:
        return (await loop_.trust.score("broker", "worker")).observations == 3

    await eventually(delivered, timeout_s=20, what="evidence delivered after the outage")
    await eventually(lambda: reports_delivered(loop_), what="outbox empty")


async def test_a_slow_agent_times_out_and_the_next_one_answers(loop_: Loop) -> None:
    await loop_.start_agent("a-sluggish", ["compute"], "slow:3000")
    await loop_.start_agent("b-brisk", ["compute"])
    # Equal on paper (ties go by id): the sluggish agent is tried first and
    # gets half of the 2 s deadline before the broker moves on.
    response = await loop_.broker.execute(
        "compute", ["sum", "1"], strategy="min_latency", deadline_s=2.0, max_attempts=2
    )
    receipt = response.receipt
    assert receipt.success and receipt.attempts == 2 and receipt.agent_id == "b-brisk"
    assert [a.result for a in receipt.attempt_log] == ["DEADLINE_EXCEEDED", "OK"]
    assert 900 < receipt.attempt_log[0].duration_ms < 1500
    await eventually(lambda: reports_delivered(loop_), what="reports delivered")
    timeout = await loop_.trust.score("broker", "a-sluggish")
    assert timeout.score == pytest.approx(0.32) and timeout.negative_evidence == pytest.approx(0.3)
    measured = await loop_.registry.get_agent("a-sluggish")
    assert measured.latency_ms > 900 and measured.reliability < 0.9
