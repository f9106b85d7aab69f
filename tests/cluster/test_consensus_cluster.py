"""Consensus among real agent processes: the guide's sections 3.1, 3.2 and
8.2, faulty voters (silent, equivocating, forging, voting for others), bad and
late votes, the CLI, and kill -9 of the consensus service mid-vote.

One cluster serves the whole module (16 agent processes take a while to
start on a small machine): registry, consensus, and a recording trust peer in
this process (TRUST_ADDR), standing in for the trust service until it lands.
The kill -9 test runs last because it restarts consensus.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent2028.consensus.v1 import consensus_pb2
from clients import errors
from clients.consensus import ConsensusClient, certificate_problems, vote_request
from clients.launcher import LocalCluster
from clients.registry import RegistryClient
from services.common.crypto import Identity
from tests.cluster.conftest import dump_logs
from tests.support import eventually
from tests.trust_double import RecordingTrustServer

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]

APPROVED = consensus_pb2.PROPOSAL_STATUS_APPROVED
REJECTED = consensus_pb2.PROPOSAL_STATUS_REJECTED
OPEN = consensus_pb2.PROPOSAL_STATUS_OPEN
EXPIRED = consensus_pb2.PROPOSAL_STATUS_EXPIRED
RULE_AGENTS = [f"rule-{k:02d}" for k in range(1, 11)]
SILENT_AGENTS = ["silent-1", "silent-2", "silent-3"]


def rule_policy(k: int) -> str:
    """Agent rule-k approves operations ending in -N for N >= k (so "op-7" is
    approved by exactly seven of them) and the guide's deploy; rejects the rest."""
    return "allow:-(?:" + "|".join(str(n) for n in range(k, 11)) + ")$|^deploy_production"


class Env:
    def __init__(self, cluster: LocalCluster, trust: RecordingTrustServer) -> None:
        self.cluster = cluster
        self.trust = trust
        self.client = ConsensusClient(cluster.address("consensus"))

    def key(self, agent_id: str) -> Identity:
        """An agent process's own key, read from its key file (to replay its
        votes exactly as it signed them)."""
        path = os.path.join(self.cluster.state_dir, "agents", agent_id, "agent.key")
        return Identity.load_or_create(agent_id, path)

    async def propose(
        self, operation: str, voters: list[str], strategy: str = "byzantine", period: float = 60
    ) -> str:  # type: ignore[no-untyped-def]
        response = await self.client.propose(
            operation,
            proposer_id="coordinator-001",
            strategy=strategy,
            voter_ids=voters,
            voting_period_s=period,
        )
        return response.proposal.proposal_id

    async def all_voted(self, proposal_id: str, outstanding: int = 0) -> consensus_pb2.Proposal:
        async def done() -> consensus_pb2.Proposal | None:
            p = await self.client.get_proposal(proposal_id)
            return p if p.tally.outstanding <= outstanding else None

        return await eventually(done, timeout_s=30, interval_s=0.05, what="the votes arriving")

    def metric(self, name: str, label: str) -> float:
        port = self.cluster.procs["consensus"].metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and label in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory) -> AsyncIterator[Env]:  # type: ignore[no-untyped-def]
    trust = RecordingTrustServer()
    await trust.start()
    cluster = LocalCluster(
        str(tmp_path_factory.mktemp("consensus-cluster")),
        services=["registry", "consensus"],
        env={"TRUST_ADDR": trust.address, "LOG_LEVEL": "INFO"},
    )
    try:
        await cluster.start()
        spawns = [
            cluster.spawn_agent(
                agent_id,
                ["database.query"],
                extra_args=["--vote-policy", rule_policy(k)],
                wait=False,
            )
            for k, agent_id in enumerate(RULE_AGENTS, start=1)
        ]
        spawns += [
            cluster.spawn_agent(agent_id, ["standby"], faults=["silent"], wait=False)
            for agent_id in SILENT_AGENTS
        ]
        spawns += [
            # Rejects first, then approves: its first vote cannot help decide early.
            cluster.spawn_agent(
                "cheat-1",
                ["standby"],
                faults=["equivocate"],
                extra_args=["--vote-policy", "reject"],
                wait=False,
            ),
            cluster.spawn_agent("forger-1", ["standby"], faults=["forge"], wait=False),
            cluster.spawn_agent("impostor-1", ["standby"], faults=["vote-for-others"], wait=False),
        ]
        for spawn in spawns:
            await spawn
        async with RegistryClient(cluster.address("registry")) as registry:

            async def everyone() -> bool:
                return len([a async for a in registry.iter_agents()]) == 16

            await eventually(everyone, timeout_s=60, what="16 agents registering")
        e = Env(cluster, trust)
        # Every agent is watching proposals once a canary proposal has all votes.
        canary = await e.propose("canary-10", RULE_AGENTS)
        await e.all_voted(canary)
        yield e
        await e.client.close()
    except BaseException:
        print(dump_logs(cluster))
        raise
    finally:
        await cluster.stop(timeout_s=15)
        await trust.stop()
        leftovers = [p.name for p in cluster.procs.values() if p.alive()]
        assert not leftovers, f"processes left running: {leftovers}"


async def test_guide_3_1_seven_of_ten_reach_consensus_six_do_not(env: Env) -> None:
    seven = await env.propose("guide31-7", RULE_AGENTS)
    decided = await env.client.wait_decided(seven, timeout_s=30)
    assert decided.status == APPROVED
    assert not certificate_problems(decided)
    assert sorted(v.voter_id for v in decided.certificate.votes) == RULE_AGENTS[:7]
    assert (await env.client.has_consensus(seven, 10)).reached

    six = await env.propose("guide31-6", RULE_AGENTS)
    rejected = await env.client.wait_decided(six, timeout_s=30)
    # Four rejections leave at most 6 approvals: rejected without waiting out the deadline.
    assert rejected.status == REJECTED and not certificate_problems(rejected)
    assert sorted(v.voter_id for v in rejected.certificate.votes) == RULE_AGENTS[6:]
    full = await env.all_voted(six)
    assert full.tally.approvals == 6
    has = await env.client.has_consensus(six, 10)
    assert not has.reached and has.approvals == 6 and has.quorum == 7


async def test_guide_3_2_strategies(env: Env) -> None:
    majority = await env.propose("multi-6", RULE_AGENTS, "simple-majority")
    byzantine = await env.propose("multi-7", RULE_AGENTS, "byzantine")
    unanimous = await env.propose("multi-10", RULE_AGENTS, "unanimous")
    not_unanimous = await env.propose("multi-9", RULE_AGENTS, "unanimous")
    for pid, status in (
        (majority, APPROVED),
        (byzantine, APPROVED),
        (unanimous, APPROVED),
        (not_unanimous, REJECTED),
    ):
        p = await env.client.wait_decided(pid, timeout_s=30)
        assert p.status == status, p
        assert not certificate_problems(p)
    # The guide's has_consensus_with_strategy over the same votes.
    await env.all_voted(majority)
    checks = {
        (majority, "simple-majority"): True,
        (majority, "byzantine"): False,
        (majority, "unanimous"): False,
        (byzantine, "byzantine"): True,
        (byzantine, "unanimous"): False,
        (unanimous, "unanimous"): True,
    }
    for (pid, strategy), reached in checks.items():
        await env.all_voted(pid)
        assert (await env.client.has_consensus(pid, 10, strategy)).reached is reached


async def test_guide_8_2_three_silent_seven_honest(env: Env) -> None:
    pid = await env.propose("chaos-10", RULE_AGENTS[:7] + SILENT_AGENTS)
    decided = await env.client.wait_decided(pid, timeout_s=30)
    assert decided.status == APPROVED and len(decided.certificate.votes) == 7
    assert not certificate_problems(decided)
    assert (await env.client.has_consensus(pid, 10)).reached
    p = await env.all_voted(pid, outstanding=3)
    assert not {v.voter_id for v in p.votes} & set(SILENT_AGENTS)


async def test_faulty_voters_are_caught_and_excluded(env: Env) -> None:
    rejected_before = env.metric("agent2028_consensus_votes_total", 'result="BAD_SIGNATURE"')
    voters = [*RULE_AGENTS[:7], "cheat-1", "forger-1", "impostor-1"]
    pid = await env.propose("faults-10", voters)
    decided = await env.client.wait_decided(pid, timeout_s=30)
    assert decided.status == APPROVED and not certificate_problems(decided)

    async def settled() -> consensus_pb2.Proposal | None:
        p = await env.client.get_proposal(pid)
        return p if p.tally.excluded == 1 and p.tally.approvals == 8 else None

    p = await eventually(settled, timeout_s=30, what="the equivocation and every honest vote")
    assert list(p.excluded_voter_ids) == ["cheat-1"]
    assert "forger-1" not in {v.voter_id for v in p.votes}
    assert {v.voter_id for v in p.certificate.votes} <= {*RULE_AGENTS[:7], "impostor-1"}
    (evidence,) = (await env.client.list_evidence(proposal_id=pid)).evidence
    assert evidence.voter_id == "cheat-1"
    assert {evidence.first_vote.choice, evidence.conflicting_vote.choice} == {1, 2}
    # The forger's vote and the impostor's nine claims were all refused.
    await eventually(
        lambda: (
            env.metric("agent2028_consensus_votes_total", 'result="BAD_SIGNATURE"')
            >= rejected_before + 10
        ),
        timeout_s=20,
        what="forged votes refused",
    )
    # Trust heard about the equivocator, once, keyed by the evidence.
    observations = env.trust.trust.observations

    def reported() -> bool:
        return any(o.request_id == evidence.evidence_id for o in observations)

    await eventually(reported, timeout_s=20, what="the report reaching trust")
    (report,) = [o for o in observations if o.request_id == evidence.evidence_id]
    assert report.subject_id == "cheat-1" and report.observer_id == "consensus"
    assert report.outcome.kind == 4  # COMPLETE_FAILURE


async def test_bad_repeated_and_late_votes(env: Env) -> None:
    pid = await env.propose("repeat-10", RULE_AGENTS[:4], period=4.0)
    await env.all_voted(pid)
    before = await env.client.get_proposal(pid)
    # rule-01's own signed vote, sent again: counted once.
    again = await env.client.vote(env.key("rule-01"), pid, "approve")
    assert again.duplicate and again.counted and again.tally.approvals == 4
    # Unregistered, and not a member.
    with pytest.raises(errors.PermissionDenied) as err:
        await env.client.vote(Identity.generate("stranger"), pid, "approve")
    assert err.value.field == "voter_id"
    with pytest.raises(errors.PermissionDenied):
        await env.client.vote(env.key("rule-09"), pid, "approve")
    # A member's id with someone else's signature.
    with pytest.raises(errors.Unauthenticated) as err:
        await env.client.send_vote(
            vote_request(env.key("rule-09"), pid, "reject", voter_id="rule-02")
        )
    assert err.value.field == "signature"
    after = await env.client.get_proposal(pid)
    assert after.tally == before.tally and list(after.votes) == list(before.votes)

    async def closed() -> bool:
        return not (await env.client.get_proposal(pid, view="basic")).accepting_votes

    await eventually(closed, timeout_s=15, what="voting to close")
    assert (await env.client.get_proposal(pid)).status == APPROVED
    with pytest.raises(errors.FailedPrecondition) as err:
        await env.client.vote(env.key("rule-02"), pid, "reject")
    assert err.value.reason == "VOTING_CLOSED" and err.value.field == "proposal_id"
    with pytest.raises(errors.NotFound):
        await env.client.vote(env.key("rule-02"), "no-such-proposal", "approve")


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    child_env = dict(
        os.environ,
        CONSENSUS_ADDR=env.cluster.address("consensus"),
        REGISTRY_ADDR=env.cluster.address("registry"),
        COLUMNS="200",
    )
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_the_cli_proposes_waits_and_shows(env: Env) -> None:
    result = await asyncio.to_thread(
        _cli,
        env,
        "propose",
        "deploy_production_v2.0",
        "--strategy",
        "byzantine",
        "--electorate-capability",
        "database.query",
        "--deadline",
        "20s",
        "--wait",
        "--json",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    decided = json.loads(result.stdout)
    assert decided["status"] == "PROPOSAL_STATUS_APPROVED"
    assert decided["tally"]["electorate_size"] == 10 and decided["tally"]["quorum"] == 7
    assert len(decided["certificate"]["votes"]) == 7
    proposal = await env.client.get_proposal(decided["proposal_id"])
    assert not certificate_problems(proposal)

    text = await asyncio.to_thread(
        _cli, env, "propose", "guide31-6", "--voters", ",".join(RULE_AGENTS), "--wait"
    )
    assert text.returncode == 3, text.stderr + text.stdout
    assert "rejected" in text.stdout and "certificate verifies" in text.stdout

    listed = await asyncio.to_thread(_cli, env, "proposals", "list", "--json", "--limit", "500")
    assert listed.returncode == 0, listed.stderr
    assert decided["proposal_id"] in {p["proposal_id"] for p in json.loads(listed.stdout)}
    show = await asyncio.to_thread(_cli, env, "proposals", "show", decided["proposal_id"])
    assert show.returncode == 0 and "certificate verifies" in show.stdout, show.stdout
    check = await asyncio.to_thread(
        _cli, env, "proposals", "check", decided["proposal_id"], "--total", "10", "--json"
    )
    assert json.loads(check.stdout)["reached"] is True
    bad = await asyncio.to_thread(
        _cli, env, "propose", "op", "--voters", "rule-01,ghost-9", "--deadline", "5s"
    )
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "voter_ids[1]" in bad.stderr
    both = await asyncio.to_thread(_cli, env, "propose", "op")
    assert both.returncode == 1 and "electorate" in both.stderr


async def test_kill_9_mid_vote_loses_no_acknowledged_vote(env: Env) -> None:
    """Votes stream in from twelve voters while consensus is killed; every
    vote it acknowledged is there after the restart, and the proposal decides."""
    cluster, client = env.cluster, env.client
    voters = [Identity.generate(f"held-{i:02d}") for i in range(12)]
    async with RegistryClient(cluster.address("registry")) as registry:
        for i, identity in enumerate(voters):
            await registry.register(
                identity,
                address=f"127.0.0.1:{30000 + i}",
                capabilities=["held"],
                lease_ttl_s=600,
            )
    held = [v.signer_id for v in voters]
    keys = {v.signer_id: v for v in voters}
    # The agents rule-01..03 approve "kill-10" at once; the held voters are
    # the ones in flight at the kill. n=15, quorum 10.
    main = await env.propose("kill-10", RULE_AGENTS[:3] + held, period=120)
    flood = [await env.propose(f"flood-{i}", held, period=120) for i in range(20)]
    await env.all_voted(main, outstanding=12)

    pending = [(pid, voter) for pid in flood for voter in held]
    pending += [(main, voter) for voter in held[:6]]
    random.Random(4).shuffle(pending)
    acknowledged: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []

    async def sender(work: list[tuple[str, str]]) -> None:
        for pid, voter in work:
            try:
                await client.vote(keys[voter], pid, "approve", timeout_s=2)
                acknowledged.append((pid, voter))
            except errors.ClientError:
                failed.append((pid, voter))

    senders = [asyncio.create_task(sender(pending[i::8])) for i in range(8)]
    await eventually(lambda: len(acknowledged) >= 40, timeout_s=30, what="votes flowing")
    soon = await env.propose("expires-while-down-10", held, period=1.0)
    await cluster.kill("consensus")
    await asyncio.gather(*senders)
    assert failed, "the kill landed after every vote: nothing was in flight"
    await cluster.restart_service("consensus")

    async with ConsensusClient(cluster.address("consensus")) as fresh:

        async def reachable() -> bool:
            # This process's connection to the old port may still be backing off.
            try:
                await fresh.get_proposal(main, view="basic")
            except errors.Unavailable:
                return False
            return True

        await eventually(reachable, timeout_s=15, what="consensus reachable again")
        recorded: dict[str, set[str]] = {}
        for pid in {pid for pid, _ in acknowledged}:
            p = await fresh.get_proposal(pid)
            recorded[pid] = {v.voter_id for v in p.votes}
        lost = [(pid, voter) for pid, voter in acknowledged if voter not in recorded[pid]]
        assert not lost, f"{len(lost)} acknowledged votes lost: {lost[:5]}"
        # The proposal that expired while consensus was down is expired now.
        await eventually(
            lambda: _status_is(fresh, soon, EXPIRED), timeout_s=15, what="the overdue expiry"
        )
        # The rest of the held voters vote (the agents' repeats are no-ops):
        # kill-10 decides with the votes from before the crash in its certificate.
        p = await fresh.get_proposal(main)
        assert p.status == OPEN
        for voter in held:
            if voter not in {v.voter_id for v in p.votes}:
                await fresh.vote(keys[voter], main, "approve")
        decided = await fresh.wait_decided(main, timeout_s=30)
        assert decided.status == APPROVED and not certificate_problems(decided)
        # The certificate is the first ten approvals in arrival order, and
        # every vote acknowledged before the crash arrived before any after it.
        before_crash = {voter for pid, voter in acknowledged if pid == main}
        in_certificate = {v.voter_id for v in decided.certificate.votes}
        assert set(RULE_AGENTS[:3]) | before_crash <= in_certificate


async def _status_is(client: ConsensusClient, pid: str, status: int) -> bool:
    return (await client.get_proposal(pid, view="basic")).status == status
