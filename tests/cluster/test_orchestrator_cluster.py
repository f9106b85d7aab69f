"""The orchestrator with every service and agents as real processes: the
guide's 8.1 (consensus among agents with three Byzantine-silent ones, then
the broker, then trust) in one call; a tier whose service is killed fails
fast naming it and recovers when it is back; a subscriber resumes from its
cursor across a restart of the orchestrator, missing nothing that happened
while it was down."""

from __future__ import annotations

import asyncio

import pytest

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from clients import errors
from clients.consensus import certificate_problems
from clients.launcher import FAST_FAILURE_DETECTION, LocalCluster
from clients.orchestrator import OrchestratorClient
from clients.trust import TrustClient
from tests.cluster.conftest import dump_logs
from tests.support import eventually

pytestmark = pytest.mark.cluster


async def test_guide_8_1_on_real_processes_and_a_dead_tier_fails_fast(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(FAST_FAILURE_DETECTION)
    await cluster.start()
    try:
        # Ten agents: seven honest, three Byzantine-silent (they never vote).
        await cluster.spawn_agents(7, [["database.query", "compute"]])
        await cluster.spawn_agents(
            3, [["database.query"]], prefix="silent", faults=["silent"], start_index=1
        )
        async with OrchestratorClient(cluster.address("orchestrator"), timeout_s=10) as o:

            async def all_registered() -> bool:
                return (await o.topology()).agents_passing == 10

            await eventually(all_registered, timeout_s=30, what="ten passing agents")
            response = await o.execute_with_consensus(
                "database.query",
                ["SELECT count(*) AS users FROM users"],
                operation="test.command",
                coordinator_id="test-coordinator",
                voting_period_s=15,
                request_id="integration-test",
                timeout_s=40,
            )
            op = response.operation
            assert op.status == pb.OPERATION_STATUS_SUCCEEDED, op.message
            result = op.execute_with_consensus
            proposal = result.proposal
            assert proposal.tally.electorate_size == 10 and proposal.tally.quorum == 7
            assert not certificate_problems(proposal)
            assert not {v.voter_id for v in proposal.certificate.votes} & {
                "silent-001",
                "silent-002",
                "silent-003",
            }
            assert result.receipt.success and result.receipt.duration_ms > 0
            assert result.coordinator_trust.score > 0.5
            async with TrustClient(cluster.address("trust")) as trust:
                score = await trust.score("test-coordinator", result.receipt.agent_id)
                assert score.score > 0.5

            # The market's process dies: allocating fails fast, naming it.
            await cluster.kill("market")

            async def market_unreachable() -> bool:
                topo = await o.topology()
                return not {r.kind: r.available for r in topo.routes}[pb.OPERATION_KIND_ALLOCATE]

            await eventually(market_unreachable, what="the orchestrator seeing the market down")
            # Refused at once from the health it watches (the call gives it
            # 20 s; the operation would have had 600).
            request = o.request(
                timeout_s=600,
                allocate=pb.AllocateOperation(requirements=["compute"], args=["fib", "20"]),
            )
            with pytest.raises(errors.Unavailable) as err:
                await o.submit(request, timeout_s=20)
            assert err.value.metadata["service"] == "market"
            assert err.value.reason == "TIER_UNAVAILABLE"
            assert (await o.execute("compute", ["fib", "20"])).operation.status == (
                pb.OPERATION_STATUS_SUCCEEDED
            )
            await cluster.restart_service("market")

            async def allocated() -> bool:
                try:
                    r = await o.allocate(
                        ["compute"], ["fib", "20"], bidding_window_s=0.5, timeout_s=20
                    )
                except errors.Unavailable:
                    return False
                return r.operation.status == pb.OPERATION_STATUS_SUCCEEDED

            # The agents reconnect to the market by themselves, then bid again.
            await eventually(allocated, timeout_s=40, interval_s=0.5, what="allocating again")
    except BaseException:
        print(dump_logs(cluster))
        raise


async def test_a_subscriber_resumes_across_an_orchestrator_restart(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(FAST_FAILURE_DETECTION)
    await cluster.start()
    try:
        await cluster.spawn_agents(1, [["compute"]])
        address = cluster.address("orchestrator")
        seen: list[pb.Event] = []
        async with OrchestratorClient(address) as o:
            stream = o.subscribe(["agent.*", "app.*"], from_oldest=True)
            async with asyncio.timeout(20):
                async for response in stream:
                    seen.extend(response.events)
                    if any(e.subject == "agent-001" for e in seen):
                        break
            await stream.aclose()
        cursor = seen[-1].cursor
        assert await cluster.terminate("orchestrator") == 0
        # While the orchestrator is down: an agent joins the registry.
        await cluster.spawn_agents(1, [["compute"]], start_index=2)
        await cluster.restart_service("orchestrator")
        async with OrchestratorClient(cluster.address("orchestrator")) as o:
            await o.publish("app.after_restart", summary="the orchestrator is back")
            resumed: list[pb.Event] = []
            async with asyncio.timeout(30):
                async for response in o.events(["agent.*", "app.*"], from_cursor=cursor):
                    resumed.extend(response.events)
                    if any(e.type == "app.after_restart" for e in resumed):
                        break
        assert [e.cursor for e in resumed] == sorted({e.cursor for e in resumed})
        assert all(e.cursor > cursor for e in resumed)
        joined = [e for e in resumed if e.type == "agent.joined"]
        assert [e.subject for e in joined] == ["agent-002"], [e.summary for e in resumed]
    except BaseException:
        print(dump_logs(cluster))
        raise
