"""The orchestrator over gRPC in front of every real service (all in this
process, on port 0) and real agents: each operation kind really carried out,
the bridge flows (auction -> broker -> receipt -> task completed -> trust; a
decided pool -> a hive-mind belief), fail-fast on a service that is down,
idempotent retries, the event bus (filters, order, resuming, slow
subscribers) and bad input answered with canonical codes naming the field."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agent2028.market.v1 import market_pb2
from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from agent2028.swarm.v1 import swarm_pb2
from clients import errors
from clients.broker import BrokerClient, verify_agent_signature
from clients.consensus import ConsensusClient, certificate_problems
from clients.market import MarketClient
from clients.orchestrator import OrchestratorClient
from clients.stigmergy import StigmergyClient, deposit_request
from clients.swarm import SwarmClient
from clients.trust import TrustClient
from services.common import signing
from tests.orchestrator_support import Stack, subscriber
from tests.support import eventually

SUCCEEDED = pb.OPERATION_STATUS_SUCCEEDED


@pytest.fixture
async def stack(registry_server, tmp_path) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    s = Stack(registry_server.address, str(tmp_path))
    try:
        await s.start()
        yield s
    finally:
        await s.stop()


async def recent(o: OrchestratorClient, *types: str) -> list[pb.Event]:
    """The retained events of these types (the bus's history, oldest first)."""
    out: list[pb.Event] = []
    async for response in o.subscribe(types, from_oldest=True):
        out.extend(response.events)
        if response.caught_up:
            return out
    return out


def client(stack: Stack) -> OrchestratorClient:
    assert stack.orchestrator is not None
    return stack.orchestrator


# --- operations ----------------------------------------------------------------------


async def test_execute_routes_through_the_broker_and_a_retry_runs_nothing_twice(
    stack: Stack,
) -> None:
    agent = await stack.start_agent("worker-1", ["compute"], vote=None, bid=False)
    o = client(stack)
    first = await o.execute("compute", ["fib", "30"], request_id="exec-1", session_id="s1")
    op = first.operation
    assert op.status == SUCCEEDED and not first.duplicate
    assert (op.kind, op.tier) == (pb.OPERATION_KIND_EXECUTE, pb.TIER_INDIVIDUAL)
    assert list(op.services) == ["registry", "broker"]
    receipt = op.execute.receipt
    assert receipt.agent_id == "worker-1" and receipt.command_id == "exec-1.exec"
    assert verify_agent_signature(receipt) and '"832040"' in op.execute.output
    again = await o.execute("compute", ["fib", "30"], request_id="exec-1", session_id="s1")
    assert again.duplicate and again.operation == op
    assert agent.executed == 1
    # Two at once with one request id: one runs, the other joins it.
    both = await asyncio.gather(
        *(o.execute("compute", ["fib", "20"], request_id="exec-twice") for _ in range(2))
    )
    assert sorted(r.duplicate for r in both) == [False, True]
    assert both[0].operation == both[1].operation and agent.executed == 2
    # The same request id for another operation is refused, naming the field.
    with pytest.raises(errors.AlreadyExists) as err:
        await o.execute("compute", ["fib", "31"], request_id="exec-1")
    assert err.value.field == "request_id"
    assert (await o.get_operation("exec-1")) == op
    page = await o.list_operations()
    assert [x.request_id for x in page.operations] == ["exec-twice", "exec-1"]
    # A failing command is a FAILED outcome, not an error status.
    failing = await o.execute("compute", ["no-such-op"], request_id="exec-2")
    assert failing.operation.status == pb.OPERATION_STATUS_FAILED
    assert not failing.operation.execute.receipt.success


async def test_guide_8_1_execute_with_consensus_over_the_network(stack: Stack) -> None:
    """Ten agents with test.command, three of them Byzantine-silent: the
    coordinator proposes, the seven honest agents vote by themselves, the
    command runs on consensus through the broker, and the coordinator's
    trust in the agent that ran it rises above 0.5."""

    def test_command(args: list[str]) -> dict[str, object]:
        return {"ran": "test.command", "args": args}

    for i in range(10):
        await stack.start_agent(
            f"agent-{i}",
            ["test.command"],
            faults=["silent"] if i >= 7 else (),
            bid=False,
            handlers={"test.command": test_command},
        )
    o = client(stack)
    response = await o.execute_with_consensus(
        "test.command",
        ["integration-test"],
        coordinator_id="test-coordinator",
        voting_period_s=10,
        request_id="guide-8-1",
        timeout_s=30,
    )
    op = response.operation
    assert op.status == SUCCEEDED, op.message
    result = op.execute_with_consensus
    proposal = result.proposal
    assert proposal.operation == "test.command" and proposal.proposer_id == "test-coordinator"
    assert proposal.tally.electorate_size == 10 and proposal.tally.quorum == 7
    assert not certificate_problems(proposal)
    voters = {v.voter_id for v in proposal.certificate.votes}
    assert len(voters) >= 7 and not voters & {"agent-7", "agent-8", "agent-9"}
    async with ConsensusClient(stack.address("consensus")) as consensus:
        assert (await consensus.has_consensus(proposal.proposal_id, 10)).reached
    receipt = result.receipt
    assert receipt.success and receipt.duration_ms > 0 and verify_agent_signature(receipt)
    assert receipt.capability == "test.command"
    trust = result.coordinator_trust
    assert (trust.observer_id, trust.subject_id) == ("test-coordinator", receipt.agent_id)
    assert trust.score > 0.5 and not result.observation_error
    async with TrustClient(stack.address("trust")) as t:
        assert (await t.score("test-coordinator", receipt.agent_id)).score > 0.5


async def test_a_rejected_proposal_executes_nothing(stack: Stack) -> None:
    for i in range(4):
        await stack.start_agent(f"voter-{i}", ["compute"], vote="reject" if i else "approve")
    o = client(stack)
    response = await o.execute_with_consensus(
        "compute", ["fib", "10"], voting_period_s=5, request_id="reject-me", timeout_s=20
    )
    op = response.operation
    assert op.status == pb.OPERATION_STATUS_REJECTED, op.message
    assert "nothing executed" in op.message
    assert not op.execute_with_consensus.HasField("receipt")
    assert op.execute_with_consensus.proposal.status == 3  # REJECTED, with its certificate
    async with BrokerClient(stack.address("broker")) as broker:
        with pytest.raises(errors.NotFound):
            await broker.get_receipt("reject-me.exec")
    assert all(a.executed == 0 for a in stack.agents.values())


async def test_allocate_runs_the_winner_through_the_broker_and_trust_follows(
    stack: Stack,
) -> None:
    """auction -> broker (pinned to the winner) -> signed receipt -> the market
    completes the task -> the broker's report moves trust. The winner's own
    bidding behaviour does not run the task: the bridge does, through the broker."""
    for i in range(3):
        await stack.start_agent(f"bidder-{i}", ["compute"], vote=None)
    o = client(stack)
    events, _, stop = await subscriber(o, ["market.*", "bridge.*", "trust.changed"])
    try:
        response = await o.allocate(
            ["compute"], ["fib", "40"], bidding_window_s=0.5, request_id="alloc-1", timeout_s=30
        )
        op = response.operation
        assert op.status == SUCCEEDED, op.message
        task = op.allocate.task
        winner = task.assigned_agent_id
        assert task.state == market_pb2.TASK_STATE_COMPLETED and task.dispatch == 2
        assert task.task_id == "alloc-alloc-1" and '"102334155"' in task.output
        receipt = op.allocate.receipt
        assert receipt.agent_id == winner and receipt.success
        assert receipt.command_id == signing.task_command_id(task.task_id, 1)
        assert receipt.attempt_log[0].agent_id == winner and receipt.attempts == 1
        # Run once, by the winner, through the broker: not by its bidding behaviour.
        assert stack.agents[winner].executed == 1
        market_behaviour = stack.behaviours[winner][0]
        # Its bidding behaviour learns it won (on its own stream) and leaves
        # the task to the bridge.
        await eventually(lambda: market_behaviour.won == 1, what="the winner hearing it won")
        assert market_behaviour.completed == 0
        assert sum(a.executed for a in stack.agents.values()) == 1

        async def trust_moved() -> bool:
            return any(
                e.type == "trust.changed"
                and e.attributes["subject_id"] == winner
                and e.attributes["observer_id"] == "broker"
                for e in events
            )

        await eventually(trust_moved, what="the broker's report reaching trust")
        async with TrustClient(stack.address("trust")) as t:
            assert (await t.score("broker", winner)).score > 0.5
        types = [e.type for e in events if e.subject == task.task_id]
        for expected in ("market.task_listed", "market.auction_won", "bridge.dispatched"):
            assert expected in types
        await eventually(
            lambda: (
                "bridge.settled" in [e.type for e in events]
                and "market.task_completed" in [e.type for e in events]
            ),
            what="the settlement events",
        )
    finally:
        await stop()


async def test_a_failed_attempt_is_relisted_and_settled_by_the_next_winner(stack: Stack) -> None:
    # The flaky bidder bids next to nothing (it wins first) and fails every
    # command: its own signed failure receipt fails the attempt.
    await stack.start_agent("flaky", ["compute"], faults=["lie-bids", "fail"], vote=None)
    await stack.start_agent("steady", ["compute"], vote=None)
    async with MarketClient(stack.address("market")) as market:
        response = await client(stack).allocate(
            ["compute"], ["fib", "12"], bidding_window_s=0.5, max_attempts=3, timeout_s=30
        )
        op = response.operation
        assert op.status == SUCCEEDED, op.message
        task = await market.get_task(op.allocate.task.task_id)
    outcomes = [(a.agent_id, a.outcome) for a in task.assignments]
    assert outcomes == [
        ("flaky", market_pb2.TASK_STATE_FAILED),
        ("steady", market_pb2.TASK_STATE_COMPLETED),
    ]
    assert task.excluded_agent_ids == ["flaky"] and "fault fail" in task.assignments[0].error
    # Each attempt was run once, through the broker, by its winner.
    assert stack.agents["flaky"].executed == 1 and stack.agents["steady"].executed == 1


async def test_collective_decision_becomes_a_belief(stack: Stack) -> None:
    """The guide's 5.1 voters; the decided pool is adopted by the hive mind."""
    for agent_id, vote in (("v1", "approve:0.9"), ("v2", "approve:0.8"), ("v3", "reject:0.6")):
        await stack.start_agent(agent_id, ["compute"], vote=None, bid=False, pool_vote=vote)
    o = client(stack)
    async with SwarmClient(stack.address("swarm")) as swarm:
        before = (await swarm.get_hive()).generation
        response = await o.collective_decision(
            "scale_infrastructure",
            threshold="super",
            duration_s=15.0,
            min_votes=3,
            adopt=True,
            settle_early=True,
            request_id="decide-1",
            timeout_s=30,
        )
        op = response.operation
        assert op.status == SUCCEEDED, op.message
        result = op.collective_decision
        assert result.pool.decision == "approve" and result.pool.vote_count == 3
        assert result.pool.confidence == pytest.approx(1.7 / 2.3, abs=1e-3)
        assert result.adopted.decision == "approve" and result.hive_generation > before
        hive = await swarm.get_hive()
        beliefs = {b.name: b.confidence for b in hive.beliefs}
        assert beliefs["scale_infrastructure:approve"] == pytest.approx(0.739, abs=1e-3)


async def test_the_bridge_adopts_pools_created_elsewhere(stack: Stack) -> None:
    for agent_id in ("w1", "w2"):
        await stack.start_agent(agent_id, ["compute"], vote=None, bid=False, pool_vote="deploy")
    async with SwarmClient(stack.address("swarm")) as swarm:
        pool = await swarm.create_pool("rollout", duration_s=3.0, min_votes=2)

        async def adopted() -> bool:
            hive = await swarm.get_hive()
            return any(b.name == "rollout:deploy" for b in hive.beliefs)

        await eventually(adopted, timeout_s=15, what="the bridge adopting the pool")
        assert (await swarm.get_pool(pool.pool_id)).status == swarm_pb2.POOL_STATUS_DECIDED


async def test_signal_deposits_a_signed_trace(stack: Stack) -> None:
    agent = await stack.start_agent("scout-001", ["compute"], vote=None, bid=False)
    o = client(stack)
    events, _, stop = await subscriber(o, ["stigmergy.*"])
    try:
        deposit = deposit_request(agent.identity, 500, 500, "food_source", 4.0, request_id="d1")
        response = await o.signal(deposit, request_id="signal-1")
        op = response.operation
        assert op.status == SUCCEEDED and op.signal.deposit.intensity == pytest.approx(4.0)
        async with StigmergyClient(stack.address("stigmergy")) as field:
            assert await field.read(500, 500, "food_source") > 0
        await eventually(
            lambda: {"stigmergy.signal", "stigmergy.layer_active"} <= {e.type for e in events},
            what="the signal and the new layer on the bus",
        )
        # A forged deposit (another agent's key) is refused by stigmergy, and
        # the error names the field and the service.
        forged = deposit_request(agent.identity, 1, 1, "food_source", 1.0)
        forged.agent_id = "someone-else"
        with pytest.raises((errors.NotFound, errors.Unauthenticated)) as err:
            await o.signal(forged)
        assert err.value.metadata.get("service") == "stigmergy"
    finally:
        await stop()


# --- tier health ------------------------------------------------------------------------


async def test_an_operation_for_a_tier_that_is_down_fails_fast_naming_the_service(
    stack: Stack,
) -> None:
    await stack.start_agent("worker", ["compute"], vote=None)
    o = client(stack)
    events, _, stop = await subscriber(o, ["tier.*"])
    try:
        port = await stack.stop_service("market")

        async def market_down() -> bool:
            topo = await o.topology()
            return {s.name: s.status for s in topo.services}["market"] in (
                pb.SERVING_STATUS_UNREACHABLE,
                pb.SERVING_STATUS_NOT_SERVING,
            )

        await eventually(market_down, what="the orchestrator noticing the market is down")
        # Refused before anything starts (TIER_UNAVAILABLE, from the health
        # the orchestrator watches), not after trying the market; and not
        # after waiting: the operation may take 600 s, the call gives it 20.
        request = o.request(
            timeout_s=600, allocate=pb.AllocateOperation(requirements=["compute"], args=["fib"])
        )
        with pytest.raises(errors.Unavailable) as err:
            await o.submit(request, timeout_s=20)
        assert err.value.metadata["service"] == "market"
        assert err.value.reason == "TIER_UNAVAILABLE" and "needs market" in err.value.message
        assert not [e for e in await recent(o, "operation.*") if e.subject == request.request_id]
        topo = await o.topology()
        routes = {r.kind: r.available for r in topo.routes}
        assert routes[pb.OPERATION_KIND_ALLOCATE] is False
        assert routes[pb.OPERATION_KIND_EXECUTE] is True
        # The individual tier still works.
        assert (await o.execute("compute", ["fib", "5"])).operation.status == SUCCEEDED
        await stack.start_service("market", port=port)
        await eventually(
            lambda: [e.type for e in events if e.subject == "market"] == ["tier.down", "tier.up"],
            what="tier.down then tier.up for the market",
        )
        response = await o.allocate(["compute"], ["fib", "5"], bidding_window_s=0.3, timeout_s=20)
        assert response.operation.status == SUCCEEDED
    finally:
        await stop()


# --- the event bus ---------------------------------------------------------------------------


async def test_subscribers_get_only_their_types_in_order_and_resume_from_a_cursor(
    stack: Stack,
) -> None:
    o = client(stack)
    deploys, _, stop_deploys = await subscriber(o, ["app.deployed"])
    apps, _, stop_apps = await subscriber(o, ["app.*"])
    try:
        for i in range(5):
            await o.publish("app.deployed", attributes={"n": str(i)})
            await o.publish("app.note", summary=f"note {i}")
        await eventually(lambda: len(apps) == 10, what="ten app events")
        assert [e.attributes["n"] for e in deploys] == ["0", "1", "2", "3", "4"]
        assert {e.type for e in deploys} == {"app.deployed"}
        cursors = [e.cursor for e in apps]
        assert cursors == sorted(cursors) and len(set(cursors)) == 10
    finally:
        await stop_deploys()
        await stop_apps()
    # Reconnect from the third deployment's cursor: exactly the rest, in order.
    resume_at = deploys[2].cursor
    for i in range(5, 7):
        await o.publish("app.deployed", attributes={"n": str(i)})
    seen: list[str] = []
    async for response in o.subscribe(["app.deployed"], from_cursor=resume_at):
        seen.extend(e.attributes["n"] for e in response.events)
        if response.caught_up:
            break
    assert seen == ["3", "4", "5", "6"]
    # A retried publish is committed once.
    first = await o.publish("app.deployed", attributes={"n": "x"}, request_id="pub-1")
    again = await o.publish("app.deployed", attributes={"n": "x"}, request_id="pub-1")
    assert again.duplicate and again.event.cursor == first.event.cursor


async def test_a_slow_subscriber_never_stalls_publishers(registry_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = Stack(registry_server.address, str(tmp_path))
    try:
        # A tiny queue, a history that keeps everything published here.
        await stack.start(subscriber_queue=4, event_history=5000)
        o = client(stack)
        # About 62 KB an event (the attribute limits allow 64 KB).
        payload = {f"blob{k}": "x" * 2000 for k in range(31)}
        slow = o.subscribe(["app.load"])
        first = await anext(slow)  # subscribed, then it stops reading
        assert first.caught_up
        fast, _, stop_fast = await subscriber(o, ["app.load"])
        n = 300
        # ~19 MB: well beyond what the stream's buffers (a few MB) and the
        # queue can hold while nobody reads.
        for i in range(n):
            await asyncio.wait_for(
                o.publish("app.load", attributes={"i": str(i), **payload}), timeout=10
            )
        await eventually(lambda: len(fast) == n, what="the fast subscriber getting everything")
        await stop_fast()
        # The slow one reads now: it was told it lagged and, caught up from
        # the history, still got every event once, in order.
        got: list[int] = []
        lagged = False
        async with asyncio.timeout(30):
            async for response in slow:
                if response.HasField("lag"):
                    lagged = True
                    assert response.lag.missed == 0
                got.extend(int(e.attributes["i"]) for e in response.events)
                if len(got) >= n:
                    break
        await slow.aclose()
        assert lagged
        assert got == list(range(n))
        assert stack.app.bus.lags >= 1
    finally:
        await stack.stop()


async def test_watch_streams_are_aggregated_onto_the_bus(stack: Stack) -> None:
    o = client(stack)
    events, _, stop = await subscriber(o, ["agent.*", "consensus.*", "hive.*"])
    try:
        agent = await stack.start_agent("joiner", ["compute"], bid=False)
        async with ConsensusClient(stack.address("consensus")) as consensus:
            await consensus.propose(
                "rotate_keys", proposer_id="ops", voter_ids=["joiner"], voting_period_s=10
            )
        async with SwarmClient(stack.address("swarm")) as swarm:
            await swarm.propose_belief(agent.identity, "system_overloaded", 0.7)
        await agent.stop()
        del stack.agents["joiner"]
        expected = [
            "agent.joined",
            "consensus.proposed",
            "consensus.vote",
            "consensus.reached",
            "hive.belief_set",
            "agent.left",
        ]
        await eventually(
            lambda: all(t in [e.type for e in events] for t in expected),
            timeout_s=15,
            what="every kind of change on the bus",
        )
        order = [e.type for e in events if e.type in expected]
        assert (
            order.index("agent.joined") < order.index("consensus.vote") < order.index("agent.left")
        )
        assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    finally:
        await stop()


# --- bad input ---------------------------------------------------------------------------------


async def test_bad_input_gets_canonical_codes_naming_the_field(stack: Stack) -> None:
    o = client(stack)

    async def refused(request: pb.SubmitRequest) -> errors.ClientError:
        with pytest.raises(errors.ClientError) as err:
            await o.submit(request, timeout_s=10)
        assert err.value.code != grpc.StatusCode.INTERNAL
        return err.value

    # No operation at all (or one this orchestrator does not know).
    err = await refused(pb.SubmitRequest(request_id="nothing"))
    assert (err.code, err.field, err.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "operation",
        "UNKNOWN_OPERATION_KIND",
    )
    unknown = pb.SubmitRequest.FromString(
        pb.SubmitRequest(request_id="future").SerializeToString() + b"\xfa\x01\x00"
    )  # field 31: a kind from a newer client
    assert (await refused(unknown)).field == "operation"
    cases = [
        (pb.SubmitRequest(execute=pb.ExecuteOperation()), "execute.capability"),
        (pb.SubmitRequest(execute=pb.ExecuteOperation(capability="Bad Cap")), "execute.capability"),
        (
            pb.SubmitRequest(execute=pb.ExecuteOperation(capability="compute", strategy=42)),
            "execute.strategy",
        ),
        (pb.SubmitRequest(signal=pb.SignalOperation()), "signal.deposit"),
        (
            pb.SubmitRequest(collective_decision=pb.CollectiveDecisionOperation(topic="t")),
            "collective_decision.duration",
        ),
        (
            pb.SubmitRequest(
                collective_decision=pb.CollectiveDecisionOperation(duration={"seconds": 1})
            ),
            "collective_decision.topic",
        ),
        (pb.SubmitRequest(allocate=pb.AllocateOperation()), "allocate.requirements"),
        (
            pb.SubmitRequest(
                allocate=pb.AllocateOperation(requirements=["compute", "gpu"], args=["x"])
            ),
            "allocate.capability",
        ),
        (
            pb.SubmitRequest(
                execute_with_consensus=pb.ExecuteWithConsensusOperation(
                    capability="compute", voter_ids=["ok", "not ok"]
                )
            ),
            "execute_with_consensus.voter_ids[1]",
        ),
        (
            pb.SubmitRequest(
                execute_with_consensus=pb.ExecuteWithConsensusOperation(
                    capability="compute", voting_period={"seconds": 60}
                ),
                timeout={"seconds": 10},
            ),
            "execute_with_consensus.voting_period",
        ),
        (
            pb.SubmitRequest(
                execute=pb.ExecuteOperation(capability="compute"), timeout={"seconds": 100_000}
            ),
            "timeout",
        ),
        (
            pb.SubmitRequest(request_id="has spaces", execute=pb.ExecuteOperation(capability="x")),
            "request_id",
        ),
        (
            pb.SubmitRequest(request_id="r" * 81, execute=pb.ExecuteOperation(capability="x")),
            "request_id",
        ),
    ]
    for request, field in cases:
        err = await refused(request)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert err.field == field, (field, err)
    # Downstream refusals keep their code and name the service and field.
    err = await refused(
        pb.SubmitRequest(execute=pb.ExecuteOperation(capability="no.such.capability"))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND and err.metadata["service"] == "broker"
    assert err.field == "execute.capability"
    # The bus.
    for types, field, reason in (
        (["agent.exploded"], "types[0]", "UNKNOWN_EVENT_TYPE"),
        (["app.ok", "Not A Type"], "types[1]", "MALFORMED_EVENT_TYPE"),
        (["*", "bad.*.*"], "types[1]", "MALFORMED_EVENT_TYPE"),
    ):
        with pytest.raises(errors.InvalidArgument) as bad:
            await anext(o.subscribe(types))
        assert (bad.value.field, bad.value.reason) == (field, reason)
    head = (await o.topology()).event_cursor
    with pytest.raises(errors.OutOfRange) as bad:
        await anext(o.subscribe(from_cursor=head + 1000))
    assert (bad.value.field, bad.value.reason) == ("from_cursor", "CURSOR_IN_FUTURE")
    with pytest.raises(errors.InvalidArgument) as bad:
        await anext(o.subscribe(from_cursor=-1))
    assert bad.value.field == "from_cursor"
    with pytest.raises(errors.InvalidArgument) as bad:
        await o.publish("app.empty")
    assert (bad.value.field, bad.value.reason) == ("attributes", "EMPTY_PAYLOAD")
    with pytest.raises(errors.PermissionDenied) as denied:
        await o.publish("agent.joined", summary="me too")
    assert denied.value.field == "type"
    with pytest.raises(errors.InvalidArgument) as bad:
        await o.publish("market.rumour", summary="?")
    assert bad.value.reason == "UNKNOWN_EVENT_TYPE"
    with pytest.raises(errors.NotFound) as missing:
        await o.get_operation("never-ran")
    assert missing.value.field == "request_id"
    with pytest.raises(errors.InvalidArgument) as malformed:
        await o.get_operation("no\nsuch id")
    assert malformed.value.field == "request_id"
    with pytest.raises(errors.InvalidArgument):
        await o.list_operations(page_token="garbage!")
    types = await o.event_types()
    assert "agent.joined" in {t.type for t in types.types} and "agent" in types.reserved_namespaces


async def test_a_restarted_orchestrator_runs_broker_tasks_won_while_it_was_away(
    stack: Stack,
) -> None:
    """A DISPATCH_BROKER task listed by anyone and won while no orchestrator
    listened is picked up when it starts again, and its events resume."""
    for i in range(2):
        await stack.start_agent(f"bidder-{i}", ["compute"], vote=None)
    o = client(stack)
    before = (await o.publish("app.mark", summary="before the restart")).event.cursor
    port = await stack.stop_service("orchestrator")
    async with MarketClient(stack.address("market")) as market:
        await market.list_task(
            "compute",
            ["compute"],
            task_id="while-away",
            args=["fib", "15"],
            bidding_window_s=0.3,
            dispatch="broker",
            deadline=time.time() + 60,
        )

        async def assigned() -> bool:
            return (await market.get_task("while-away")).state == market_pb2.TASK_STATE_ASSIGNED

        await eventually(assigned, what="the market auctioning the task")
        winner = (await market.get_task("while-away")).assigned_agent_id
        assert stack.agents[winner].executed == 0  # the winner does not run it by itself
        await stack.start_orchestrator(port=port)

        async def completed() -> bool:
            return (await market.get_task("while-away")).state == market_pb2.TASK_STATE_COMPLETED

        await eventually(completed, timeout_s=15, what="the bridge running the task")
    assert stack.agents[winner].executed == 1
    o = client(stack)
    seen = []
    async for response in o.subscribe(["market.*", "bridge.*"], from_cursor=before):
        seen.extend((e.type, e.subject) for e in response.events)
        if response.caught_up:
            break
    # The market's events from while it was away, then the bridge's work.
    assert ("market.task_listed", "while-away") in seen
    assert ("market.auction_won", "while-away") in seen
    assert ("bridge.settled", "while-away") in seen


async def test_a_cursor_older_than_the_history_is_refused(registry_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = Stack(registry_server.address, str(tmp_path))
    try:
        await stack.start(event_history=10, sources=())
        o = client(stack)
        for i in range(30):
            await o.publish("app.tick", attributes={"i": str(i)})
        with pytest.raises(errors.OutOfRange) as err:
            await anext(o.subscribe(from_cursor=5))
        assert (err.value.field, err.value.reason) == ("from_cursor", "CURSOR_EXPIRED")
        assert err.value.metadata["oldest_cursor"] == "21"
        oldest = []
        async for response in o.subscribe(from_oldest=True):
            oldest.extend(int(e.attributes["i"]) for e in response.events)
            if response.caught_up:
                break
        assert oldest == list(range(20, 30))
    finally:
        await stack.stop()
