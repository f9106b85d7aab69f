"""ConsensusService over gRPC: validates and converts protos, calls the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent2028.consensus.v1 import consensus_pb2, consensus_pb2_grpc
from clients.registry import RegistryClient
from clients.trust import TrustClient
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.crypto import Identity
from services.common.errors import (
    DomainError,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
)
from services.common.rpc import read_request
from services.common.storage import Database
from services.common.timeutil import require_duration, require_timestamp, to_timestamp
from services.common.validation import optional_id, page_size, require_capability, require_id
from services.consensus import store
from services.consensus.config import ConsensusConfig
from services.consensus.core import (
    Choice,
    ConsensusCore,
    Event,
    EventType,
    Evidence,
    ProposalState,
    SignatureVerifier,
    Status,
    Strategy,
    Tally,
    VoteRecord,
    VoteResult,
)
from services.consensus.electorate import RegistryElectorate
from services.consensus.reporting import TrustReporter
from services.consensus.verifier import InlineVerifier, WorkerVerifier

log = logging.getLogger(__name__)

MAX_OPERATION_LEN = 256
SIGNATURE_BYTES = 64
SNAPSHOT_BATCH = 256
# Votes one StreamVotes call may have in flight before it stops reading.
STREAM_WINDOW = 128
# What a Propose keeps back from its own deadline for answering.
PROPOSE_MARGIN_S = 0.05

VOTES = Counter(
    "agent2028_consensus_votes_total",
    "Votes received, by result (RECORDED, DUPLICATE, or the rejection reason).",
    ["result"],
)
DECISIONS = Counter(
    "agent2028_consensus_decisions_total", "Proposals decided, by outcome.", ["outcome"]
)

_CODES = {name: code.value[0] for name, code in grpc.StatusCode.__members__.items()}
_VOTE_COUNTERS: dict[str, Any] = {}


def _vote_counter(result: str) -> Any:
    """The labelled counter, looked up once per label (labels() takes a lock)."""
    counter = _VOTE_COUNTERS.get(result)
    if counter is None:
        counter = _VOTE_COUNTERS[result] = VOTES.labels(result)
    return counter


# --- conversions -----------------------------------------------------------------------


def _enum(value: int, enum: Any, field: str, default: Any = None) -> Any:
    if value == 0 and default is not None:
        return default
    try:
        return enum(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} has no value {value}", field=field, reason="UNKNOWN_ENUM_VALUE"
        ) from None


def tally_to_proto(t: Tally) -> consensus_pb2.Tally:
    return consensus_pb2.Tally(
        electorate_size=t.electorate_size,
        quorum=t.quorum,
        approvals=t.approvals,
        rejections=t.rejections,
        excluded=t.excluded,
        outstanding=t.outstanding,
    )


def vote_to_proto(proposal_id: str, v: VoteRecord) -> consensus_pb2.SignedVote:
    return consensus_pb2.SignedVote(
        proposal_id=proposal_id,
        voter_id=v.voter_id,
        choice=int(v.choice),
        signature=v.signature,
        receive_time=to_timestamp(v.receive_wall),
    )


def evidence_to_proto(e: Evidence) -> consensus_pb2.EquivocationEvidence:
    return consensus_pb2.EquivocationEvidence(
        evidence_id=e.evidence_id,
        proposal_id=e.proposal_id,
        voter_id=e.voter_id,
        first_vote=vote_to_proto(e.proposal_id, e.first),
        conflicting_vote=vote_to_proto(e.proposal_id, e.second),
        detect_time=to_timestamp(e.detect_wall),
        reported_to_trust=e.reported,
    )


def certificate_to_proto(p: ProposalState) -> consensus_pb2.QuorumCertificate:
    cert = consensus_pb2.QuorumCertificate(
        proposal_id=p.proposal_id,
        outcome=int(p.status),
        strategy=int(p.strategy),
        electorate_size=p.electorate_size,
        quorum=p.quorum,
        votes=[vote_to_proto(p.proposal_id, v) for v in p.certificate_votes()],
        evidence_ids=p.certificate_evidence,
    )
    if p.decide_wall is not None:
        cert.decide_time.CopyFrom(to_timestamp(p.decide_wall))
    return cert


def proposal_to_proto(
    p: ProposalState,
    *,
    full: bool,
    status: Status | None = None,
    tally: Tally | None = None,
    with_certificate: bool | None = None,
) -> consensus_pb2.Proposal:
    status = status or p.status
    message = consensus_pb2.Proposal(
        proposal_id=p.proposal_id,
        operation=p.operation,
        proposer_id=p.proposer_id,
        strategy=int(p.strategy),
        status=int(status),
        electorate_capability=p.electorate_capability,
        create_time=to_timestamp(p.create_wall),
        deadline_time=to_timestamp(p.deadline_wall),
        tally=tally_to_proto(tally or p.tally()),
        accepting_votes=p.accepting(time.time()),
    )
    if status is not Status.OPEN and p.decide_wall is not None:
        message.decide_time.CopyFrom(to_timestamp(p.decide_wall))
    certificate = full if with_certificate is None else with_certificate
    if (
        certificate
        and status in (Status.APPROVED, Status.REJECTED)
        and p.status is status
        and p.details_loaded
    ):
        message.certificate.CopyFrom(certificate_to_proto(p))
    if full and p.details_loaded:
        message.electorate.extend(
            consensus_pb2.Voter(voter_id=v, public_key=k) for v, k in p.electorate.items()
        )
        message.votes.extend(vote_to_proto(p.proposal_id, v) for v in p.votes.values())
        message.excluded_voter_ids.extend(p.excluded)
    return message


def event_to_proto(e: Event) -> consensus_pb2.ConsensusEvent:
    message = consensus_pb2.ConsensusEvent(
        index=e.index,
        type=int(e.type),
        proposal=proposal_to_proto(
            e.proposal,
            full=False,
            status=e.status,
            tally=e.tally,
            with_certificate=e.type is EventType.DECIDED,
        ),
        event_time=to_timestamp(e.wall),
    )
    if e.vote is not None:
        message.vote.CopyFrom(vote_to_proto(e.proposal.proposal_id, e.vote))
    if e.evidence is not None:
        message.evidence.CopyFrom(evidence_to_proto(e.evidence))
    return message


def _check_view(view: int) -> None:
    if view not in (
        consensus_pb2.PROPOSAL_VIEW_UNSPECIFIED,
        consensus_pb2.PROPOSAL_VIEW_BASIC,
        consensus_pb2.PROPOSAL_VIEW_FULL,
    ):
        raise InvalidArgument(
            f"view has no value {view}", field="view", reason="UNKNOWN_ENUM_VALUE"
        )


def _vote_args(request: Any) -> tuple[str, str, Choice, bytes]:
    proposal_id = require_id(request.proposal_id, "proposal_id")
    voter_id = require_id(request.voter_id, "voter_id")
    if request.choice not in (consensus_pb2.CHOICE_APPROVE, consensus_pb2.CHOICE_REJECT):
        raise InvalidArgument(
            f"choice must be CHOICE_APPROVE or CHOICE_REJECT, not {request.choice}",
            field="choice",
            reason="MALFORMED_CHOICE",
        )
    if len(request.signature) != SIGNATURE_BYTES:
        raise InvalidArgument(
            f"signature must be {SIGNATURE_BYTES} bytes (Ed25519), not {len(request.signature)}",
            field="signature",
            reason="MALFORMED_SIGNATURE",
        )
    return proposal_id, voter_id, Choice(request.choice), request.signature


# --- the servicer ----------------------------------------------------------------------


class ConsensusServicer(consensus_pb2_grpc.ConsensusServiceServicer):
    def __init__(self, core: ConsensusCore, config: ConsensusConfig) -> None:
        self.core = core
        self.config = config

    async def Propose(
        self, request: consensus_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.ProposeResponse:
        operation = require_id(request.operation, "operation", max_len=MAX_OPERATION_LEN)
        proposer_id = require_id(request.proposer_id, "proposer_id")
        strategy = _enum(request.strategy, Strategy, "strategy", Strategy.BYZANTINE)
        voter_ids: list[str] = []
        seen: set[str] = set()
        for i, voter_id in enumerate(request.voter_ids):
            require_id(voter_id, f"voter_ids[{i}]")
            if voter_id in seen:
                raise InvalidArgument(
                    f"voter_ids[{i}] repeats {voter_id}",
                    field=f"voter_ids[{i}]",
                    reason="DUPLICATE_VOTER",
                )
            seen.add(voter_id)
            voter_ids.append(voter_id)
        capability = request.electorate_capability
        if capability:
            require_capability(capability, "electorate_capability")
            if voter_ids:
                raise InvalidArgument(
                    "give the electorate as voter_ids or as electorate_capability, not both",
                    field="electorate_capability",
                    reason="ELECTORATE_AMBIGUOUS",
                )
        elif not voter_ids:
            raise InvalidArgument(
                "the electorate is empty: give voter_ids or electorate_capability",
                field="voter_ids",
                reason="EMPTY_ELECTORATE",
            )
        has_time, has_period = request.HasField("deadline_time"), request.HasField("voting_period")
        if has_time and has_period:
            raise InvalidArgument(
                "give deadline_time or voting_period, not both",
                field="voting_period",
                reason="DEADLINE_AMBIGUOUS",
            )
        deadline: float | None = None
        if has_time:
            deadline = require_timestamp(request.deadline_time, "deadline_time", present=True)
        elif has_period:
            period = require_duration(
                request.voting_period,
                "voting_period",
                lo=0.0,
                hi=self.config.settings.max_voting_period_s,
            )
            if period <= 0:
                raise InvalidArgument(
                    "voting_period must be positive", field="voting_period", reason="OUT_OF_RANGE"
                )
            deadline = time.time() + period
        proposal_id = optional_id(request.proposal_id, "proposal_id")
        request_id = optional_id(request.request_id, "request_id")
        timeout = self.config.registry_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(min(timeout, remaining - PROPOSE_MARGIN_S), 0.01)
        p, duplicate = await self.core.propose(
            operation=operation,
            proposer_id=proposer_id,
            strategy=strategy,
            voter_ids=voter_ids,
            capability=capability,
            deadline_wall=deadline,
            proposal_id=proposal_id,
            request_id=request_id,
            timeout_s=timeout,
        )
        return consensus_pb2.ProposeResponse(
            proposal=proposal_to_proto(p, full=True), duplicate=duplicate
        )

    async def _vote(self, request: Any) -> VoteResult:
        try:
            result = await self.core.vote(*_vote_args(request))
        except DomainError as exc:
            _vote_counter(exc.reason).inc()
            raise
        _vote_counter("DUPLICATE" if result.duplicate else "RECORDED").inc()
        return result

    async def Vote(
        self, request: consensus_pb2.VoteRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.VoteResponse:
        result = await self._vote(request)
        return consensus_pb2.VoteResponse(
            duplicate=result.duplicate,
            counted=result.counted,
            status=int(result.status),
            tally=tally_to_proto(result.tally),
        )

    async def StreamVotes(
        self,
        requests: AsyncIterator[consensus_pb2.StreamVotesRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # Reads ahead (up to STREAM_WINDOW votes) so one client's votes are
        # verified and committed in batches, and answers in order.
        window: asyncio.Queue[Any] = asyncio.Queue(STREAM_WINDOW)

        async def read_all() -> None:
            try:
                while (request := await read_request(context)) is not None:
                    await window.put((request.sequence, asyncio.ensure_future(self._vote(request))))
                await window.put(None)
            except Exception as exc:  # an undecodable request ends the stream
                await window.put(exc)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await window.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                sequence, task = item
                try:
                    result = await task
                except DomainError as exc:
                    await context.write(
                        consensus_pb2.StreamVotesResponse(
                            sequence=sequence,
                            code=_CODES.get(exc.code, 2),
                            reason=exc.reason,
                            field=exc.field or "",
                            message=exc.message,
                        )
                    )
                    continue
                await context.write(
                    consensus_pb2.StreamVotesResponse(
                        sequence=sequence,
                        duplicate=result.duplicate,
                        counted=result.counted,
                        status=int(result.status),
                    )
                )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            while not window.empty():
                item = window.get_nowait()
                if isinstance(item, tuple):
                    item[1].cancel()

    async def GetProposal(
        self, request: consensus_pb2.GetProposalRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.GetProposalResponse:
        proposal_id = require_id(request.proposal_id, "proposal_id")
        _check_view(request.view)
        full = request.view != consensus_pb2.PROPOSAL_VIEW_BASIC
        p = await self.core.get(proposal_id, full=full)
        return consensus_pb2.GetProposalResponse(proposal=proposal_to_proto(p, full=full))

    async def ListProposals(
        self, request: consensus_pb2.ListProposalsRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.ListProposalsResponse:
        size = page_size(request.page_size)
        statuses = [_enum(s, Status, f"statuses[{i}]") for i, s in enumerate(request.statuses)]
        _check_view(request.view)
        full = request.view == consensus_pb2.PROPOSAL_VIEW_FULL
        if full:
            # FULL proposals can be large (keys and votes of the whole electorate).
            size = min(size, 20)
        proposals, token = await self.core.list_proposals(
            page_size=size, page_token=request.page_token, statuses=statuses, full=full
        )
        return consensus_pb2.ListProposalsResponse(
            proposals=[proposal_to_proto(p, full=full) for p in proposals],
            next_page_token=token,
        )

    async def HasConsensus(
        self, request: consensus_pb2.HasConsensusRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.HasConsensusResponse:
        proposal_id = require_id(request.proposal_id, "proposal_id")
        if request.total_agents < 0:
            raise InvalidArgument(
                f"total_agents must not be negative, got {request.total_agents}",
                field="total_agents",
                reason="OUT_OF_RANGE",
            )
        strategy = _enum(request.strategy, Strategy, "strategy", Strategy.BYZANTINE)
        reached, approvals, needed, n = await self.core.has_consensus(
            proposal_id, request.total_agents, strategy
        )
        return consensus_pb2.HasConsensusResponse(
            reached=reached,
            approvals=approvals,
            quorum=needed,
            total_agents=n,
            strategy=int(strategy),
        )

    async def ListEvidence(
        self, request: consensus_pb2.ListEvidenceRequest, context: grpc.aio.ServicerContext
    ) -> consensus_pb2.ListEvidenceResponse:
        size = page_size(request.page_size)
        evidence, token = await self.core.list_evidence(
            page_size=size,
            page_token=request.page_token,
            proposal_id=optional_id(request.proposal_id, "proposal_id"),
            voter_id=optional_id(request.voter_id, "voter_id"),
        )
        return consensus_pb2.ListEvidenceResponse(
            evidence=[evidence_to_proto(e) for e in evidence], next_page_token=token
        )

    async def WatchProposals(
        self, request: consensus_pb2.WatchProposalsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[consensus_pb2.WatchProposalsResponse]:
        voter_id = optional_id(request.voter_id, "voter_id")
        queue: asyncio.Queue[ProposalState] = asyncio.Queue(self.config.watch_queue)
        lagged: list[bool] = []

        def on_event(event: Event) -> None:
            if event.type is not EventType.PROPOSED or lagged:
                return
            if voter_id and voter_id not in event.proposal.electorate:
                return
            try:
                queue.put_nowait(event.proposal)
            except asyncio.QueueFull:
                lagged.append(True)

        # No await between subscribing and taking the snapshot: nothing falls
        # between them, and nothing is sent twice.
        self.core.add_listener(on_event)
        try:
            snapshot = self.core.accepting_proposals(voter_id)
            for start in range(0, max(len(snapshot), 1), SNAPSHOT_BATCH):
                yield consensus_pb2.WatchProposalsResponse(
                    proposals=[
                        proposal_to_proto(p, full=False)
                        for p in snapshot[start : start + SNAPSHOT_BATCH]
                    ],
                    snapshot=True,
                )
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield consensus_pb2.WatchProposalsResponse(
                    proposals=[proposal_to_proto(p, full=False) for p in batch]
                )
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        "proposal watcher fell behind; watch again for a fresh snapshot",
                        reason="WATCHER_LAGGED",
                    )
        finally:
            self.core.remove_listener(on_event)

    async def Watch(
        self, request: consensus_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[consensus_pb2.WatchResponse]:
        if request.from_index < 0:
            raise InvalidArgument(
                "from_index must not be negative", field="from_index", reason="OUT_OF_RANGE"
            )
        proposal_id = optional_id(request.proposal_id, "proposal_id")
        types = {_enum(t, EventType, f"types[{i}]") for i, t in enumerate(request.types)}
        queue: asyncio.Queue[Event] = asyncio.Queue(self.config.watch_queue)
        lagged: list[int] = []

        def wanted(event: Event) -> bool:
            return (not proposal_id or event.proposal.proposal_id == proposal_id) and (
                not types or event.type in types
            )

        def on_event(event: Event) -> None:
            if lagged or not wanted(event):
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                lagged.append(event.index)

        self.core.add_listener(on_event)
        try:
            current = self.core.committed_index
            if request.from_index > current:
                raise OutOfRange(
                    f"from_index {request.from_index} is beyond the current index {current}; "
                    "watch again from 0",
                    field="from_index",
                    reason="INDEX_AHEAD",
                    metadata={"current_index": str(current)},
                )
            # The watcher is at from_index until the replay has caught it up.
            yield consensus_pb2.WatchResponse(index=request.from_index or current)
            last = current
            if request.from_index:
                seq = None
                if proposal_id:
                    with contextlib.suppress(DomainError):
                        seq = await self.core.proposal_seq(proposal_id)
                after = request.from_index
                while after < current and (seq is not None or not proposal_id):
                    batch = await self.core.replay(
                        after, current, proposal_seq=seq, types=sorted(types), limit=SNAPSHOT_BATCH
                    )
                    if batch:
                        yield consensus_pb2.WatchResponse(
                            events=[event_to_proto(e) for e in batch], index=batch[-1].index
                        )
                    if len(batch) < SNAPSHOT_BATCH:
                        break
                    after = batch[-1].index
                if request.from_index < current:
                    yield consensus_pb2.WatchResponse(index=current)
            while True:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                last = events[-1].index
                yield consensus_pb2.WatchResponse(
                    events=[event_to_proto(e) for e in events], index=last
                )
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        f"watcher fell behind at index {last}; watch again from {last}",
                        reason="WATCHER_LAGGED",
                        metadata={"resume_index": str(last)},
                    )
        finally:
            self.core.remove_listener(on_event)


# --- the app ---------------------------------------------------------------------------


class _ConsensusCollector:
    """Prometheus gauges read from the most recently started ConsensusApp."""

    app: ConsensusApp | None = None

    def collect(self) -> Any:
        app = self.app
        if app is None:
            return
        core = app.core
        live = GaugeMetricFamily(
            "agent2028_consensus_live_proposals", "Proposals still accepting votes."
        )
        live.add_metric([], len(core.accepting_proposals()))
        yield live
        owed = GaugeMetricFamily(
            "agent2028_consensus_trust_reports_owed", "Evidence reports waiting for trust."
        )
        owed.add_metric([], len(core.outbox))
        yield owed
        yield CounterMetricFamily(
            "agent2028_consensus_signatures_verified",
            "Vote signatures verified.",
            value=getattr(app.verifier, "checked", 0),
        )
        yield CounterMetricFamily(
            "agent2028_consensus_journal_commits",
            "Commits of the consensus journal (each holds many changes).",
            value=core.journal.rounds,
        )


COLLECTOR = _ConsensusCollector()
REGISTRY.register(COLLECTOR)


class ConsensusApp(ServiceApp):
    label = "consensus"

    def __init__(
        self,
        config: ConsensusConfig,
        data_dir: str,
        *,
        verifier: SignatureVerifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.config = config
        self.data_dir = data_dir
        self.db = Database(
            os.path.join(data_dir, "consensus.db"),
            schema=store.SCHEMA,
            synchronous=config.db_synchronous,
        )
        self.registry = RegistryClient(config.registry_addr, timeout_s=config.registry_timeout_s)
        self.trust = TrustClient(config.trust_addr) if config.trust_addr else None
        self.verifier: Any = verifier or (
            WorkerVerifier(config.verify_workers) if config.verify_workers else InlineVerifier()
        )
        self.core = ConsensusCore(
            self.db,
            config.settings,
            resolver=RegistryElectorate(self.registry),
            verifier=self.verifier,
            clock=clock,
        )
        self.servicer = ConsensusServicer(self.core, config)
        self.identity = Identity.load_or_create(
            config.observer_id, config.key_file or os.path.join(data_dir, "consensus.key")
        )
        self.reporter = TrustReporter(self.core, self.trust, self.identity) if self.trust else None
        self._tasks: list[asyncio.Task[None]] = []
        self.core.add_listener(self._count)
        COLLECTOR.app = self

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, consensus_pb2.DESCRIPTOR.services_by_name["ConsensusService"])]

    def _count(self, event: Event) -> None:
        if event.type is EventType.DECIDED:
            DECISIONS.labels(event.status.name).inc()

    async def start(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        await self.db.open()
        if hasattr(self.verifier, "start"):
            await self.verifier.start()
        await self.core.open()
        if self.reporter is not None:
            self._tasks.append(asyncio.create_task(self.reporter.run(), name="trust-reporter"))
        elif self.core.outbox:
            log.warning(
                "TRUST_ADDR is not set: %d equivocation reports wait in the outbox",
                len(self.core.outbox),
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.core.close()
        if hasattr(self.verifier, "stop"):
            await self.verifier.stop()
        await self.db.close()
        await self.registry.close()
        if self.trust is not None:
            await self.trust.close()


async def build(server_config: ServerConfig) -> ConsensusApp:
    return ConsensusApp(ConsensusConfig.from_env(), server_config.data_dir)
