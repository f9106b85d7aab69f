"""The consensus core without sockets: quorum rules, decisions, certificates,
equivocation, deadlines, and durability across a reopen of its database."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence

import pytest

from services.common import crypto, signing
from services.common.crypto import Identity
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.common.storage import Database
from services.consensus import store
from services.consensus.core import (
    Choice,
    ConsensusCore,
    ConsensusSettings,
    Event,
    EventType,
    Status,
    Strategy,
    has_consensus,
    max_faulty,
    quorum,
)
from services.consensus.verifier import InlineVerifier, check

# --- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "f", "byzantine", "majority", "unanimous"),
    [
        (1, 0, 1, 1, 1),
        (3, 0, 2, 2, 3),
        (4, 1, 3, 3, 4),
        (5, 1, 4, 3, 5),
        (7, 2, 5, 4, 7),
        (10, 3, 7, 6, 10),
        (100, 33, 67, 51, 100),
    ],
)
def test_quorum_values(n: int, f: int, byzantine: int, majority: int, unanimous: int) -> None:
    assert max_faulty(n) == f
    assert quorum(Strategy.BYZANTINE, n) == byzantine
    assert quorum(Strategy.SIMPLE_MAJORITY, n) == majority
    assert quorum(Strategy.UNANIMOUS, n) == unanimous
    if n == 3 * f + 1:
        assert byzantine == 2 * f + 1


def test_byzantine_quorums_intersect_in_an_honest_voter() -> None:
    # Two quorums of n share at least 2q - n voters; more than f of them, so
    # one is honest and cannot have signed both sides.
    for n in range(1, 301):
        assert 2 * quorum(Strategy.BYZANTINE, n) - n > max_faulty(n)
        assert quorum(Strategy.BYZANTINE, n) <= n - max_faulty(n) or n < 4


def test_the_guides_examples() -> None:
    assert has_consensus(7, 10)  # 3.1: 7 of 10
    assert not has_consensus(6, 10)  # 3.1: 6 of 10
    assert has_consensus(6, 10, Strategy.SIMPLE_MAJORITY)  # 3.2
    assert not has_consensus(6, 10, Strategy.BYZANTINE)
    assert has_consensus(7, 10, Strategy.BYZANTINE)
    assert not has_consensus(9, 10, Strategy.UNANIMOUS)
    assert has_consensus(10, 10, Strategy.UNANIMOUS)
    with pytest.raises(ValueError):
        quorum(Strategy.BYZANTINE, 0)


# --- a core over a real SQLite file ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """The electorate source: identities the test holds, some by capability."""

    def __init__(self) -> None:
        self.identities: dict[str, Identity] = {}
        self.capabilities: dict[str, list[str]] = {}
        self.calls = 0

    def add(self, agent_id: str, *capabilities: str) -> Identity:
        identity = Identity.generate(agent_id)
        self.identities[agent_id] = identity
        for capability in capabilities:
            self.capabilities.setdefault(capability, []).append(agent_id)
        return identity

    async def by_ids(self, voter_ids: Sequence[str], timeout_s: float) -> list[tuple[str, bytes]]:
        self.calls += 1
        out = []
        for i, voter_id in enumerate(voter_ids):
            if voter_id not in self.identities:
                raise NotFound("unknown", field=f"voter_ids[{i}]", reason="VOTER_NOT_REGISTERED")
            out.append((voter_id, self.identities[voter_id].public_key))
        return out

    async def by_capability(
        self, capability: str, limit: int, timeout_s: float
    ) -> list[tuple[str, bytes]]:
        self.calls += 1
        ids = self.capabilities.get(capability, [])[: limit + 1]
        return [(i, self.identities[i].public_key) for i in ids]


class CountingVerifier(InlineVerifier):
    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        self.calls += 1
        return check(public_key, signature, message)


class Harness:
    def __init__(self, path: str) -> None:
        self.path = path
        self.clock = Clock()
        self.registry = Registry()
        self.verifier = CountingVerifier()
        self.core: ConsensusCore | None = None
        self.db: Database | None = None
        self.events: list[Event] = []

    async def open(self, settings: ConsensusSettings | None = None) -> ConsensusCore:
        self.db = Database(self.path, schema=store.SCHEMA)
        await self.db.open()
        self.core = ConsensusCore(
            self.db,
            settings or ConsensusSettings(),
            resolver=self.registry,
            verifier=self.verifier,
            clock=self.clock,
        )
        self.events = []
        self.core.add_listener(self.events.append)
        await self.core.open()
        return self.core

    async def close(self) -> None:
        assert self.core is not None and self.db is not None
        await self.core.close()
        await self.db.close()

    def voters(self, count: int, prefix: str = "agent", *capabilities: str) -> list[str]:
        return [self.registry.add(f"{prefix}-{i}", *capabilities).signer_id for i in range(count)]

    async def propose(self, voters: list[str], strategy: Strategy = Strategy.BYZANTINE, **kw):  # type: ignore[no-untyped-def]
        assert self.core is not None
        kw.setdefault("deadline_wall", self.clock.now + 60)
        p, _ = await self.core.propose(
            operation=kw.pop("operation", "deploy_production_v2.0"),
            proposer_id="coordinator-001",
            strategy=strategy,
            voter_ids=voters,
            capability="",
            **kw,
        )
        return p

    def sign(self, voter_id: str, proposal_id: str, choice: Choice, *, as_id: str = "") -> bytes:
        identity = self.registry.identities[voter_id]
        return identity.sign(*signing.vote(proposal_id, as_id or voter_id, choice.label))

    async def vote(self, voter_id: str, proposal_id: str, choice: Choice = Choice.APPROVE):  # type: ignore[no-untyped-def]
        assert self.core is not None
        return await self.core.vote(
            proposal_id, voter_id, choice, self.sign(voter_id, proposal_id, choice)
        )


@pytest.fixture
async def h(tmp_path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    harness = Harness(os.path.join(str(tmp_path), "consensus.db"))
    await harness.open()
    yield harness
    if harness.core is not None and harness.core.journal._task is not None:
        await harness.close()


async def test_seven_of_ten_decide_with_a_verifiable_certificate(h: Harness) -> None:
    voters = h.voters(10)
    p = await h.propose(voters)
    assert p.status is Status.OPEN and p.quorum == 7 and p.electorate_size == 10
    for voter in voters[:6]:
        result = await h.vote(voter, p.proposal_id)
        assert result.status is Status.OPEN and result.counted and not result.duplicate
    result = await h.vote(voters[6], p.proposal_id)
    assert result.status is Status.APPROVED
    assert p.status is Status.APPROVED and p.decide_wall == h.clock.now
    certificate = p.certificate_votes()
    assert [v.voter_id for v in certificate] == voters[:7]
    for v in certificate:
        key = h.registry.identities[v.voter_id].public_key
        assert crypto.verify(key, v.signature, *signing.vote(p.proposal_id, v.voter_id, "approve"))
    # Later votes are recorded; the decision is final.
    await h.vote(voters[7], p.proposal_id, Choice.REJECT)
    assert p.status is Status.APPROVED and p.rejections == 1 and p.approvals == 7
    decided = [e for e in h.events if e.type is EventType.DECIDED]
    assert len(decided) == 1 and decided[0].status is Status.APPROVED
    assert decided[0].tally.approvals == 7


async def test_six_of_ten_is_not_enough_and_rejects_early(h: Harness) -> None:
    voters = h.voters(10)
    p = await h.propose(voters)
    for voter in voters[:6]:
        await h.vote(voter, p.proposal_id)
    assert p.status is Status.OPEN
    assert await h.core.has_consensus(p.proposal_id, 10, Strategy.BYZANTINE) == (
        False,
        6,
        7,
        10,
    )
    assert (await h.core.has_consensus(p.proposal_id, 10, Strategy.SIMPLE_MAJORITY))[0]
    for voter in voters[6:9]:
        await h.vote(voter, p.proposal_id, Choice.REJECT)
    # 6 approvals + 1 outstanding can still make 7.
    assert p.status is Status.OPEN
    result = await h.vote(voters[9], p.proposal_id, Choice.REJECT)
    assert result.status is Status.REJECTED
    assert [v.voter_id for v in p.certificate_votes()] == voters[6:]


async def test_unanimous_rejects_at_the_first_rejection(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters, Strategy.UNANIMOUS)
    await h.vote(voters[0], p.proposal_id)
    result = await h.vote(voters[1], p.proposal_id, Choice.REJECT)
    assert result.status is Status.REJECTED and p.quorum == 4


async def test_simple_majority_and_a_single_voter(h: Harness) -> None:
    voters = h.voters(10)
    p = await h.propose(voters, Strategy.SIMPLE_MAJORITY)
    for voter in voters[:5]:
        await h.vote(voter, p.proposal_id)
    assert p.status is Status.OPEN
    await h.vote(voters[5], p.proposal_id)
    assert p.status is Status.APPROVED and len(p.certificate_votes()) == 6
    one = await h.propose(voters[:1])
    assert (await h.vote(voters[0], one.proposal_id)).status is Status.APPROVED


async def test_a_repeated_vote_counts_once_and_costs_no_verification(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters)
    first = await h.vote(voters[0], p.proposal_id)
    assert not first.duplicate and h.verifier.calls == 1
    signature = h.sign(voters[0], p.proposal_id, Choice.APPROVE)
    for _ in range(50):
        again = await h.core.vote(p.proposal_id, voters[0], Choice.APPROVE, signature)
        assert again.duplicate and again.counted
    assert h.verifier.calls == 1
    assert p.approvals == 1 and p.voted == 1
    assert len([e for e in h.events if e.type is EventType.VOTE_RECORDED]) == 1


async def test_equivocation_is_evidence_exclusion_and_a_report_owed(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters)  # n=4, quorum 3
    await h.vote(voters[0], p.proposal_id)
    await h.vote(voters[1], p.proposal_id)
    with pytest.raises(AlreadyExists) as err:
        await h.vote(voters[0], p.proposal_id, Choice.REJECT)
    assert err.value.reason == "EQUIVOCATION" and err.value.field == "choice"
    evidence_id = err.value.metadata["evidence_id"]
    assert p.approvals == 1 and p.excluded_count == 1 and voters[0] in p.excluded
    evidence = p.excluded[voters[0]]
    assert evidence.first.choice is Choice.APPROVE and evidence.second.choice is Choice.REJECT
    assert h.core.outbox[evidence_id].subject_id == voters[0]
    # Both of its signed votes are now just the evidence: neither counts again.
    for choice in (Choice.APPROVE, Choice.REJECT):
        again = await h.vote(voters[0], p.proposal_id, choice)
        assert again.duplicate and not again.counted
    # 1 approval + 2 outstanding can make 3; one more rejection cannot.
    assert p.status is Status.OPEN
    result = await h.vote(voters[2], p.proposal_id, Choice.REJECT)
    assert result.status is Status.REJECTED
    assert p.certificate_evidence == [evidence_id]
    assert [v.voter_id for v in p.certificate_votes()] == [voters[2]]
    kinds = [e.type for e in h.events if e.proposal is p]
    assert kinds.count(EventType.EQUIVOCATION) == 1
    page, _ = await h.core.list_evidence(
        page_size=10, page_token="", proposal_id=p.proposal_id, voter_id=""
    )
    assert [e.evidence_id for e in page] == [evidence_id]
    await h.core.mark_reported(evidence_id)
    assert evidence_id not in h.core.outbox and p.excluded[voters[0]].reported


async def test_bad_votes_are_refused_naming_the_field(h: Harness) -> None:
    voters = h.voters(4)
    outsider = h.registry.add("outsider").signer_id
    p = await h.propose(voters)
    with pytest.raises(NotFound) as err:
        await h.core.vote("no-such-proposal", voters[0], Choice.APPROVE, b"x" * 64)
    assert err.value.field == "proposal_id"
    with pytest.raises(PermissionDenied) as err:
        await h.vote(outsider, p.proposal_id)
    assert err.value.field == "voter_id" and err.value.reason == "NOT_IN_ELECTORATE"
    with pytest.raises(PermissionDenied):
        await h.core.vote(p.proposal_id, "never-registered", Choice.APPROVE, b"x" * 64)
    # Signed by someone else (voting for others), or over another choice.
    forged = h.sign(voters[1], p.proposal_id, Choice.APPROVE, as_id=voters[0])
    with pytest.raises(Unauthenticated) as err:
        await h.core.vote(p.proposal_id, voters[0], Choice.APPROVE, forged)
    assert err.value.field == "signature" and err.value.reason == "BAD_SIGNATURE"
    wrong_choice = h.sign(voters[0], p.proposal_id, Choice.REJECT)
    with pytest.raises(Unauthenticated):
        await h.core.vote(p.proposal_id, voters[0], Choice.APPROVE, wrong_choice)
    other = await h.propose(voters)
    replayed = h.sign(voters[0], other.proposal_id, Choice.APPROVE)
    with pytest.raises(Unauthenticated):
        await h.core.vote(p.proposal_id, voters[0], Choice.APPROVE, replayed)
    assert p.voted == 0 and p.approvals == 0 and not p.excluded
    # A forged conflicting vote is not equivocation: only a signed one is.
    await h.vote(voters[0], p.proposal_id)
    with pytest.raises(Unauthenticated):
        await h.core.vote(
            p.proposal_id,
            voters[0],
            Choice.REJECT,
            h.sign(voters[1], p.proposal_id, Choice.REJECT, as_id=voters[0]),
        )
    assert not p.excluded and p.approvals == 1


async def test_a_flood_of_forged_votes_changes_nothing(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters)
    attacker = voters[3]
    await asyncio.gather(
        *(
            h.core.vote(
                p.proposal_id,
                victim,
                Choice.REJECT,
                h.sign(attacker, p.proposal_id, Choice.REJECT, as_id=victim),
            )
            for victim in voters[:3]
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    assert p.voted == 0 and p.status is Status.OPEN
    # Each distinct forgery was verified once; its 19 repeats were not.
    assert h.verifier.calls == 3
    for voter in voters[:3]:
        await h.vote(voter, p.proposal_id)
    assert p.status is Status.APPROVED


async def test_deadlines_expire_and_close_voting(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters, deadline_wall=h.clock.now + 10)
    decided = await h.propose(voters, deadline_wall=h.clock.now + 10)
    for voter in voters[:3]:
        await h.vote(voter, decided.proposal_id)
    await h.vote(voters[0], p.proposal_id)
    h.clock.now += 10
    with pytest.raises(FailedPrecondition) as err:
        await h.vote(voters[1], p.proposal_id)
    assert err.value.reason == "VOTING_CLOSED" and err.value.field == "proposal_id"
    await asyncio.gather(*h.core.close_due(h.clock.now))
    assert p.status is Status.EXPIRED and p.decide_wall == p.deadline_wall
    assert decided.status is Status.APPROVED
    assert p.proposal_id not in h.core._live
    expired = [e for e in h.events if e.type is EventType.DECIDED and e.proposal is p]
    assert expired and expired[0].status is Status.EXPIRED
    # Closed proposals are read back from storage with their final tally.
    again = await h.core.get(p.proposal_id)
    assert again.status is Status.EXPIRED and again.approvals == 1 and again.closed
    with pytest.raises(FailedPrecondition):
        await h.vote(voters[1], p.proposal_id)
    stored = await h.core.get(decided.proposal_id)
    assert [v.voter_id for v in stored.certificate_votes()] == voters[:3]


async def test_proposals_are_validated_and_idempotent(h: Harness) -> None:
    voters = h.voters(3, "db", "database.query")
    with pytest.raises(InvalidArgument) as err:
        await h.propose(voters, deadline_wall=h.clock.now - 1)
    assert err.value.field == "deadline_time" and err.value.reason == "DEADLINE_IN_PAST"
    with pytest.raises(NotFound) as err:
        await h.propose([*voters, "ghost"])
    assert err.value.field == "voter_ids[3]"
    with pytest.raises(FailedPrecondition) as err:
        await h.core.propose(
            operation="op",
            proposer_id="me",
            strategy=Strategy.BYZANTINE,
            voter_ids=[],
            capability="ml.inference",
            deadline_wall=None,
        )
    assert err.value.reason == "EMPTY_ELECTORATE" and err.value.field == "electorate_capability"
    by_capability, duplicate = await h.core.propose(
        operation="op",
        proposer_id="me",
        strategy=Strategy.BYZANTINE,
        voter_ids=[],
        capability="database.query",
        deadline_wall=None,
        request_id="req-1",
    )
    assert not duplicate and sorted(by_capability.electorate) == sorted(voters)
    assert by_capability.deadline_wall == h.clock.now + 30  # the default period
    again, duplicate = await h.core.propose(
        operation="op",
        proposer_id="me",
        strategy=Strategy.BYZANTINE,
        voter_ids=[],
        capability="database.query",
        deadline_wall=None,
        request_id="req-1",
    )
    assert duplicate and again is by_capability
    named = await h.propose(voters, proposal_id="chaos-test")
    assert named.proposal_id == "chaos-test"
    with pytest.raises(AlreadyExists) as err:
        await h.propose(voters, proposal_id="chaos-test")
    assert err.value.field == "proposal_id"


async def test_concurrent_retries_of_one_propose_make_one_proposal(h: Harness) -> None:
    voters = h.voters(3)
    results = await asyncio.gather(
        *(h.propose(voters, request_id="same") for _ in range(5)), h.propose(voters)
    )
    assert len({p.proposal_id for p in results[:5]}) == 1
    page, _ = await h.core.list_proposals(page_size=100, page_token="", statuses=[])
    assert len(page) == 2


async def test_everything_survives_a_reopen(h: Harness) -> None:
    voters = h.voters(10)
    open_p = await h.propose(voters, deadline_wall=h.clock.now + 100)
    decided = await h.propose(voters, deadline_wall=h.clock.now + 100)
    short = await h.propose(voters, deadline_wall=h.clock.now + 5)
    for voter in voters[:5]:
        await h.vote(voter, open_p.proposal_id)
    for voter in voters[:7]:
        await h.vote(voter, decided.proposal_id)
    await h.vote(voters[9], open_p.proposal_id)
    with pytest.raises(AlreadyExists):
        await h.vote(voters[9], open_p.proposal_id, Choice.REJECT)
    last_index = h.core.committed_index
    live_events = list(h.events)
    await h.close()

    h.clock.now += 6  # "short" passed its deadline while the service was down
    core = await h.open()
    assert core.committed_index == last_index
    p = core._live[open_p.proposal_id]
    assert p.status is Status.OPEN and p.approvals == 5 and p.excluded_count == 1
    assert list(p.votes) == [*voters[:5], voters[9]]
    assert [o.subject_id for o in core.outbox.values()] == [voters[9]]
    d = await core.get(decided.proposal_id)
    assert d.status is Status.APPROVED and [v.voter_id for v in d.certificate_votes()] == voters[:7]

    # The deadline timer is rearmed: the overdue proposal expires on its own.
    async def expired() -> bool:
        return (await core.get(short.proposal_id)).status is Status.EXPIRED

    for _ in range(200):
        if await expired():
            break
        await asyncio.sleep(0.01)
    assert await expired()
    # The open proposal still decides.
    await h.vote(voters[5], open_p.proposal_id)
    assert p.status is Status.OPEN
    await h.vote(voters[6], open_p.proposal_id)
    assert p.status is Status.APPROVED
    # The whole history replays from storage exactly as it was published.
    replayed = await core.replay(0, last_index, limit=1000)
    assert [(e.index, e.type, e.status, e.tally) for e in replayed] == [
        (e.index, e.type, e.status, e.tally) for e in live_events
    ]
    assert [e.vote.signature if e.vote else None for e in replayed] == [
        e.vote.signature if e.vote else None for e in live_events
    ]


async def test_lists_paginate_newest_first(h: Harness) -> None:
    voters = h.voters(1)
    made = [await h.propose(voters, operation=f"op-{i}") for i in range(7)]
    await h.vote(voters[0], made[2].proposal_id)
    seen, token = [], ""
    while True:
        page, token = await h.core.list_proposals(page_size=3, page_token=token, statuses=[])
        seen += [p.operation for p in page]
        if not token:
            break
    assert seen == [f"op-{i}" for i in reversed(range(7))]
    approved, _ = await h.core.list_proposals(
        page_size=10, page_token="", statuses=[Status.APPROVED]
    )
    assert [p.operation for p in approved] == ["op-2"]
    with pytest.raises(InvalidArgument) as err:
        await h.core.list_proposals(page_size=3, page_token="garbage!", statuses=[])
    assert err.value.field == "page_token"


async def test_a_failed_commit_fails_its_writers_and_reloads_the_truth(h: Harness) -> None:
    voters = h.voters(4)
    p = await h.propose(voters)
    await h.vote(voters[0], p.proposal_id)
    real_write = h.db.write
    calls = 0

    async def failing_write(fn):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return await real_write(fn)

    h.db.write = failing_write  # type: ignore[method-assign]
    with pytest.raises(Unavailable) as err:
        await h.vote(voters[1], p.proposal_id)
    assert err.value.reason == "STORAGE_FAILED"
    # Memory was reloaded from storage: the failed vote is not there, and it
    # can simply be cast again.
    result = await h.vote(voters[1], p.proposal_id)
    assert not result.duplicate and result.tally.approvals == 2
    reloaded = await h.core.get(p.proposal_id)
    assert list(reloaded.votes) == voters[:2]
