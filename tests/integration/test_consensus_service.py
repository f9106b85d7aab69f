"""Consensus over gRPC with a real registry: every RPC, every bad input, the
trust outbox against a recording trust peer, streams, and restarts."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agent2028.consensus.v1 import consensus_pb2
from clients import errors
from clients.channel import create_channel
from clients.consensus import (
    ConsensusClient,
    certificate_problems,
    vote_request,
)
from clients.registry import RegistryClient
from services.common import signing
from services.common.crypto import Identity
from services.consensus.config import ConsensusConfig
from services.consensus.core import ConsensusSettings
from services.consensus.servicer import ConsensusApp
from tests.support import eventually, serve
from tests.trust_double import RecordingTrustServer

OPEN = consensus_pb2.PROPOSAL_STATUS_OPEN
APPROVED = consensus_pb2.PROPOSAL_STATUS_APPROVED
REJECTED = consensus_pb2.PROPOSAL_STATUS_REJECTED
EXPIRED = consensus_pb2.PROPOSAL_STATUS_EXPIRED


def consensus_config(registry: str, trust: str | None, **settings: object) -> ConsensusConfig:
    return ConsensusConfig(
        settings=ConsensusSettings(**settings),  # type: ignore[arg-type]
        registry_addr=registry,
        trust_addr=trust,
        observer_id="consensus",
        verify_workers=1,
        watch_queue=64,
        registry_timeout_s=3.0,
        db_synchronous="NORMAL",
    )


class Cluster:
    """A registry and a consensus service in this process, with a recording trust."""

    def __init__(self, registry, tmp: str) -> None:  # type: ignore[no-untyped-def]
        self.registry_server = registry
        self.tmp = tmp
        self.trust = RecordingTrustServer()
        self.host = None
        self.app: ConsensusApp | None = None
        self.port = 0
        self.identities: dict[str, Identity] = {}

    async def start_consensus(self, **settings: object) -> None:
        self.app = ConsensusApp(
            consensus_config(self.registry_server.address, self.trust.address, **settings),
            os.path.join(self.tmp, "consensus"),
        )
        self.host = await serve(self.app, self.tmp, port=self.port)
        self.port = self.host.port

    async def stop_consensus(self) -> None:
        if self.host is not None:
            await self.host.stop(grace_s=0.5)
            self.host = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def register(
        self, count: int, prefix: str = "voter", caps=("database.query",)
    ) -> list[str]:  # type: ignore[no-untyped-def]
        async with RegistryClient(self.registry_server.address) as client:
            ids = []
            for i in range(count):
                identity = Identity.generate(f"{prefix}-{i:02d}")
                await client.register(
                    identity,
                    address=f"127.0.0.1:{9000 + len(self.identities)}",
                    capabilities=list(caps),
                    lease_ttl_s=60,
                )
                self.identities[identity.signer_id] = identity
                ids.append(identity.signer_id)
        return ids


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
async def client(cluster: Cluster) -> AsyncIterator[ConsensusClient]:
    async with ConsensusClient(cluster.address) as c:
        yield c


async def test_propose_vote_decide_with_a_verifiable_certificate(
    cluster: Cluster, client: ConsensusClient
) -> None:
    voters = await cluster.register(10)
    events: list[consensus_pb2.ConsensusEvent] = []
    watch = client.watch(resume=False)
    header = await anext(watch)

    async def follow() -> None:
        async for response in watch:
            events.extend(response.events)

    follower = asyncio.create_task(follow())
    response = await client.propose(
        "deploy_production_v2.0",
        proposer_id="coordinator-001",
        voter_ids=voters,
        voting_period_s=60,
        request_id="propose-1",
    )
    p = response.proposal
    assert p.status == OPEN and p.tally.quorum == 7 and p.tally.electorate_size == 10
    assert {v.voter_id: v.public_key for v in p.electorate} == {
        v: cluster.identities[v].public_key for v in voters
    }
    # A retried Propose returns the same proposal.
    again = await client.propose(
        "deploy_production_v2.0",
        proposer_id="coordinator-001",
        voter_ids=voters,
        voting_period_s=60,
        request_id="propose-1",
    )
    assert again.duplicate and again.proposal.proposal_id == p.proposal_id
    for voter in voters[:6]:
        result = await client.vote(cluster.identities[voter], p.proposal_id)
        assert result.counted and result.status == OPEN
    assert not (await client.has_consensus(p.proposal_id, 10)).reached
    assert (await client.has_consensus(p.proposal_id, 10, "simple-majority")).reached
    result = await client.vote(cluster.identities[voters[6]], p.proposal_id)
    assert result.status == APPROVED and result.tally.approvals == 7
    decided = await client.get_proposal(p.proposal_id)
    assert decided.status == APPROVED and not certificate_problems(decided)
    assert [v.voter_id for v in decided.certificate.votes] == voters[:7]
    # Tampering with the certificate is caught by a client that checks it.
    forged = consensus_pb2.Proposal()
    forged.CopyFrom(decided)
    forged.certificate.votes[0].choice = consensus_pb2.CHOICE_REJECT
    assert certificate_problems(forged)
    del forged.certificate.votes[6]
    assert any("fewer than the quorum" in problem for problem in certificate_problems(forged))
    has = await client.has_consensus(p.proposal_id, 10)
    assert has.reached and has.approvals == 7 and has.quorum == 7
    assert not (await client.has_consensus(p.proposal_id, 10, "unanimous")).reached

    await eventually(
        lambda: any(e.type == consensus_pb2.EVENT_TYPE_DECIDED for e in events), what="decided"
    )
    follower.cancel()
    types = [e.type for e in events]
    assert types[0] == consensus_pb2.EVENT_TYPE_PROPOSED
    assert types.count(consensus_pb2.EVENT_TYPE_VOTE_RECORDED) == 7
    assert types[-1] == consensus_pb2.EVENT_TYPE_DECIDED
    assert [e.index for e in events] == list(range(header.index + 1, header.index + 10))
    decision = events[-1]
    assert decision.proposal.status == APPROVED and len(decision.proposal.certificate.votes) == 7
    # The same history replays from storage for a watcher that resumes.
    replay = client.watch(from_index=events[0].index, resume=False)
    # Positioned at from_index until caught up, so a resume never skips.
    assert (await anext(replay)).index == events[0].index
    replayed = (await asyncio.wait_for(anext(replay), 10)).events
    assert [(e.index, e.type, e.proposal.tally) for e in replayed] == [
        (e.index, e.type, e.proposal.tally) for e in events[1:]
    ]
    assert replayed[-1].proposal.certificate == decision.proposal.certificate
    caught_up = await asyncio.wait_for(anext(replay), 10)
    assert not caught_up.events and caught_up.index == events[-1].index
    await replay.aclose()


async def test_votes_are_checked_over_the_wire(cluster: Cluster, client: ConsensusClient) -> None:
    voters = await cluster.register(4)
    outsiders = await cluster.register(1, prefix="outsider")
    p = (
        await client.propose("rotate_keys", proposer_id="ops", voter_ids=voters, voting_period_s=60)
    ).proposal
    me = cluster.identities[voters[0]]

    async def refused(request: consensus_pb2.VoteRequest) -> errors.ClientError:
        with pytest.raises(errors.ClientError) as err:
            await client.send_vote(request)
        return err.value

    err = await refused(vote_request(me, "no-such-proposal", "approve"))
    assert isinstance(err, errors.NotFound) and err.field == "proposal_id"
    err = await refused(vote_request(cluster.identities[outsiders[0]], p.proposal_id, "approve"))
    assert isinstance(err, errors.PermissionDenied) and err.field == "voter_id"
    assert err.reason == "NOT_IN_ELECTORATE"
    unregistered = Identity.generate("never-registered")
    err = await refused(vote_request(unregistered, p.proposal_id, "approve"))
    assert isinstance(err, errors.PermissionDenied) and err.field == "voter_id"
    # Voting for another member, signed with one's own key.
    err = await refused(vote_request(me, p.proposal_id, "approve", voter_id=voters[1]))
    assert isinstance(err, errors.Unauthenticated) and err.field == "signature"
    assert err.reason == "BAD_SIGNATURE"
    forged = vote_request(Identity.generate(voters[0]), p.proposal_id, "approve")
    err = await refused(forged)
    assert isinstance(err, errors.Unauthenticated)
    bad = vote_request(me, p.proposal_id, "approve")
    bad.choice = 7
    err = await refused(bad)
    assert isinstance(err, errors.InvalidArgument) and err.field == "choice"
    bad.choice = consensus_pb2.CHOICE_UNSPECIFIED
    assert (await refused(bad)).field == "choice"
    short = vote_request(me, p.proposal_id, "approve")
    short.signature = b"\x00" * 10
    err = await refused(short)
    assert isinstance(err, errors.InvalidArgument) and err.field == "signature"
    malformed = vote_request(me, p.proposal_id, "approve")
    malformed.voter_id = "bad id!"
    assert (await refused(malformed)).field == "voter_id"
    assert (await client.get_proposal(p.proposal_id)).tally.outstanding == 4

    # A repeated identical vote counts once.
    first = await client.vote(me, p.proposal_id)
    second = await client.vote(me, p.proposal_id)
    assert not first.duplicate and second.duplicate and second.tally.approvals == 1

    # Late votes: after the deadline voting is closed.
    short_lived = (
        await client.propose("quick", proposer_id="ops", voter_ids=voters, voting_period_s=0.3)
    ).proposal
    await eventually(
        lambda: client.get_proposal(short_lived.proposal_id, view="basic"),
        what="proposal readable",
    )

    async def expired() -> bool:
        return (await client.get_proposal(short_lived.proposal_id)).status == EXPIRED

    await eventually(expired, timeout_s=10, what="expiry")
    err = await refused(vote_request(me, short_lived.proposal_id, "approve"))
    assert isinstance(err, errors.FailedPrecondition) and err.reason == "VOTING_CLOSED"
    assert err.field == "proposal_id"


async def test_bad_proposals_and_queries_name_the_field(
    cluster: Cluster, client: ConsensusClient
) -> None:
    voters = await cluster.register(2)
    stub = client.stub

    async def status(call, request) -> errors.ClientError:  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, timeout=5)
        return errors.from_rpc_error(err.value)

    def propose(**kw: object) -> consensus_pb2.ProposeRequest:
        base: dict[str, object] = {
            "operation": "op",
            "proposer_id": "me",
            "voter_ids": voters,
        }
        base.update(kw)
        return consensus_pb2.ProposeRequest(**base)  # type: ignore[arg-type]

    past = consensus_pb2.ProposeRequest().deadline_time.__class__(seconds=int(time.time()) - 60)
    cases = [
        (propose(operation=""), errors.InvalidArgument, "operation"),
        (propose(operation="x" * 257), errors.InvalidArgument, "operation"),
        (propose(operation="rm -rf /"), errors.InvalidArgument, "operation"),
        (propose(proposer_id=""), errors.InvalidArgument, "proposer_id"),
        (propose(strategy=9), errors.InvalidArgument, "strategy"),
        (propose(voter_ids=[]), errors.InvalidArgument, "voter_ids"),
        (propose(voter_ids=[voters[0], voters[0]]), errors.InvalidArgument, "voter_ids[1]"),
        (propose(voter_ids=[voters[0], "ghost"]), errors.NotFound, "voter_ids[1]"),
        (
            propose(electorate_capability="database.query"),
            errors.InvalidArgument,
            "electorate_capability",
        ),
        (
            propose(voter_ids=[], electorate_capability="Not A Capability"),
            errors.InvalidArgument,
            "electorate_capability",
        ),
        (
            propose(voter_ids=[], electorate_capability="nobody.has.this"),
            errors.FailedPrecondition,
            "electorate_capability",
        ),
        (propose(deadline_time=past), errors.InvalidArgument, "deadline_time"),
        (
            propose(
                deadline_time=past,
                voting_period=consensus_pb2.ProposeRequest().voting_period.__class__(seconds=5),
            ),
            errors.InvalidArgument,
            "voting_period",
        ),
        (
            propose(
                voting_period=consensus_pb2.ProposeRequest().voting_period.__class__(seconds=-5)
            ),
            errors.InvalidArgument,
            "voting_period",
        ),
        (
            propose(
                voting_period=consensus_pb2.ProposeRequest().voting_period.__class__(seconds=10**8)
            ),
            errors.InvalidArgument,
            "voting_period",
        ),
        (propose(proposal_id="has space"), errors.InvalidArgument, "proposal_id"),
        (propose(request_id="x" * 200), errors.InvalidArgument, "request_id"),
    ]
    for request, kind, field in cases:
        err = await status(stub.Propose, request)
        assert isinstance(err, kind) and err.field == field, (request, err)
    named = await client.propose("op", proposer_id="me", voter_ids=voters, proposal_id="named-1")
    assert named.proposal.proposal_id == "named-1"
    err = await status(stub.Propose, propose(proposal_id="named-1"))
    assert isinstance(err, errors.AlreadyExists) and err.field == "proposal_id"

    queries = [
        (
            stub.GetProposal,
            consensus_pb2.GetProposalRequest(proposal_id="nope"),
            errors.NotFound,
            "proposal_id",
        ),
        (
            stub.GetProposal,
            consensus_pb2.GetProposalRequest(proposal_id=""),
            errors.InvalidArgument,
            "proposal_id",
        ),
        (
            stub.GetProposal,
            consensus_pb2.GetProposalRequest(proposal_id="named-1", view=5),
            errors.InvalidArgument,
            "view",
        ),
        (
            stub.ListProposals,
            consensus_pb2.ListProposalsRequest(page_size=-1),
            errors.InvalidArgument,
            "page_size",
        ),
        (
            stub.ListProposals,
            consensus_pb2.ListProposalsRequest(page_token="!!"),
            errors.InvalidArgument,
            "page_token",
        ),
        (
            stub.ListProposals,
            consensus_pb2.ListProposalsRequest(statuses=[9]),
            errors.InvalidArgument,
            "statuses[0]",
        ),
        (
            stub.HasConsensus,
            consensus_pb2.HasConsensusRequest(proposal_id="named-1", total_agents=-1),
            errors.InvalidArgument,
            "total_agents",
        ),
        (
            stub.HasConsensus,
            consensus_pb2.HasConsensusRequest(proposal_id="named-1", strategy=8),
            errors.InvalidArgument,
            "strategy",
        ),
        (
            stub.HasConsensus,
            consensus_pb2.HasConsensusRequest(proposal_id="nope", total_agents=10),
            errors.NotFound,
            "proposal_id",
        ),
        (
            stub.ListEvidence,
            consensus_pb2.ListEvidenceRequest(voter_id="bad id"),
            errors.InvalidArgument,
            "voter_id",
        ),
    ]
    for call, request, kind, field in queries:
        err = await status(call, request)
        assert isinstance(err, kind) and err.field == field, (request, err)

    # Streams: a watch ahead of the service, and undecodable bytes.
    with pytest.raises(errors.OutOfRange) as err:
        async for _ in client.watch(from_index=10**9, resume=False):
            pass
    assert err.value.field == "from_index"
    channel = create_channel(cluster.address, retries=False)
    raw = channel.unary_unary("/agent2028.consensus.v1.ConsensusService/Vote")
    with pytest.raises(grpc.aio.AioRpcError) as raw_err:
        await raw(b"\xff\xff\xff", timeout=5)
    assert raw_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


async def test_equivocation_reaches_trust_even_through_an_outage(
    cluster: Cluster, client: ConsensusClient
) -> None:
    voters = await cluster.register(4)
    await cluster.trust.stop()  # trust is down when the equivocation happens
    p = (
        await client.propose("migrate", proposer_id="ops", voter_ids=voters, voting_period_s=60)
    ).proposal
    cheat = cluster.identities[voters[3]]
    await client.vote(cheat, p.proposal_id, "approve")
    with pytest.raises(errors.AlreadyExists) as err:
        await client.vote(cheat, p.proposal_id, "reject")
    assert err.value.reason == "EQUIVOCATION" and err.value.field == "choice"
    evidence_id = err.value.metadata["evidence_id"]
    proposal = await client.get_proposal(p.proposal_id)
    assert list(proposal.excluded_voter_ids) == [voters[3]]
    assert proposal.tally.approvals == 0 and proposal.tally.excluded == 1
    listed = (await client.list_evidence(voter_id=voters[3])).evidence
    assert [e.evidence_id for e in listed] == [evidence_id] and not listed[0].reported_to_trust
    assert listed[0].first_vote.choice == consensus_pb2.CHOICE_APPROVE
    assert listed[0].conflicting_vote.choice == consensus_pb2.CHOICE_REJECT
    first_sig = listed[0].conflicting_vote.signature
    assert first_sig == signing_of(cheat, p.proposal_id, "reject")

    # The other three approve (quorum 3 of 4 despite the excluded voter).
    for voter in voters[:3]:
        await client.vote(cluster.identities[voter], p.proposal_id)
    assert (await client.get_proposal(p.proposal_id)).status == APPROVED

    # Restart consensus while trust is still down: the report is durable.
    await cluster.stop_consensus()
    await cluster.start_consensus()
    await cluster.trust.start()  # same port
    observations = cluster.trust.trust.observations
    await eventually(lambda: observations, timeout_s=45, what="the report reaching trust")
    (observation,) = observations
    assert observation.observer_id == "consensus" and observation.subject_id == voters[3]
    assert observation.outcome.kind == 4  # OUTCOME_KIND_COMPLETE_FAILURE
    assert observation.request_id == evidence_id

    async with ConsensusClient(cluster.address) as fresh:

        async def reported() -> bool:
            try:
                evidence = (await fresh.list_evidence(voter_id=voters[3])).evidence
            except errors.Unavailable:  # this process's connection may still be backing off
                return False
            return evidence[0].reported_to_trust

        await eventually(reported, what="evidence marked reported")


def signing_of(identity: Identity, proposal_id: str, choice: str) -> bytes:
    return identity.sign(*signing.vote(proposal_id, identity.signer_id, choice))


async def test_stream_votes_answers_each_vote_in_order(
    cluster: Cluster, client: ConsensusClient
) -> None:
    voters = await cluster.register(10)
    proposals = [
        (
            await client.propose(
                f"batch-{i}", proposer_id="ops", voter_ids=voters, voting_period_s=60
            )
        ).proposal.proposal_id
        for i in range(3)
    ]
    requests = []
    for pid in proposals:
        for voter in voters:
            vote = vote_request(cluster.identities[voter], pid, "approve")
            requests.append(
                consensus_pb2.StreamVotesRequest(
                    proposal_id=vote.proposal_id,
                    voter_id=vote.voter_id,
                    choice=vote.choice,
                    signature=vote.signature,
                    sequence=len(requests),
                )
            )
    forged = consensus_pb2.StreamVotesRequest()
    forged.CopyFrom(requests[0])
    forged.signature = bytes(64)
    forged.sequence = len(requests)
    repeated = consensus_pb2.StreamVotesRequest()
    repeated.CopyFrom(requests[1])
    repeated.sequence = len(requests) + 1
    unknown = consensus_pb2.StreamVotesRequest()
    unknown.CopyFrom(requests[2])
    unknown.proposal_id = "nope"
    unknown.sequence = len(requests) + 2
    all_requests = [*requests, forged, repeated, unknown]

    async def send() -> AsyncIterator[consensus_pb2.StreamVotesRequest]:
        for request in all_requests:
            yield request

    call = client.stub.StreamVotes(send(), timeout=30)
    answers = [answer async for answer in call]
    assert [a.sequence for a in answers] == list(range(len(all_requests)))
    assert all(a.code == 0 and a.counted for a in answers[: len(requests)])
    assert answers[-3].code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert answers[-3].field == "signature"
    assert answers[-2].code == 0 and answers[-2].duplicate
    assert answers[-1].code == grpc.StatusCode.NOT_FOUND.value[0]
    for pid in proposals:
        p = await client.get_proposal(pid)
        assert p.status == APPROVED and p.tally.approvals == 10 and not certificate_problems(p)
    assert cluster.app is not None and cluster.app.verifier.checked >= len(requests)


async def test_watch_proposals_snapshot_then_new_for_the_voter(
    cluster: Cluster, client: ConsensusClient
) -> None:
    voters = await cluster.register(3)
    others = await cluster.register(2, prefix="other")
    before = (
        await client.propose("before", proposer_id="ops", voter_ids=voters, voting_period_s=60)
    ).proposal
    stream = client.watch_proposals(voter_id=voters[0])
    snapshot = await anext(stream)
    assert snapshot.snapshot and [p.proposal_id for p in snapshot.proposals] == [before.proposal_id]
    await client.propose("not-mine", proposer_id="ops", voter_ids=others, voting_period_s=60)
    mine = (
        await client.propose("mine", proposer_id="ops", voter_ids=voters, voting_period_s=60)
    ).proposal
    update = await asyncio.wait_for(anext(stream), 10)
    assert not update.snapshot and [p.proposal_id for p in update.proposals] == [mine.proposal_id]
    assert update.proposals[0].operation == "mine" and update.proposals[0].accepting_votes
    await stream.aclose()


async def test_registry_down_makes_propose_unavailable(cluster: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = ConsensusApp(consensus_config("127.0.0.1:1", None), os.path.join(str(tmp_path), "orphan"))
    host = await serve(app, str(tmp_path))
    try:
        async with ConsensusClient(host.address) as orphan:
            with pytest.raises(errors.Unavailable) as err:
                await orphan.propose("op", proposer_id="me", capability="database.query")
            assert err.value.reason == "REGISTRY_UNAVAILABLE"
    finally:
        await host.stop(grace_s=0.5)
