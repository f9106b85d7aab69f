"""Agents vote: a behaviour that watches proposals and votes by a policy.

Registered with ``Agent.add_behaviour``, it keeps a WatchProposals stream
open to the consensus service (for the proposals whose electorate includes
this agent), reconnecting with jittered backoff when the service restarts
(the stream's snapshot then brings back whatever is still open), and votes on
each proposal once, by its policy, retrying a vote the service could not take
until the proposal's deadline. Agents verify nothing about themselves;
consensus verifies everything.

A policy is one of the specs ``approve`` (the default), ``reject``,
``allow:REGEX`` (approve operations the regex finds, reject the rest),
``deny:REGEX`` (the opposite), or, in a hand-written agent, a callable taking
the proposal (``consensus_pb2.Proposal``, BASIC view) and returning True
(approve), False (reject) or None (abstain); it may be async::

    from clients.agent import Agent
    from clients.agent.voting import Voting

    agent = Agent("reviewer-1", registry="127.0.0.1:50051", capabilities=["database.query"])

    def review(proposal):
        return proposal.operation.startswith("deploy_") and proposal.proposer_id == "ci"

    agent.add_behaviour(Voting("127.0.0.1:50053", review))
    agent.run()

The voting faults of ``FaultPlan`` (silent, equivocate, forge,
vote-for-others) make an agent misbehave for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from agent2028.consensus.v1 import consensus_pb2
from clients.agent.faults import FaultPlan
from clients.agent.runtime import Backoff
from clients.consensus import ConsensusClient, vote_request
from clients.errors import Cancelled, ClientError, DeadlineExceeded, Unavailable
from services.common.crypto import Identity
from services.common.timeutil import from_timestamp

if TYPE_CHECKING:
    from clients.agent.runtime import Agent

log = logging.getLogger(__name__)

Decision = bool | str | None
Policy = Callable[[consensus_pb2.Proposal], Decision | Awaitable[Decision]]
POLICY_HELP = "approve, reject, allow:REGEX, deny:REGEX or none"
# Proposals remembered as already voted on (a reconnect's snapshot repeats them).
REMEMBERED = 10_000
RETRYABLE = (Unavailable, DeadlineExceeded, Cancelled)


def parse_policy(spec: str) -> Policy:
    """A policy from its spec (see the module docstring). ``none`` is not a
    policy: the caller does not vote at all."""
    name, sep, arg = spec.strip().partition(":")
    if name == "approve" and not sep:
        return lambda proposal: True
    if name == "reject" and not sep:
        return lambda proposal: False
    if name in ("allow", "deny") and sep:
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise ValueError(f"vote policy {spec!r}: bad regex: {exc}") from None
        if name == "allow":
            return lambda proposal: pattern.search(proposal.operation) is not None
        return lambda proposal: pattern.search(proposal.operation) is None
    raise ValueError(f"unknown vote policy {spec!r}; expected {POLICY_HELP}")


def _choice(decision: Decision) -> str | None:
    if decision is None:
        return None
    if isinstance(decision, str):
        if decision not in ("approve", "reject"):
            raise ValueError(f"a vote policy returned {decision!r}; expected approve or reject")
        return decision
    return "approve" if decision else "reject"


class Voting:
    """The voting behaviour: ``agent.add_behaviour(Voting(address, policy))``."""

    __name__ = "voting"

    def __init__(
        self,
        consensus: str,
        policy: Policy | str = "approve",
        *,
        faults: FaultPlan | None = None,
        reconnect_cap_s: float = 2.0,
    ) -> None:
        self.consensus = consensus
        self.policy: Policy = parse_policy(policy) if isinstance(policy, str) else policy
        self.faults = faults
        self.reconnect_cap_s = reconnect_cap_s
        # What happened, for operators and tests.
        self.connected = asyncio.Event()
        self.watches = 0
        self.proposals_seen = 0
        self.votes_cast = 0
        self.rejected: Counter[str] = Counter()
        self.decisions: dict[str, str | None] = {}
        self._voted: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._forger: Identity | None = None

    async def __call__(self, agent: Agent) -> None:
        faults = self.faults if self.faults is not None else agent.faults
        if faults.forge_votes:
            self._forger = Identity.generate(agent.agent_id)
        client = ConsensusClient(self.consensus)
        backoff = Backoff(base_s=0.1, cap_s=self.reconnect_cap_s)
        try:
            while not agent.stopping.is_set():
                try:
                    self.watches += 1
                    async for response in client.watch_proposals(voter_id=agent.agent_id):
                        if response.snapshot:
                            self.connected.set()
                            backoff.reset()
                        for proposal in response.proposals:
                            self._consider(agent, client, faults, proposal)
                    log.info("agent %s: proposal watch ended; reconnecting", agent.agent_id)
                except ClientError as exc:
                    level = logging.DEBUG if isinstance(exc, RETRYABLE) else logging.WARNING
                    log.log(level, "agent %s: proposal watch failed (%s)", agent.agent_id, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Voting must outlive any surprise; log it and watch again.
                    log.exception("agent %s: proposal watch error", agent.agent_id)
                self.connected.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(agent.stopping.wait(), backoff.next())
        finally:
            self.connected.clear()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await client.close()

    def _consider(
        self, agent: Agent, client: ConsensusClient, faults: FaultPlan, p: consensus_pb2.Proposal
    ) -> None:
        if p.proposal_id in self._voted:
            return
        self._voted[p.proposal_id] = None
        while len(self._voted) > REMEMBERED:
            self._voted.popitem(last=False)
        self.proposals_seen += 1
        task = asyncio.create_task(self._vote(agent, client, faults, p))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _vote(
        self, agent: Agent, client: ConsensusClient, faults: FaultPlan, p: consensus_pb2.Proposal
    ) -> None:
        try:
            if faults.silent:
                log.info("agent %s: fault silent, not voting on %s", agent.agent_id, p.proposal_id)
                return
            decision = self.policy(p)
            if inspect.isawaitable(decision):
                decision = await decision
            choice = _choice(decision)
            self.decisions[p.proposal_id] = choice
            if choice is None:
                log.info("agent %s abstains on %s", agent.agent_id, p.proposal_id)
                return
            signer = self._forger or agent.identity
            requests = [vote_request(signer, p.proposal_id, choice, voter_id=agent.agent_id)]
            if faults.equivocate:
                other = "reject" if choice == "approve" else "approve"
                requests.append(vote_request(signer, p.proposal_id, other, voter_id=agent.agent_id))
            if faults.vote_for_others:
                full = await client.get_proposal(p.proposal_id, view="full", timeout_s=5.0)
                requests += [
                    vote_request(agent.identity, p.proposal_id, choice, voter_id=v.voter_id)
                    for v in full.electorate
                    if v.voter_id != agent.agent_id
                ]
            deadline = from_timestamp(p.deadline_time)
            for request in requests:
                await self._send(agent, client, request, deadline, faults.active)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s: voting on %s failed", agent.agent_id, p.proposal_id)

    async def _send(
        self,
        agent: Agent,
        client: ConsensusClient,
        request: consensus_pb2.VoteRequest,
        deadline: float,
        faulty: bool,
    ) -> None:
        backoff = Backoff(base_s=0.05, cap_s=1.0)
        while True:
            try:
                await client.send_vote(request, timeout_s=5.0)
                self.votes_cast += 1
                log.info(
                    "agent %s voted %s on %s%s",
                    agent.agent_id,
                    "approve" if request.choice == consensus_pb2.CHOICE_APPROVE else "reject",
                    request.proposal_id,
                    "" if request.voter_id == agent.agent_id else f" as {request.voter_id}",
                )
                return
            except RETRYABLE as exc:
                # The service is restarting or busy: the vote is not taken yet.
                delay = backoff.next()
                if time.time() + delay >= deadline:
                    self.rejected[exc.reason or exc.code.name] += 1
                    log.warning(
                        "agent %s: could not vote on %s before its deadline (%s)",
                        agent.agent_id,
                        request.proposal_id,
                        exc,
                    )
                    return
                await asyncio.sleep(delay)
            except ClientError as exc:
                self.rejected[exc.reason or exc.code.name] += 1
                log.log(
                    logging.INFO if faulty else logging.WARNING,
                    "agent %s: vote on %s%s refused: %s",
                    agent.agent_id,
                    request.proposal_id,
                    "" if request.voter_id == agent.agent_id else f" as {request.voter_id}",
                    exc,
                )
                return
