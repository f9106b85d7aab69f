"""The voting behaviour of the agent runtime against real registry and
consensus servers: policies, a hand-written callback, voting faults, and
reconnection after consensus restarts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from agent2028.consensus.v1 import consensus_pb2
from clients.agent import Agent, FaultPlan
from clients.agent.voting import Voting, parse_policy
from clients.consensus import ConsensusClient, certificate_problems
from tests.integration.test_consensus_service import Cluster
from tests.support import eventually

APPROVED = consensus_pb2.PROPOSAL_STATUS_APPROVED
REJECTED = consensus_pb2.PROPOSAL_STATUS_REJECTED


class Agents:
    def __init__(self, cluster: Cluster, tmp: str) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.started: list[Agent] = []
        self.voting: dict[str, Voting] = {}

    async def start(
        self, agent_id: str, policy="approve", faults: FaultPlan | None = None
    ) -> Agent:  # type: ignore[no-untyped-def]
        agent = Agent(
            agent_id,
            registry=self.cluster.registry_server.address,
            capabilities=["database.query"],
            data_dir=os.path.join(self.tmp, agent_id),
            faults=faults,
        )
        voting = Voting(self.cluster.address, policy, reconnect_cap_s=0.2)
        agent.add_behaviour(voting)
        await agent.start()
        self.started.append(agent)
        self.voting[agent_id] = voting
        await asyncio.wait_for(agent.registered.wait(), 10)
        await asyncio.wait_for(voting.connected.wait(), 10)
        return agent


@pytest.fixture
async def cluster(registry_server, tmp_path) -> AsyncIterator[Cluster]:  # type: ignore[no-untyped-def]
    c = Cluster(registry_server, str(tmp_path))
    await c.trust.start()
    await c.start_consensus()
    try:
        yield c
    finally:
        await c.stop_consensus()
        await c.trust.stop()


@pytest.fixture
async def agents(cluster: Cluster, tmp_path) -> AsyncIterator[Agents]:  # type: ignore[no-untyped-def]
    a = Agents(cluster, str(tmp_path))
    yield a
    for agent in a.started:
        await agent.stop()


def test_policy_specs() -> None:
    proposal = consensus_pb2.Proposal(operation="deploy_production_v2.0")
    assert parse_policy("approve")(proposal) is True
    assert parse_policy("reject")(proposal) is False
    assert parse_policy("allow:^deploy_")(proposal) is True
    assert parse_policy("allow:^drop_")(proposal) is False
    assert parse_policy("deny:production")(proposal) is False
    for bad in ("maybe", "allow:(", "approve:x", "allow"):
        with pytest.raises(ValueError):
            parse_policy(bad)


async def test_agents_vote_by_policy_and_callback(cluster: Cluster, agents: Agents) -> None:
    seen: list[str] = []

    async def review(proposal: consensus_pb2.Proposal) -> bool | None:
        seen.append(proposal.operation)
        if proposal.operation.startswith("abstain"):
            return None
        return proposal.proposer_id == "ci"

    await agents.start("yes-1")
    await agents.start("yes-2")
    await agents.start("no-1", "reject")
    await agents.start("deployer", "allow:^deploy_")
    await agents.start("reviewer", review)
    ids = ["yes-1", "yes-2", "no-1", "deployer", "reviewer"]
    async with ConsensusClient(cluster.address) as client:
        # n=5, quorum 4: yes-1, yes-2, deployer and reviewer approve.
        p = (
            await client.propose(
                "deploy_production_v2.0", proposer_id="ci", voter_ids=ids, voting_period_s=30
            )
        ).proposal
        decided = await client.wait_decided(p.proposal_id, timeout_s=20)
        assert decided.status == APPROVED and not certificate_problems(decided)
        assert {v.voter_id for v in decided.certificate.votes} == {
            "yes-1",
            "yes-2",
            "deployer",
            "reviewer",
        }

        async def all_voted() -> bool:
            return (await client.get_proposal(p.proposal_id)).tally.outstanding == 0

        await eventually(all_voted, what="every agent voting")
        full = await client.get_proposal(p.proposal_id)
        assert {v.voter_id: v.choice for v in full.votes}["no-1"] == consensus_pb2.CHOICE_REJECT
        # Not a deploy, not from ci: deployer and reviewer reject, so 2 < 4.
        q = (
            await client.propose(
                "drop_tables", proposer_id="intern", voter_ids=ids, voting_period_s=30
            )
        ).proposal
        assert (await client.wait_decided(q.proposal_id, timeout_s=20)).status == REJECTED
        assert seen == ["deploy_production_v2.0", "drop_tables"]


async def test_voting_faults_are_caught(cluster: Cluster, agents: Agents) -> None:
    await agents.start("honest-1")
    await agents.start("honest-2")
    await agents.start("honest-3")
    await agents.start("silent-1", faults=FaultPlan(silent=True))
    # Rejects first, then approves: its first vote cannot help decide early.
    await agents.start("cheat-1", "reject", faults=FaultPlan(equivocate=True))
    await agents.start("forger-1", faults=FaultPlan(forge_votes=True))
    await agents.start("impostor-1", faults=FaultPlan(vote_for_others=True))
    ids = list(agents.voting)
    async with ConsensusClient(cluster.address) as client:
        # n=7, f=2, quorum 5: honest-1..3 and the impostor's own vote make 4;
        # the equivocator's votes do not count, the forger's never did.
        p = (
            await client.propose("upgrade", proposer_id="ops", voter_ids=ids, voting_period_s=30)
        ).proposal

        async def settled() -> bool:
            t = (await client.get_proposal(p.proposal_id)).tally
            return t.excluded == 1 and t.approvals == 4

        await eventually(settled, timeout_s=20, what="honest votes and the equivocation")
        full = await client.get_proposal(p.proposal_id)
        assert list(full.excluded_voter_ids) == ["cheat-1"]
        voted = {v.voter_id for v in full.votes}
        assert voted == {"honest-1", "honest-2", "honest-3", "impostor-1", "cheat-1"}
        assert full.status == consensus_pb2.PROPOSAL_STATUS_OPEN
        await eventually(
            lambda: agents.voting["forger-1"].rejected["BAD_SIGNATURE"] == 1,
            what="the forger refused",
        )
        # The impostor's claims for the six others were all refused.
        await eventually(
            lambda: agents.voting["impostor-1"].rejected["BAD_SIGNATURE"] == 6,
            what="the impostor refused",
        )
        assert agents.voting["cheat-1"].rejected["EQUIVOCATION"] == 1
        assert agents.voting["silent-1"].votes_cast == 0
        evidence = (await client.list_evidence(proposal_id=p.proposal_id)).evidence
        assert [e.voter_id for e in evidence] == ["cheat-1"]
        await eventually(
            lambda: [o.subject_id for o in cluster.trust.trust.observations] == ["cheat-1"],
            what="trust told",
        )


async def test_agents_reconnect_after_consensus_restarts(cluster: Cluster, agents: Agents) -> None:
    await agents.start("a-1")
    await agents.start("a-2")
    await cluster.stop_consensus()
    await eventually(
        lambda: not any(v.connected.is_set() for v in agents.voting.values()),
        what="agents noticing",
    )
    await cluster.start_consensus()
    await eventually(
        lambda: all(v.connected.is_set() for v in agents.voting.values()),
        timeout_s=15,
        what="agents watching again",
    )
    async with ConsensusClient(cluster.address) as client:
        p = (
            await client.propose(
                "after-restart", proposer_id="ops", voter_ids=["a-1", "a-2"], voting_period_s=30
            )
        ).proposal
        assert (await client.wait_decided(p.proposal_id, timeout_s=20)).status == APPROVED
