"""The agent runtime against a real registry: registration, heartbeats,
execution with signed receipts, re-registration, custom handlers, faults."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from clients import errors
from clients.agent import Agent, FaultPlan, HandlerError
from clients.agent_client import AgentClient, verify_receipt
from clients.registry import RegistryClient
from services.registry.config import RegistryConfig
from services.registry.servicer import RegistryApp
from tests.conftest import FAST_REGISTRY
from tests.support import eventually, serve


@pytest.fixture
async def agents(registry_server, tmp_path):  # type: ignore[no-untyped-def]
    started: list[Agent] = []

    async def start(agent_id: str, caps: list[str], **kwargs) -> Agent:  # type: ignore[no-untyped-def]
        agent = Agent(
            agent_id,
            registry=registry_server.address,
            capabilities=caps,
            data_dir=os.path.join(str(tmp_path), agent_id),
            **kwargs,
        )
        await agent.start()
        started.append(agent)
        await asyncio.wait_for(agent.registered.wait(), 10)
        return agent

    yield start
    for agent in started:
        await agent.stop()


async def test_agent_registers_and_heartbeats(agents, registry_server) -> None:  # type: ignore[no-untyped-def]
    agent = await agents("agent-1", ["database.query", "compute"])
    async with RegistryClient(registry_server.address) as client:
        record = await client.get_agent("agent-1")
        assert record.card.address == agent.address
        assert list(record.card.capabilities) == ["database.query", "compute"]
        assert record.card.public_key == agent.identity.public_key
        first = record.last_heartbeat_time.ToNanoseconds()
        await eventually(
            lambda: registry_server.core.agents["agent-1"].last_heartbeat_wall * 1e9 > first + 1e8,
            what="heartbeats",
            timeout_s=5,
        )


async def test_execute_builtins_with_verifiable_receipts(agents) -> None:  # type: ignore[no-untyped-def]
    agent = await agents("agent-1", ["database.query", "ml.inference", "compute"])
    async with AgentClient(agent.address) as client:
        response = await client.execute(
            "database.query",
            ["SELECT count(*) FROM users WHERE active = 1"],
            command_id="c-1",
            session_id="s-1",
            timeout_s=5,
        )
        assert response.receipt.success and response.receipt.session_id == "s-1"
        assert response.receipt.duration_ms > 0
        assert json.loads(response.output)["rows"][0][0] > 0
        assert verify_receipt(response, agent.identity.public_key)
        tampered = type(response)()
        tampered.CopyFrom(response)
        tampered.receipt.success = False
        assert not verify_receipt(tampered, agent.identity.public_key)
        inference = await client.execute(
            "ml.inference", ["6.6", "3.0", "5.6", "2.0"], command_id="c-2", timeout_s=5
        )
        assert json.loads(inference.output)["class"] == "virginica"
        # Malformed arguments are the caller's mistake: refused before
        # anything runs, with no receipt to count against the agent.
        with pytest.raises(errors.InvalidArgument) as refused:
            await client.execute(
                "compute", ["primes", "not-a-number"], command_id="c-3", timeout_s=5
            )
        assert (refused.value.field, refused.value.reason) == ("args", "ARGUMENTS_REFUSED")
        assert "integer" in refused.value.message
        # A command that ran and failed is a signed receipt with success false.
        failed = await client.execute(
            "database.query", ["SELECT * FROM no_such_table"], command_id="c-4", timeout_s=5
        )
        assert not failed.receipt.success and "no such table" in failed.receipt.error
        assert verify_receipt(failed, agent.identity.public_key)
        ping = await client.ping(timeout_s=5)
        assert ping.agent_id == "agent-1" and ping.max_concurrency == 8


async def test_execute_bad_input(agents) -> None:  # type: ignore[no-untyped-def]
    agent = await agents("agent-1", ["compute", "gpu"])
    async with AgentClient(agent.address) as client:
        with pytest.raises(errors.NotFound) as err:
            await client.execute("database.query", ["SELECT 1"], command_id="c-1", timeout_s=5)
        assert err.value.field == "capability"
        with pytest.raises(errors.FailedPrecondition) as err:
            await client.execute("gpu", [], command_id="c-2", timeout_s=5)
        assert err.value.reason == "NO_HANDLER"
        with pytest.raises(errors.InvalidArgument) as err:
            await client.execute("compute", ["sum", "1"], command_id="", timeout_s=5)
        assert err.value.field == "command_id"
        with pytest.raises(errors.InvalidArgument) as err:
            await client.execute("compute", ["x"] * 300, command_id="c-3", timeout_s=5)
        assert err.value.field == "args"


async def test_a_full_agent_is_resource_exhausted(agents) -> None:  # type: ignore[no-untyped-def]
    agent = await agents("agent-1", ["compute"], max_concurrency=2)
    async with AgentClient(agent.address) as client:
        slow = [
            asyncio.create_task(
                client.execute("compute", ["wait", "500"], command_id=f"w-{i}", timeout_s=5)
            )
            for i in range(2)
        ]
        await eventually(lambda: agent.inflight == 2, what="two commands in flight")
        with pytest.raises(errors.ResourceExhausted) as err:
            await client.execute("compute", ["sum", "1"], command_id="over", timeout_s=5)
        assert err.value.reason == "AGENT_BUSY"
        assert all(r.receipt.success for r in await asyncio.gather(*slow))


async def test_heartbeats_report_load(agents, registry_server) -> None:  # type: ignore[no-untyped-def]
    agent = await agents("agent-1", ["compute"], max_concurrency=4)
    async with AgentClient(agent.address) as client:
        task = asyncio.create_task(
            client.execute("compute", ["wait", "1500"], command_id="long", timeout_s=5)
        )
        await eventually(
            lambda: registry_server.core.agents["agent-1"].load == 1,
            what="load 1 reported",
            timeout_s=5,
        )
        await task
    await eventually(
        lambda: registry_server.core.agents["agent-1"].load == 0, what="load back to 0", timeout_s=5
    )


async def test_custom_handlers_sync_and_async(registry_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    agent = Agent("text-1", registry=registry_server.address, data_dir=str(tmp_path))

    @agent.handler("text.upper")
    async def upper(args, ctx):  # type: ignore[no-untyped-def]
        return " ".join(args).upper()

    @agent.handler("text.count")
    def count(args):  # type: ignore[no-untyped-def]
        if not args:
            raise HandlerError("nothing to count")
        return len(" ".join(args))

    await agent.start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert set(registry_server.core.agents["text-1"].capabilities) == {
            "text.upper",
            "text.count",
        }
        async with AgentClient(agent.address) as client:
            assert (
                json.loads(
                    (
                        await client.execute(
                            "text.upper", ["hi", "there"], command_id="u", timeout_s=5
                        )
                    ).output
                )
                == "HI THERE"
            )
            assert (
                json.loads(
                    (
                        await client.execute("text.count", ["abc"], command_id="n", timeout_s=5)
                    ).output
                )
                == 3
            )
            empty = await client.execute("text.count", [], command_id="e", timeout_s=5)
            assert not empty.receipt.success and empty.receipt.error == "nothing to count"
    finally:
        await agent.stop()


async def test_agent_reregisters_after_the_registry_restarts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = RegistryConfig(settings=FAST_REGISTRY, sweep_interval_s=0.02, watch_queue=64)
    host = await serve(RegistryApp(config), str(tmp_path))
    port = host.port
    agent = Agent(
        "agent-1", registry=host.address, capabilities=["compute"], data_dir=str(tmp_path)
    )
    await agent.start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        await host.stop(grace_s=0)
        host = await serve(RegistryApp(config), str(tmp_path), port=port)
        await eventually(
            lambda: "agent-1" in host.app.core.agents, timeout_s=5, what="re-registration"
        )
        # The registry records the agent before the agent reads the response.
        await eventually(lambda: agent.registrations == 2, timeout_s=5, what="agent counted it")
    finally:
        await agent.stop()
        await host.stop()


async def test_fault_modes(agents) -> None:  # type: ignore[no-untyped-def]
    failing = await agents("fails", ["compute"], faults=FaultPlan.parse(["fail"]))
    forging = await agents("forges", ["compute"], faults=FaultPlan.parse(["forge-receipts"]))
    slow = await agents("slow", ["compute"], faults=FaultPlan.parse(["slow:300"]))
    async with AgentClient(failing.address) as client:
        result = await client.execute("compute", ["sum", "1"], command_id="f", timeout_s=5)
        assert not result.receipt.success and verify_receipt(result, failing.identity.public_key)
    async with AgentClient(forging.address) as client:
        result = await client.execute("compute", ["sum", "1"], command_id="g", timeout_s=5)
        assert result.receipt.success and not verify_receipt(result, forging.identity.public_key)
    async with AgentClient(slow.address) as client:
        result = await client.execute("compute", ["sum", "1"], command_id="s", timeout_s=5)
        assert result.receipt.duration_ms >= 300
        with pytest.raises(errors.DeadlineExceeded):
            await client.execute("compute", ["sum", "1"], command_id="t", timeout_s=0.1)


async def test_an_unhealthy_agent_leaves_the_default_lookup(agents, registry_server) -> None:  # type: ignore[no-untyped-def]
    await agents("healthy", ["compute"])
    await agents("sick", ["compute"], faults=FaultPlan.parse(["unhealthy"]))
    async with RegistryClient(registry_server.address) as client:

        async def only_healthy() -> bool:
            found = await client.find_by_capability("compute", top_k=5)
            return [a.card.agent_id for a in found.agents] == ["healthy"]

        await eventually(only_healthy, timeout_s=5, what="sick agent excluded")
        everyone = await client.find_by_capability("compute", top_k=5, include_unhealthy=True)
        assert {a.card.agent_id for a in everyone.agents} == {"healthy", "sick"}


async def test_agent_deregisters_on_stop(registry_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(
        "leaving",
        registry=registry_server.address,
        capabilities=["compute"],
        data_dir=str(tmp_path),
    )
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 10)
    await agent.stop()
    assert "leaving" not in registry_server.core.agents


async def test_same_id_with_another_key_does_not_take_over(
    agents, registry_server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    original = await agents("twin", ["compute"])
    impostor = Agent(
        "twin",
        registry=registry_server.address,
        capabilities=["compute"],
        data_dir=os.path.join(str(tmp_path), "other"),
    )
    await impostor.start()
    try:
        await eventually(
            lambda: isinstance(impostor.last_membership_error, errors.AlreadyExists),
            timeout_s=5,
            what="impostor refused",
        )
        assert not impostor.registered.is_set()
        assert registry_server.core.agents["twin"].address == original.address
    finally:
        await impostor.stop(deregister=False)
