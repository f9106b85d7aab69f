"""Typed async client of the consensus service, vote signing, and quorum
certificate verification."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

from agent2028.consensus.v1 import consensus_pb2, consensus_pb2_grpc
from clients.base import ServiceClient
from clients.errors import OutOfRange, ResourceExhausted, Unavailable
from services.common import crypto, signing
from services.common.crypto import Identity
from services.common.timeutil import to_duration, to_timestamp

log = logging.getLogger(__name__)

STRATEGIES = {
    "simple-majority": consensus_pb2.STRATEGY_SIMPLE_MAJORITY,
    "byzantine": consensus_pb2.STRATEGY_BYZANTINE,
    "unanimous": consensus_pb2.STRATEGY_UNANIMOUS,
}
CHOICES = {"approve": consensus_pb2.CHOICE_APPROVE, "reject": consensus_pb2.CHOICE_REJECT}
CHOICE_NAMES = {v: k for k, v in CHOICES.items()}
STATUS_NAMES = {
    consensus_pb2.PROPOSAL_STATUS_OPEN: "open",
    consensus_pb2.PROPOSAL_STATUS_APPROVED: "approved",
    consensus_pb2.PROPOSAL_STATUS_REJECTED: "rejected",
    consensus_pb2.PROPOSAL_STATUS_EXPIRED: "expired",
}
STATUSES = {v: k for k, v in STATUS_NAMES.items()}
STRATEGY_NAMES = {v: k for k, v in STRATEGIES.items()}
VIEWS = {"basic": consensus_pb2.PROPOSAL_VIEW_BASIC, "full": consensus_pb2.PROPOSAL_VIEW_FULL}
DECIDED = (
    consensus_pb2.PROPOSAL_STATUS_APPROVED,
    consensus_pb2.PROPOSAL_STATUS_REJECTED,
    consensus_pb2.PROPOSAL_STATUS_EXPIRED,
)


def strategy_value(name: str) -> int:
    """A strategy by name: simple-majority, byzantine or unanimous (``_`` works too)."""
    key = name.strip().lower().replace("_", "-")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[key]


def vote_request(
    identity: Identity, proposal_id: str, choice: str, *, voter_id: str | None = None
) -> consensus_pb2.VoteRequest:
    """A vote signed by ``identity``. ``voter_id`` defaults to the identity's
    id; another id makes a vote consensus will refuse (a test fault)."""
    voter = voter_id or identity.signer_id
    return consensus_pb2.VoteRequest(
        proposal_id=proposal_id,
        voter_id=voter,
        choice=CHOICES[choice],
        signature=identity.sign(*signing.vote(proposal_id, voter, choice)),
    )


def vote_verifies(vote: consensus_pb2.SignedVote, public_key: bytes) -> bool:
    """True when ``vote`` carries ``public_key``'s signature over its statement."""
    choice = CHOICE_NAMES.get(vote.choice)
    if choice is None:
        return False
    return crypto.verify(
        public_key, vote.signature, *signing.vote(vote.proposal_id, vote.voter_id, choice)
    )


def certificate_problems(proposal: consensus_pb2.Proposal) -> list[str]:
    """What is wrong with a decided proposal's quorum certificate, checked
    independently of the service: every vote must verify under the key the
    electorate snapshotted, be by a distinct member, be for this proposal, and
    (for APPROVED) the approvals must meet the strategy's quorum. Needs the
    FULL view (the electorate's keys). Empty means it checks out."""
    cert = proposal.certificate
    problems = []
    if proposal.status not in (
        consensus_pb2.PROPOSAL_STATUS_APPROVED,
        consensus_pb2.PROPOSAL_STATUS_REJECTED,
    ):
        return [f"proposal is {STATUS_NAMES.get(proposal.status, proposal.status)}, not decided"]
    keys = {v.voter_id: v.public_key for v in proposal.electorate}
    if not keys:
        return ["the electorate is missing (ask for the FULL view)"]
    n = len(keys)
    f = (n - 1) // 3
    needed = {
        consensus_pb2.STRATEGY_SIMPLE_MAJORITY: n // 2 + 1,
        consensus_pb2.STRATEGY_BYZANTINE: (n + f) // 2 + 1,
        consensus_pb2.STRATEGY_UNANIMOUS: n,
    }[proposal.strategy]
    if cert.quorum != needed:
        problems.append(f"certificate quorum {cert.quorum}, expected {needed} for n={n}")
    seen: set[str] = set()
    want = (
        consensus_pb2.CHOICE_APPROVE
        if proposal.status == consensus_pb2.PROPOSAL_STATUS_APPROVED
        else consensus_pb2.CHOICE_REJECT
    )
    for vote in cert.votes:
        if vote.proposal_id != proposal.proposal_id:
            problems.append(f"{vote.voter_id}'s vote is for {vote.proposal_id}")
        if vote.voter_id in seen:
            problems.append(f"{vote.voter_id} appears twice")
        seen.add(vote.voter_id)
        if vote.voter_id not in keys:
            problems.append(f"{vote.voter_id} is not in the electorate")
        elif not vote_verifies(vote, keys[vote.voter_id]):
            problems.append(f"{vote.voter_id}'s signature does not verify")
        if vote.choice != want:
            problems.append(f"{vote.voter_id}'s vote is not {CHOICE_NAMES[want]}")
    if proposal.status == consensus_pb2.PROPOSAL_STATUS_APPROVED and len(seen) < needed:
        problems.append(f"{len(seen)} approvals, fewer than the quorum {needed}")
    if proposal.status == consensus_pb2.PROPOSAL_STATUS_REJECTED:
        # Rejections plus excluded equivocators must leave the quorum out of reach.
        if n - len(seen) - len(cert.evidence_ids) >= needed:
            problems.append("the rejections shown do not put the quorum out of reach")
    return problems


class ConsensusClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = consensus_pb2_grpc.ConsensusServiceStub(self.channel)

    async def propose(
        self,
        operation: str,
        *,
        proposer_id: str,
        strategy: str = "byzantine",
        voter_ids: Iterable[str] = (),
        capability: str = "",
        voting_period_s: float | None = None,
        deadline: float | None = None,
        proposal_id: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> consensus_pb2.ProposeResponse:
        """Proposes ``operation`` to explicit ``voter_ids`` or to every passing
        agent holding ``capability``; voting closes after ``voting_period_s``
        or at the unix time ``deadline`` (the service's default otherwise)."""
        request = consensus_pb2.ProposeRequest(
            operation=operation,
            proposer_id=proposer_id,
            strategy=strategy_value(strategy),
            voter_ids=list(voter_ids),
            electorate_capability=capability,
            proposal_id=proposal_id,
            request_id=request_id,
        )
        if voting_period_s is not None:
            request.voting_period.CopyFrom(to_duration(voting_period_s))
        if deadline is not None:
            request.deadline_time.CopyFrom(to_timestamp(deadline))
        return await self._unary(self.stub.Propose, request, timeout_s=timeout_s)

    async def vote(
        self,
        identity: Identity,
        proposal_id: str,
        choice: str = "approve",
        *,
        voter_id: str | None = None,
        timeout_s: float | None = None,
    ) -> consensus_pb2.VoteResponse:
        """Signs and casts a vote ("approve" or "reject")."""
        return await self.send_vote(
            vote_request(identity, proposal_id, choice, voter_id=voter_id), timeout_s=timeout_s
        )

    async def send_vote(
        self, request: consensus_pb2.VoteRequest, *, timeout_s: float | None = None
    ) -> consensus_pb2.VoteResponse:
        """Casts an already signed vote."""
        return await self._unary(self.stub.Vote, request, timeout_s=timeout_s)

    async def get_proposal(
        self, proposal_id: str, *, view: str = "full", timeout_s: float | None = None
    ) -> consensus_pb2.Proposal:
        response = await self._unary(
            self.stub.GetProposal,
            consensus_pb2.GetProposalRequest(proposal_id=proposal_id, view=VIEWS[view]),
            timeout_s=timeout_s,
        )
        return response.proposal

    async def list_proposals(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        statuses: Iterable[str] = (),
        view: str = "basic",
    ) -> consensus_pb2.ListProposalsResponse:
        return await self._unary(
            self.stub.ListProposals,
            consensus_pb2.ListProposalsRequest(
                page_size=page_size,
                page_token=page_token,
                statuses=[STATUSES[s] for s in statuses],
                view=VIEWS[view],
            ),
        )

    async def iter_proposals(
        self, *, statuses: Iterable[str] = (), page_size: int = 500
    ) -> AsyncIterator[consensus_pb2.Proposal]:
        """Every proposal, newest first, page by page."""
        token = ""
        statuses = list(statuses)
        while True:
            page = await self.list_proposals(
                page_size=page_size, page_token=token, statuses=statuses
            )
            for proposal in page.proposals:
                yield proposal
            token = page.next_page_token
            if not token:
                return

    async def has_consensus(
        self, proposal_id: str, total_agents: int = 0, strategy: str = "byzantine"
    ) -> consensus_pb2.HasConsensusResponse:
        """The guide's has_consensus: do the valid approvals recorded meet the
        strategy's quorum for ``total_agents`` voters (0: the electorate size)?"""
        return await self._unary(
            self.stub.HasConsensus,
            consensus_pb2.HasConsensusRequest(
                proposal_id=proposal_id,
                total_agents=total_agents,
                strategy=strategy_value(strategy),
            ),
        )

    async def list_evidence(
        self, *, proposal_id: str = "", voter_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> consensus_pb2.ListEvidenceResponse:
        return await self._unary(
            self.stub.ListEvidence,
            consensus_pb2.ListEvidenceRequest(
                proposal_id=proposal_id,
                voter_id=voter_id,
                page_size=page_size,
                page_token=page_token,
            ),
        )

    async def watch_proposals(
        self, *, voter_id: str = ""
    ) -> AsyncIterator[consensus_pb2.WatchProposalsResponse]:
        """Proposals accepting votes (snapshot first), then new ones; ends with
        the stream (the caller reconnects: see clients.agent.voting)."""
        async for response in self._stream(
            self.stub.WatchProposals, consensus_pb2.WatchProposalsRequest(voter_id=voter_id)
        ):
            yield response

    async def watch(
        self,
        *,
        from_index: int = 0,
        proposal_id: str = "",
        types: Iterable[int] = (),
        resume: bool = True,
        retry_delay_s: float = 0.5,
    ) -> AsyncIterator[consensus_pb2.WatchResponse]:
        """Durable changes. With ``resume``, an interrupted or lagging watch
        continues from the last index seen (every event is durable, so none is
        missed), and one ahead of a service that lost its data starts over."""
        index = from_index
        types = list(types)
        while True:
            try:
                async for response in self._stream(
                    self.stub.Watch,
                    consensus_pb2.WatchRequest(
                        from_index=index, proposal_id=proposal_id, types=types
                    ),
                ):
                    index = response.index
                    yield response
                if not resume:
                    return
            except (ResourceExhausted, Unavailable) as exc:
                if not resume:
                    raise
                log.info("consensus watch interrupted (%s); resuming from %d", exc.code.name, index)
                await asyncio.sleep(retry_delay_s)
            except OutOfRange:
                if not resume:
                    raise
                index = 0

    async def wait_decided(
        self, proposal_id: str, *, timeout_s: float, view: str = "full"
    ) -> consensus_pb2.Proposal:
        """Waits until the proposal is decided (or expired) and returns it.
        Subscribes first and reads the state second, so a decision between
        the two is never missed. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        watch = self.watch(
            proposal_id=proposal_id, types=[consensus_pb2.EVENT_TYPE_DECIDED], resume=True
        )
        try:
            async with asyncio.timeout(timeout_s):
                await anext(watch)  # the header: subscribed
                proposal = await self.get_proposal(proposal_id, view=view)
                if proposal.status in DECIDED:
                    return proposal
                async for response in watch:
                    if response.events:
                        break
            remaining = max(deadline - time.monotonic(), 1.0)
            return await self.get_proposal(proposal_id, view=view, timeout_s=remaining)
        finally:
            with contextlib.suppress(Exception):
                await watch.aclose()
