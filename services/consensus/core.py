"""Byzantine-tolerant voting: quorum rules, proposals, signed votes, decisions,
equivocation evidence, and their durable state. No grpc here.

A proposal fixes its electorate when it is made (ids and Ed25519 keys, from
the registry through an ``ElectorateResolver``). A vote counts once it is
verified (through a ``SignatureVerifier``) against the voter's key and
committed. With n the electorate size and v the valid approvals of voters
that did not equivocate:

- SIMPLE_MAJORITY decides at v * 2 > n;
- BYZANTINE at v >= floor((n + f) / 2) + 1 with f = floor((n - 1) / 3);
- UNANIMOUS at v == n;

and a proposal is REJECTED as soon as v plus the members yet to vote cannot
reach the quorum, EXPIRED when its deadline passes undecided. A decision is
final and carries its quorum certificate (the deciding signed votes). Votes
are accepted until the deadline, also after a decision, so late honest votes
and late equivocation are still recorded.

Every change is made in memory and submitted to the ``Journal`` in one
synchronous step, and acknowledged (and published to watchers) only after its
commit: an acknowledged vote survives ``kill -9``, and on start the live
proposals are loaded back and their deadlines rearmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from services.common import signing
from services.common.crypto import canonical
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.storage import Database
from services.common.validation import decode_page_token, encode_page_token
from services.consensus import store
from services.consensus.store import Journal, StorageFailed

log = logging.getLogger(__name__)

# Forged votes remembered, so the same one sent again is refused unverified.
BAD_SIGNATURES_REMEMBERED = 4096


class Strategy(IntEnum):
    SIMPLE_MAJORITY = 1
    BYZANTINE = 2
    UNANIMOUS = 3


class Choice(IntEnum):
    APPROVE = 1
    REJECT = 2

    @property
    def label(self) -> str:
        """The word the vote signature covers."""
        return "approve" if self is Choice.APPROVE else "reject"


class Status(IntEnum):
    OPEN = 1
    APPROVED = 2
    REJECTED = 3
    EXPIRED = 4


class EventType(IntEnum):
    PROPOSED = 1
    VOTE_RECORDED = 2
    EQUIVOCATION = 3
    DECIDED = 4


# --- the quorum rules ----------------------------------------------------------------


def max_faulty(n: int) -> int:
    """f: how many Byzantine voters n voters tolerate (n >= 3f + 1)."""
    if n < 1:
        raise ValueError(f"an electorate has at least one voter, not {n}")
    return (n - 1) // 3


def quorum(strategy: Strategy, n: int) -> int:
    """Approvals needed to decide among n voters."""
    if n < 1:
        raise ValueError(f"an electorate has at least one voter, not {n}")
    if strategy is Strategy.SIMPLE_MAJORITY:
        return n // 2 + 1
    if strategy is Strategy.BYZANTINE:
        # Any two quorums overlap in more than f voters, so at least one
        # honest voter is in both: two conflicting certificates cannot form.
        return (n + max_faulty(n)) // 2 + 1
    if strategy is Strategy.UNANIMOUS:
        return n
    raise ValueError(f"unknown strategy {strategy!r}")


def has_consensus(approvals: int, n: int, strategy: Strategy = Strategy.BYZANTINE) -> bool:
    return approvals >= quorum(strategy, n)


# --- the state -------------------------------------------------------------------------


@dataclass
class VoteRecord:
    voter_id: str
    choice: Choice
    signature: bytes
    receive_wall: float
    # The event index it was recorded under: arrival order across the service.
    arrival: int = 0


@dataclass
class Evidence:
    evidence_id: str
    proposal_id: str
    voter_id: str
    first: VoteRecord
    second: VoteRecord
    detect_wall: float
    reported: bool = False


@dataclass(frozen=True)
class Tally:
    electorate_size: int
    quorum: int
    approvals: int
    rejections: int
    excluded: int
    outstanding: int


@dataclass
class ProposalState:
    seq: int
    proposal_id: str
    operation: str
    proposer_id: str
    strategy: Strategy
    electorate_capability: str
    electorate_size: int
    create_wall: float
    deadline_wall: float
    request_id: str = ""
    # voter id -> public key; empty for a closed proposal loaded without details.
    electorate: dict[str, bytes] = field(default_factory=dict)
    # voter id -> that voter's first vote, in arrival order.
    votes: dict[str, VoteRecord] = field(default_factory=dict)
    # voter id -> the evidence that excluded it.
    excluded: dict[str, Evidence] = field(default_factory=dict)
    approvals: int = 0
    rejections: int = 0
    excluded_count: int = 0
    voted: int = 0
    status: Status = Status.OPEN
    decide_wall: float | None = None
    certificate_voters: list[str] = field(default_factory=list)
    certificate_evidence: list[str] = field(default_factory=list)
    closed: bool = False
    details_loaded: bool = True
    last_write: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def quorum(self) -> int:
        return quorum(self.strategy, self.electorate_size)

    @property
    def outstanding(self) -> int:
        return self.electorate_size - self.voted

    def tally(self) -> Tally:
        return Tally(
            electorate_size=self.electorate_size,
            quorum=self.quorum,
            approvals=self.approvals,
            rejections=self.rejections,
            excluded=self.excluded_count,
            outstanding=self.outstanding,
        )

    def accepting(self, now: float) -> bool:
        return not self.closed and now < self.deadline_wall

    def certificate_votes(self) -> list[VoteRecord]:
        return [self.votes[v] for v in self.certificate_voters if v in self.votes]


@dataclass
class Event:
    index: int
    type: EventType
    proposal: ProposalState
    # The proposal's status and tally as of this event.
    status: Status
    tally: Tally
    wall: float
    vote: VoteRecord | None = None
    evidence: Evidence | None = None


@dataclass
class VoteResult:
    duplicate: bool
    counted: bool
    status: Status
    tally: Tally


@dataclass
class OutboxItem:
    evidence_id: str
    subject_id: str
    detect_wall: float


@dataclass(frozen=True)
class ConsensusSettings:
    default_voting_period_s: float = 30.0
    max_voting_period_s: float = 7 * 86400.0
    max_electorate: int = 5000
    max_open_proposals: int = 10_000


class ElectorateResolver(Protocol):
    """Where voters and their keys come from (the registry, in the service)."""

    async def by_ids(self, voter_ids: Sequence[str], timeout_s: float) -> list[tuple[str, bytes]]:
        """Each id's public key; NotFound naming ``voter_ids[i]`` for an unknown one."""
        ...

    async def by_capability(
        self, capability: str, limit: int, timeout_s: float
    ) -> list[tuple[str, bytes]]:
        """Every passing agent holding ``capability`` (at most limit + 1)."""
        ...


class SignatureVerifier(Protocol):
    async def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool: ...


def vote_message(proposal_id: str, voter_id: str, choice: Choice) -> bytes:
    """The bytes a vote's signature covers."""
    return canonical(*signing.vote(proposal_id, voter_id, choice.label))


# --- the core --------------------------------------------------------------------------


class ConsensusCore:
    def __init__(
        self,
        db: Database,
        settings: ConsensusSettings,
        *,
        resolver: ElectorateResolver,
        verifier: SignatureVerifier,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.settings = settings
        self.resolver = resolver
        self.verifier = verifier
        self.clock = clock
        self.journal = Journal(db, self._storage_failed)
        # Proposals whose deadline has not been processed yet, by id and seq.
        self._live: dict[str, ProposalState] = {}
        self._live_by_seq: dict[int, ProposalState] = {}
        self._live_by_request: dict[str, ProposalState] = {}
        # Ids being proposed right now, and Propose calls in flight by request_id.
        self._reserved: set[str] = set()
        self._proposing: dict[str, asyncio.Future[ProposalState]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._timer_wake = asyncio.Event()
        self._listeners: list[Callable[[Event], None]] = []
        self._next_seq = 1
        self._next_event = 1
        self.committed_index = 0
        self.outbox: dict[str, OutboxItem] = {}
        self.outbox_changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._bad_signatures: OrderedDict[tuple[str, str, Choice, bytes], None] = OrderedDict()

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Loads the live proposals and the trust outbox back from storage."""
        await self._load()
        self.journal.start()
        self._timer = asyncio.create_task(self._run_timer(), name="consensus-deadlines")
        # Proposals that met their rule while their decision was being written
        # are decided now (a committed vote set always carries its decision,
        # so this only repairs, never changes, what was acknowledged).
        now = self.clock()
        for p in list(self._live.values()):
            if p.status is Status.OPEN:
                events: list[Event] = []
                if self._decide(p, now):
                    events.append(self._event(EventType.DECIDED, p))
                    self._submit(p, self._decision_write(p, events), events)
        self._ready.set()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        await self.journal.stop()

    async def _load(self) -> None:
        proposal_seq, event_index, _ = await self.db.read(store.counters)
        self._next_seq = proposal_seq + 1
        self._next_event = event_index + 1
        self.committed_index = event_index
        rows = await self.db.read(store.live_proposals)
        self._live.clear()
        self._live_by_seq.clear()
        self._live_by_request.clear()
        self._deadlines.clear()
        for row in rows:
            details = await self.db.read(lambda conn, seq=row[0]: store.proposal_details(conn, seq))
            p = _state_from_row(row, details)
            self._add_live(p)
        self.outbox = {
            evidence_id: OutboxItem(evidence_id, subject, detect)
            for evidence_id, subject, detect in await self.db.read(store.outbox)
        }
        if self.outbox:
            self.outbox_changed.set()
        log.info(
            "consensus state loaded: %d live proposals, %d evidence reports owed to trust, "
            "event index %d",
            len(self._live),
            len(self.outbox),
            self.committed_index,
        )

    def _add_live(self, p: ProposalState) -> None:
        self._live[p.proposal_id] = p
        self._live_by_seq[p.seq] = p
        if p.request_id:
            self._live_by_request[p.request_id] = p
        heapq.heappush(self._deadlines, (p.deadline_wall, p.seq, p.proposal_id))
        if self._deadlines[0][2] == p.proposal_id:
            self._timer_wake.set()

    def _evict(self, p: ProposalState) -> None:
        if self._live.get(p.proposal_id) is p:
            del self._live[p.proposal_id]
            self._live_by_seq.pop(p.seq, None)
            if p.request_id:
                self._live_by_request.pop(p.request_id, None)

    def _storage_failed(self, exc: BaseException) -> None:
        """A commit failed: memory is ahead of storage. Everything queued after
        it was built on that memory, so it fails too, and memory is reloaded
        from storage (the truth) before anything else is served."""
        self._ready.clear()
        self.journal.fail_pending(StorageFailed(f"an earlier write failed: {exc}"))
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reload())

    async def _reload(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._load()
                break
            except Exception:
                log.exception("consensus: reloading state after a failed write failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._ready.set()

    async def _wait_ready(self) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), 5.0)
            except TimeoutError:
                raise Unavailable(
                    "consensus storage is recovering from a failed write; retry",
                    reason="STORAGE_RECOVERING",
                ) from None

    # --- listeners ---------------------------------------------------------------------

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """``listener`` is called with every event once it is durable, in index order."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _event(
        self,
        type_: EventType,
        p: ProposalState,
        *,
        vote: VoteRecord | None = None,
        evidence: Evidence | None = None,
    ) -> Event:
        index = self._next_event
        self._next_event += 1
        return Event(
            index=index,
            type=type_,
            proposal=p,
            status=p.status,
            tally=p.tally(),
            wall=self.clock(),
            vote=vote,
            evidence=evidence,
        )

    @staticmethod
    def _event_row(event: Event) -> tuple[Any, ...]:
        t = event.tally
        voter = (
            event.vote.voter_id
            if event.vote
            else (event.evidence.voter_id if event.evidence else "")
        )
        return (
            event.index,
            int(event.type),
            event.proposal.seq,
            voter,
            event.wall,
            int(event.status),
            t.approvals,
            t.rejections,
            t.excluded,
            t.electorate_size - t.outstanding,
        )

    def _submit(
        self,
        p: ProposalState | None,
        write: Callable[[sqlite3.Connection], None],
        events: list[Event],
        before_publish: Callable[[], None] | None = None,
    ) -> asyncio.Future[None]:
        def on_commit() -> None:
            if before_publish is not None:
                before_publish()
            for event in events:
                self.committed_index = event.index
                for listener in list(self._listeners):
                    try:
                        listener(event)
                    except Exception:
                        log.exception("consensus listener failed")

        future = self.journal.submit(write, on_commit)
        if p is not None:
            p.last_write = future
        return future

    @staticmethod
    async def _committed(future: asyncio.Future[None]) -> None:
        try:
            await asyncio.shield(future)
        except StorageFailed as exc:
            raise Unavailable(
                f"the change could not be stored ({exc}); retry", reason="STORAGE_FAILED"
            ) from None

    @staticmethod
    async def _settled(p: ProposalState) -> None:
        """Waits until every change already made to ``p`` is durable, so a
        reader never sees what a crash could still take back."""
        # Changes made while waiting are waited for too, a few rounds at most
        # so a reader is not starved by a proposal that keeps taking votes.
        for _ in range(3):
            pending = p.last_write
            if pending is None or pending.done():
                return
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)

    # --- proposing ---------------------------------------------------------------------

    async def propose(
        self,
        *,
        operation: str,
        proposer_id: str,
        strategy: Strategy,
        voter_ids: Sequence[str],
        capability: str,
        deadline_wall: float | None,
        proposal_id: str = "",
        request_id: str = "",
        timeout_s: float = 5.0,
    ) -> tuple[ProposalState, bool]:
        """Creates a proposal; returns it and whether request_id had already
        created it. Validation of the fields' shapes is the servicer's."""
        await self._wait_ready()
        if request_id:
            found = await self._by_request(request_id)
            if found is not None:
                return found, True
            pending = self._proposing.get(request_id)
            if pending is not None:
                return await asyncio.shield(pending), True
        if proposal_id:
            if (
                proposal_id in self._live
                or proposal_id in self._reserved
                or await self.db.read(lambda conn: store.proposal_by_id(conn, proposal_id))
            ):
                raise AlreadyExists(
                    f"proposal {proposal_id} already exists",
                    field="proposal_id",
                    reason="PROPOSAL_EXISTS",
                )
        else:
            proposal_id = str(uuid.uuid4())
        if len(self._live) + len(self._reserved) >= self.settings.max_open_proposals:
            raise ResourceExhausted(
                f"{len(self._live)} proposals are open, the most this service keeps; "
                "wait for some to close",
                reason="TOO_MANY_OPEN_PROPOSALS",
            )
        now = self.clock()
        deadline = self._check_deadline(deadline_wall, now)
        self._reserved.add(proposal_id)
        pending_future: asyncio.Future[ProposalState] | None = None
        if request_id:
            pending_future = asyncio.get_running_loop().create_future()
            self._proposing[request_id] = pending_future
        try:
            electorate = await self._resolve(voter_ids, capability, timeout_s)
            now = self.clock()
            if deadline <= now:
                raise InvalidArgument(
                    "the deadline passed while the electorate was being resolved",
                    field="deadline_time",
                    reason="DEADLINE_IN_PAST",
                )
            p = ProposalState(
                seq=self._next_seq,
                proposal_id=proposal_id,
                operation=operation,
                proposer_id=proposer_id,
                strategy=strategy,
                electorate_capability=capability,
                electorate_size=len(electorate),
                create_wall=now,
                deadline_wall=deadline,
                request_id=request_id,
                electorate=dict(electorate),
            )
            self._next_seq += 1
            event = self._event(EventType.PROPOSED, p)
            row = (
                p.seq,
                p.proposal_id,
                p.operation,
                p.proposer_id,
                int(p.strategy),
                p.electorate_capability,
                p.electorate_size,
                p.create_wall,
                p.deadline_wall,
                p.request_id or None,
                int(p.status),
            )
            event_row = self._event_row(event)

            def write(conn: sqlite3.Connection) -> None:
                store.insert_proposal(conn, row, electorate)
                store.insert_event(conn, event_row)

            await self._committed(
                self._submit(p, write, [event], before_publish=lambda: self._add_live(p))
            )
            if pending_future is not None:
                pending_future.set_result(p)
            log.info(
                "proposal %s: %s by %s, %s, %d voters, deadline in %.1fs",
                p.proposal_id,
                p.operation,
                p.proposer_id,
                p.strategy.name,
                p.electorate_size,
                p.deadline_wall - now,
            )
            return p, False
        except BaseException as exc:
            if pending_future is not None and not pending_future.done():
                if isinstance(exc, asyncio.CancelledError):
                    pending_future.cancel()
                else:
                    pending_future.set_exception(exc)
                    # Retrieved here so an unawaited failure is not logged as lost.
                    pending_future.exception()
            raise
        finally:
            self._reserved.discard(proposal_id)
            if request_id:
                self._proposing.pop(request_id, None)

    def _check_deadline(self, deadline_wall: float | None, now: float) -> float:
        if deadline_wall is None:
            return now + self.settings.default_voting_period_s
        if deadline_wall <= now:
            raise InvalidArgument(
                f"deadline_time is {now - deadline_wall:.3f}s in the past",
                field="deadline_time",
                reason="DEADLINE_IN_PAST",
            )
        if deadline_wall - now > self.settings.max_voting_period_s:
            raise InvalidArgument(
                f"the deadline is {deadline_wall - now:.0f}s away; at most "
                f"{self.settings.max_voting_period_s:.0f}s allowed",
                field="deadline_time",
                reason="OUT_OF_RANGE",
            )
        return deadline_wall

    async def _resolve(
        self, voter_ids: Sequence[str], capability: str, timeout_s: float
    ) -> list[tuple[str, bytes]]:
        limit = self.settings.max_electorate
        if voter_ids:
            if len(voter_ids) > limit:
                raise InvalidArgument(
                    f"voter_ids holds {len(voter_ids)} ids; at most {limit} allowed",
                    field="voter_ids",
                    reason="TOO_MANY_VALUES",
                )
            electorate = await self.resolver.by_ids(voter_ids, timeout_s)
        else:
            electorate = await self.resolver.by_capability(capability, limit, timeout_s)
            if not electorate:
                raise FailedPrecondition(
                    f"no passing agent holds {capability!r}: the electorate would be empty",
                    field="electorate_capability",
                    reason="EMPTY_ELECTORATE",
                )
            if len(electorate) > limit:
                raise FailedPrecondition(
                    f"more than {limit} passing agents hold {capability!r}, the largest "
                    "electorate this service accepts",
                    field="electorate_capability",
                    reason="ELECTORATE_TOO_LARGE",
                )
        return sorted(electorate)

    async def _by_request(self, request_id: str) -> ProposalState | None:
        p = self._live_by_request.get(request_id)
        if p is not None:
            await self._settled(p)
            return p
        row = await self.db.read(lambda conn: store.proposal_by_request(conn, request_id))
        if row is None:
            return None
        live = self._live.get(row[1])
        return live if live is not None else _state_from_row(row, None)

    # --- voting ------------------------------------------------------------------------

    async def vote(
        self, proposal_id: str, voter_id: str, choice: Choice, signature: bytes
    ) -> VoteResult:
        """Records one signed vote (see the module docstring). Raises NotFound,
        FailedPrecondition (VOTING_CLOSED), PermissionDenied (NOT_IN_ELECTORATE),
        Unauthenticated (BAD_SIGNATURE), or AlreadyExists (EQUIVOCATION, after
        the evidence is durable)."""
        # When the vote arrived, before verification: its receive_time.
        arrived = self.clock()
        if not self._ready.is_set():
            await self._wait_ready()
        p = self._live.get(proposal_id)
        if p is None or not p.accepting(arrived):
            p = await self._accepting(proposal_id)
        public_key = p.electorate.get(voter_id)
        if public_key is None:
            raise PermissionDenied(
                f"{voter_id} is not in the electorate of proposal {proposal_id} (only agents "
                "registered, and holding its capability, when it was proposed may vote)",
                field="voter_id",
                reason="NOT_IN_ELECTORATE",
            )
        known = self._known(p, voter_id, choice, signature, verified=False)
        if known is not None:
            await self._settled(p)
            return known
        bad_key = (proposal_id, voter_id, choice, bytes(signature))
        ok = bad_key not in self._bad_signatures and await self.verifier.verify(
            public_key, signature, vote_message(proposal_id, voter_id, choice)
        )
        if not ok:
            # A flood of the same forged vote costs one verification, not one each.
            self._bad_signatures[bad_key] = None
            if len(self._bad_signatures) > BAD_SIGNATURES_REMEMBERED:
                self._bad_signatures.popitem(last=False)
            raise Unauthenticated(
                f"the signature is not {voter_id}'s over its {choice.label} vote on {proposal_id}",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        # Verification awaited: the proposal may have closed or been reloaded,
        # and this voter's other vote may have landed meanwhile.
        if not self._ready.is_set():
            await self._wait_ready()
        now = self.clock()
        p = self._live.get(proposal_id)
        if p is None or not p.accepting(now):
            p = await self._accepting(proposal_id)
        known = self._known(p, voter_id, choice, signature, verified=True)
        if known is not None:
            await self._settled(p)
            return known
        record = VoteRecord(voter_id, choice, bytes(signature), arrived)
        first = p.votes.get(voter_id)
        if first is None:
            return await self._record_vote(p, record, now)
        await self._record_equivocation(p, first, record, now)
        raise AssertionError("unreachable: equivocation raises")

    async def _accepting(self, proposal_id: str) -> ProposalState:
        p = self._live.get(proposal_id)
        if p is None:
            row = await self.db.read(lambda conn: store.proposal_by_id(conn, proposal_id))
            if row is None:
                raise NotFound(
                    f"no proposal {proposal_id}", field="proposal_id", reason="PROPOSAL_NOT_FOUND"
                )
            p = self._live.get(proposal_id) or _state_from_row(row, None)
        if not p.accepting(self.clock()):
            raise FailedPrecondition(
                f"voting on proposal {proposal_id} closed at its deadline "
                f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(p.deadline_wall))})",
                field="proposal_id",
                reason="VOTING_CLOSED",
                metadata={"status": p.status.name},
            )
        return p

    def _known(
        self, p: ProposalState, voter_id: str, choice: Choice, signature: bytes, *, verified: bool
    ) -> VoteResult | None:
        """The answer for a vote that changes nothing, or None. Unverified, only
        the exact bytes already verified are recognised."""
        first = p.votes.get(voter_id)
        if first is None:
            return None
        evidence = p.excluded.get(voter_id)
        if evidence is not None:
            # Both choices are already on record as evidence: nothing can change.
            if verified or signature in (evidence.first.signature, evidence.second.signature):
                return VoteResult(True, False, p.status, p.tally())
            return None
        if first.choice == choice and (verified or first.signature == signature):
            return VoteResult(True, True, p.status, p.tally())
        return None

    async def _record_vote(self, p: ProposalState, record: VoteRecord, now: float) -> VoteResult:
        p.votes[record.voter_id] = record
        p.voted += 1
        if record.choice is Choice.APPROVE:
            p.approvals += 1
        else:
            p.rejections += 1
        event = self._event(EventType.VOTE_RECORDED, p, vote=record)
        record.arrival = event.index
        events = [event]
        decided = self._decide(p, now)
        if decided:
            events.append(self._event(EventType.DECIDED, p))
        result = VoteResult(False, True, p.status, p.tally())
        vote_row = (
            p.seq,
            record.voter_id,
            record.arrival,
            int(record.choice),
            record.signature,
            record.receive_wall,
        )
        event_rows = [self._event_row(e) for e in events]
        decision = self._decision_args(p) if decided else None

        def write(conn: sqlite3.Connection) -> None:
            store.insert_vote(conn, *vote_row)
            for event_row in event_rows:
                store.insert_event(conn, event_row)
            if decision is not None:
                store.record_decision(conn, *decision)

        await self._committed(self._submit(p, write, events))
        return result

    async def _record_equivocation(
        self, p: ProposalState, first: VoteRecord, second: VoteRecord, now: float
    ) -> None:
        evidence = Evidence(
            evidence_id=f"ev-{uuid.uuid4().hex}",
            proposal_id=p.proposal_id,
            voter_id=first.voter_id,
            first=first,
            second=second,
            detect_wall=now,
        )
        p.excluded[first.voter_id] = evidence
        p.excluded_count += 1
        if first.choice is Choice.APPROVE:
            p.approvals -= 1
        else:
            p.rejections -= 1
        events = [self._event(EventType.EQUIVOCATION, p, evidence=evidence)]
        decided = self._decide(p, now)
        if decided:
            events.append(self._event(EventType.DECIDED, p))
        evidence_row = (
            evidence.evidence_id,
            p.seq,
            evidence.voter_id,
            int(first.choice),
            first.signature,
            first.receive_wall,
            int(second.choice),
            second.signature,
            second.receive_wall,
            now,
        )
        event_rows = [self._event_row(e) for e in events]
        decision = self._decision_args(p) if decided else None

        def write(conn: sqlite3.Connection) -> None:
            store.insert_evidence(conn, evidence_row, evidence.voter_id)
            for event_row in event_rows:
                store.insert_event(conn, event_row)
            if decision is not None:
                store.record_decision(conn, *decision)

        def owe_report() -> None:
            self.outbox[evidence.evidence_id] = OutboxItem(
                evidence.evidence_id, evidence.voter_id, now
            )
            self.outbox_changed.set()

        await self._committed(self._submit(p, write, events, before_publish=owe_report))
        log.warning(
            "equivocation by %s on proposal %s (%s then %s): evidence %s; its votes no "
            "longer count",
            evidence.voter_id,
            p.proposal_id,
            first.choice.label,
            second.choice.label,
            evidence.evidence_id,
        )
        raise AlreadyExists(
            f"{evidence.voter_id} already voted {first.choice.label} on {p.proposal_id}; a "
            f"conflicting signed vote is equivocation: both are kept as evidence "
            f"{evidence.evidence_id}, none of its votes count, and trust is told",
            field="choice",
            reason="EQUIVOCATION",
            metadata={"evidence_id": evidence.evidence_id, "proposal_id": p.proposal_id},
        )

    def _decide(self, p: ProposalState, now: float) -> bool:
        """Decides ``p`` if its rule is now met either way; True when it did."""
        if p.status is not Status.OPEN:
            return False
        needed = p.quorum
        if p.approvals >= needed:
            p.status = Status.APPROVED
            p.certificate_voters = [
                v for v, r in p.votes.items() if r.choice is Choice.APPROVE and v not in p.excluded
            ]
            p.certificate_evidence = []
        elif p.approvals + p.outstanding < needed:
            p.status = Status.REJECTED
            p.certificate_voters = [
                v for v, r in p.votes.items() if r.choice is Choice.REJECT and v not in p.excluded
            ]
            p.certificate_evidence = [e.evidence_id for e in p.excluded.values()]
        else:
            return False
        p.decide_wall = now
        log.info(
            "proposal %s %s: %d approvals, %d rejections, %d excluded of %d (quorum %d)",
            p.proposal_id,
            p.status.name,
            p.approvals,
            p.rejections,
            p.excluded_count,
            p.electorate_size,
            needed,
        )
        return True

    @staticmethod
    def _decision_args(p: ProposalState) -> tuple[Any, ...]:
        return (
            p.seq,
            int(p.status),
            p.decide_wall,
            list(p.certificate_voters),
            list(p.certificate_evidence),
        )

    def _decision_write(
        self, p: ProposalState, events: list[Event]
    ) -> Callable[[sqlite3.Connection], None]:
        decision = self._decision_args(p)
        event_rows = [self._event_row(e) for e in events]

        def write(conn: sqlite3.Connection) -> None:
            for event_row in event_rows:
                store.insert_event(conn, event_row)
            store.record_decision(conn, *decision)

        return write

    # --- deadlines ---------------------------------------------------------------------

    async def _run_timer(self) -> None:
        while True:
            try:
                if self._ready.is_set():
                    self.close_due(self.clock())
            except Exception:
                log.exception("consensus: closing due proposals failed")
            delay = 5.0
            if self._deadlines:
                # Capped so a jump of the wall clock is noticed soon.
                delay = min(max(self._deadlines[0][0] - self.clock(), 0.0), 5.0)
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), delay + 0.001)

    def close_due(self, now: float) -> list[asyncio.Future[None]]:
        """Closes every proposal whose deadline has passed: an undecided one
        EXPIRES; all stop accepting votes and leave memory once stored."""
        futures = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, proposal_id = heapq.heappop(self._deadlines)
            p = self._live.get(proposal_id)
            if p is None or p.closed:
                continue
            p.closed = True
            events = []
            if p.status is Status.OPEN:
                p.status = Status.EXPIRED
                p.decide_wall = p.deadline_wall
                events.append(self._event(EventType.DECIDED, p))
                log.info(
                    "proposal %s expired undecided: %d approvals of %d needed",
                    p.proposal_id,
                    p.approvals,
                    p.quorum,
                )
            args = (
                p.seq,
                int(p.status),
                p.decide_wall,
                p.approvals,
                p.rejections,
                p.excluded_count,
                p.voted,
            )
            event_rows = [self._event_row(e) for e in events]

            def write(
                conn: sqlite3.Connection,
                args: tuple[Any, ...] = args,
                event_rows: list[tuple[Any, ...]] = event_rows,
            ) -> None:
                for event_row in event_rows:
                    store.insert_event(conn, event_row)
                store.close_proposal(conn, *args)

            def evict(p: ProposalState = p) -> None:
                self._evict(p)

            future = self._submit(p, write, events)
            future.add_done_callback(
                lambda f, evict=evict: (
                    evict() if not f.cancelled() and f.exception() is None else None
                )
            )
            futures.append(future)
        return futures

    # --- reading -----------------------------------------------------------------------

    async def get(self, proposal_id: str, *, full: bool = True) -> ProposalState:
        p = self._live.get(proposal_id)
        if p is not None:
            await self._settled(p)
            return p
        row = await self.db.read(lambda conn: store.proposal_by_id(conn, proposal_id))
        if row is None:
            raise NotFound(
                f"no proposal {proposal_id}", field="proposal_id", reason="PROPOSAL_NOT_FOUND"
            )
        live = self._live.get(proposal_id)
        if live is not None:
            return live
        details = (
            await self.db.read(lambda conn: store.proposal_details(conn, row[0])) if full else None
        )
        return _state_from_row(row, details)

    async def list_proposals(
        self, *, page_size: int, page_token: str, statuses: Sequence[Status], full: bool = False
    ) -> tuple[list[ProposalState], str]:
        position = decode_page_token(page_token)
        before = position.get("before_seq")
        if page_token and not isinstance(before, int):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        rows = await self.db.read(
            lambda conn: store.proposals_page(
                conn, before, [int(s) for s in statuses], page_size + 1
            )
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        out = []
        for row in rows:
            live = self._live.get(row[1])
            if live is not None:
                out.append(live)
                continue
            details = (
                await self.db.read(lambda conn, seq=row[0]: store.proposal_details(conn, seq))
                if full
                else None
            )
            out.append(_state_from_row(row, details))
        token = encode_page_token({"before_seq": rows[-1][0]}) if more and rows else ""
        return out, token

    async def has_consensus(
        self, proposal_id: str, total_agents: int, strategy: Strategy
    ) -> tuple[bool, int, int, int]:
        """(reached, approvals, quorum, n) for the valid approvals recorded."""
        p = await self.get(proposal_id, full=False)
        n = total_agents or p.electorate_size
        needed = quorum(strategy, n)
        return p.approvals >= needed, p.approvals, needed, n

    async def list_evidence(
        self, *, page_size: int, page_token: str, proposal_id: str, voter_id: str
    ) -> tuple[list[Evidence], str]:
        position = decode_page_token(page_token)
        before = position.get("before_seq")
        if page_token and not isinstance(before, int):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        rows = await self.db.read(
            lambda conn: store.evidence_page(conn, before, proposal_id, voter_id, page_size + 1)
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = encode_page_token({"before_seq": rows[-1][11]}) if more and rows else ""
        return [_evidence_from_row(r) for r in rows], token

    def accepting_proposals(self, voter_id: str = "") -> list[ProposalState]:
        """Live proposals still taking votes (those ``voter_id`` may vote on)."""
        now = self.clock()
        return [
            p
            for p in self._live.values()
            if p.accepting(now) and (not voter_id or voter_id in p.electorate)
        ]

    async def proposal_seq(self, proposal_id: str) -> int:
        p = self._live.get(proposal_id)
        if p is not None:
            return p.seq
        row = await self.db.read(lambda conn: store.proposal_by_id(conn, proposal_id))
        if row is None:
            raise NotFound(
                f"no proposal {proposal_id}", field="proposal_id", reason="PROPOSAL_NOT_FOUND"
            )
        return int(row[0])

    async def replay(
        self,
        after: int,
        upto: int,
        *,
        proposal_seq: int | None = None,
        types: Sequence[EventType] = (),
        limit: int = 256,
    ) -> list[Event]:
        """Durable events with after < index <= upto, rebuilt from storage."""
        rows = await self.db.read(
            lambda conn: store.events_range(
                conn, after, upto, proposal_seq, [int(t) for t in types], limit
            )
        )
        states: dict[int, ProposalState] = {}
        events = []
        for (
            index,
            type_,
            seq,
            voter_id,
            wall,
            status,
            approvals,
            rejections,
            excluded,
            voted,
        ) in rows:
            p = states.get(seq) or self._live_by_seq.get(seq)
            if p is None:
                row = await self.db.read(lambda conn, seq=seq: store.proposal_by_seq(conn, seq))
                details = await self.db.read(
                    lambda conn, seq=seq: store.proposal_details(conn, seq)
                )
                p = _state_from_row(row, details)
            states[seq] = p
            kind = EventType(type_)
            events.append(
                Event(
                    index=index,
                    type=kind,
                    proposal=p,
                    status=Status(status),
                    tally=Tally(
                        electorate_size=p.electorate_size,
                        quorum=p.quorum,
                        approvals=approvals,
                        rejections=rejections,
                        excluded=excluded,
                        outstanding=p.electorate_size - voted,
                    ),
                    wall=wall,
                    vote=p.votes.get(voter_id) if kind is EventType.VOTE_RECORDED else None,
                    evidence=p.excluded.get(voter_id) if kind is EventType.EQUIVOCATION else None,
                )
            )
        return events

    # --- the trust outbox --------------------------------------------------------------

    async def mark_reported(self, evidence_id: str) -> None:
        """Trust has recorded this evidence's CompleteFailure."""

        def done() -> None:
            self.outbox.pop(evidence_id, None)
            for p in self._live.values():
                for evidence in p.excluded.values():
                    if evidence.evidence_id == evidence_id:
                        evidence.reported = True

        await self._committed(
            self._submit(
                None,
                lambda conn: store.mark_reported(conn, evidence_id),
                [],
                before_publish=done,
            )
        )


# --- rows to state ---------------------------------------------------------------------


def _state_from_row(
    row: Sequence[Any],
    details: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]] | None,
) -> ProposalState:
    (
        seq,
        proposal_id,
        operation,
        proposer_id,
        strategy,
        capability,
        size,
        create_time,
        deadline_time,
        request_id,
        status,
        decide_time,
        certificate,
        approvals,
        rejections,
        excluded,
        voted,
        closed,
    ) = row
    cert = json.loads(certificate) if certificate else {"voters": [], "evidence": []}
    p = ProposalState(
        seq=seq,
        proposal_id=proposal_id,
        operation=operation,
        proposer_id=proposer_id,
        strategy=Strategy(strategy),
        electorate_capability=capability,
        electorate_size=size,
        create_wall=create_time,
        deadline_wall=deadline_time,
        request_id=request_id or "",
        status=Status(status),
        decide_wall=decide_time,
        certificate_voters=list(cert.get("voters", [])),
        certificate_evidence=list(cert.get("evidence", [])),
        closed=bool(closed),
        details_loaded=details is not None,
        approvals=approvals,
        rejections=rejections,
        excluded_count=excluded,
        voted=voted,
    )
    if details is None:
        return p
    electorate, votes, evidence = details
    p.electorate = {voter_id: bytes(key) for voter_id, key in electorate}
    p.votes = {
        voter_id: VoteRecord(voter_id, Choice(choice), bytes(signature), receive_time, arrival)
        for voter_id, choice, signature, receive_time, arrival in votes
    }
    p.excluded = {}
    for evidence_row in evidence:
        item = _evidence_from_row(evidence_row)
        # The first vote on record is the one in the votes table.
        item.first = p.votes.get(item.voter_id, item.first)
        p.excluded[item.voter_id] = item
    # Counted from the votes themselves: the stored tally is written only at close.
    p.voted = len(p.votes)
    p.excluded_count = len(p.excluded)
    p.approvals = sum(
        1 for v, r in p.votes.items() if r.choice is Choice.APPROVE and v not in p.excluded
    )
    p.rejections = sum(
        1 for v, r in p.votes.items() if r.choice is Choice.REJECT and v not in p.excluded
    )
    return p


def _evidence_from_row(row: Sequence[Any]) -> Evidence:
    (
        evidence_id,
        proposal_id,
        voter_id,
        first_choice,
        first_signature,
        first_time,
        second_choice,
        second_signature,
        second_time,
        detect_time,
        reported,
        _seq,
    ) = row
    return Evidence(
        evidence_id=evidence_id,
        proposal_id=proposal_id,
        voter_id=voter_id,
        first=VoteRecord(voter_id, Choice(first_choice), bytes(first_signature), first_time),
        second=VoteRecord(voter_id, Choice(second_choice), bytes(second_signature), second_time),
        detect_wall=detect_time,
        reported=bool(reported),
    )
