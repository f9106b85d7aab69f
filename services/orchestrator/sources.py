"""The services' watch streams, aggregated onto the event bus.

One task per source follows its service's stream and publishes what it says
as bus events, together with the stream position it reached (one commit), so
a restarted orchestrator resumes each stream exactly where it stopped: no
event twice, none skipped while the service still retains it. Each task
reconnects with a pause when its service goes away and resumes from its
position; when the service no longer has that position (it restarted
empty, or compacted its history) it starts again from the service's present.

- registry Watch: agent joined, updated, degraded, failed, recovered, left,
  expired (a snapshot only fills the agent counts of the topology);
- trust Watch: trust changed;
- consensus Watch: proposed, vote, equivocation, reached, rejected, expired;
- market Watch: listed, bid, won, completed, failed, expired, relisted (and
  the bridge runs won DISPATCH_BROKER tasks);
- swarm WatchPools announces pools as they open; their closing is polled
  (ListPools of the open ones), then decided or no consensus (and the bridge
  adopts decided ones);
- swarm WatchHive: beliefs set, intentions added, decisions adopted;
- stigmergy: the field's layers polled (GetField) into active, updated
  (the total moved by a set fraction) and faded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent2028.consensus.v1 import consensus_pb2
from agent2028.market.v1 import market_pb2
from agent2028.registry.v1 import registry_pb2
from agent2028.swarm.v1 import swarm_pb2
from clients import errors
from clients.consensus import CHOICE_NAMES, ConsensusClient
from clients.consensus import STATUS_NAMES as PROPOSAL_STATUS
from clients.market import MarketClient
from clients.registry import RegistryClient
from clients.stigmergy import StigmergyClient
from clients.swarm import SwarmClient
from clients.trust import TrustClient
from services.orchestrator.bridge import Bridge
from services.orchestrator.bus import EventBus
from services.orchestrator.events import Draft

log = logging.getLogger(__name__)

HEALTH = {1: "passing", 2: "warning", 3: "critical"}
OUTCOMES = {1: "success", 2: "timeout", 3: "partial_failure", 4: "complete_failure"}
_RETRYABLE = (
    errors.Unavailable,
    errors.ResourceExhausted,
    errors.DeadlineExceeded,
    errors.Cancelled,
    errors.Unknown,
    errors.Internal,
)


# --- one event each ----------------------------------------------------------------------


def registry_draft(e: registry_pb2.WatchEvent) -> Draft | None:
    card = e.agent.card
    agent_id = card.agent_id
    attrs = {"status": HEALTH.get(e.agent.status, "unknown")}
    kind = e.type
    if kind == registry_pb2.EVENT_TYPE_REGISTERED:
        attrs.update(capabilities=",".join(card.capabilities), address=card.address)
        return Draft(
            "agent.joined",
            "registry",
            agent_id,
            attrs,
            f"{agent_id} joined at {card.address} with {', '.join(card.capabilities)}",
        )
    if kind == registry_pb2.EVENT_TYPE_UPDATED:
        attrs.update(capabilities=",".join(card.capabilities), address=card.address)
        return Draft("agent.updated", "registry", agent_id, attrs, f"{agent_id} updated its card")
    if kind == registry_pb2.EVENT_TYPE_HEALTH_CHANGED:
        before = HEALTH.get(e.previous_status, "unknown")
        after = HEALTH.get(e.agent.status, "unknown")
        attrs["previous_status"] = before
        event_type = {
            "passing": "agent.recovered",
            "warning": "agent.degraded",
            "critical": "agent.failed",
        }.get(after)
        if event_type is None:
            return None
        return Draft(event_type, "registry", agent_id, attrs, f"{agent_id} {before} → {after}")
    if kind == registry_pb2.EVENT_TYPE_DEREGISTERED:
        return Draft("agent.left", "registry", agent_id, attrs, f"{agent_id} left (deregistered)")
    if kind == registry_pb2.EVENT_TYPE_EXPIRED:
        return Draft(
            "agent.expired",
            "registry",
            agent_id,
            attrs,
            f"{agent_id} removed: critical for longer than the grace period",
        )
    return None


def trust_draft(e: Any) -> Draft:
    s = e.score
    outcome = OUTCOMES.get(e.outcome.kind, "decay" if e.decayed else "unknown")
    attrs = {
        "observer_id": s.observer_id,
        "subject_id": s.subject_id,
        "score": f"{s.score:.4f}",
        "confidence": f"{s.confidence:.4f}",
        "outcome": outcome,
        "observations": str(s.observations),
    }
    if e.capability:
        attrs["capability"] = e.capability
    return Draft(
        "trust.changed",
        "trust",
        s.subject_id,
        attrs,
        f"{s.observer_id} → {s.subject_id}: {outcome}, trust {s.score:.3f}",
    )


def _tally(t: consensus_pb2.Tally) -> str:
    return f"{t.approvals} approve, {t.rejections} reject of {t.electorate_size}, quorum {t.quorum}"


def consensus_draft(e: consensus_pb2.ConsensusEvent) -> Draft | None:
    p = e.proposal
    attrs = {
        "operation": p.operation,
        "proposer_id": p.proposer_id,
        "approvals": str(p.tally.approvals),
        "rejections": str(p.tally.rejections),
        "electorate_size": str(p.tally.electorate_size),
        "quorum": str(p.tally.quorum),
    }
    if e.type == consensus_pb2.EVENT_TYPE_PROPOSED:
        return Draft(
            "consensus.proposed",
            "consensus",
            p.proposal_id,
            attrs,
            f"{p.proposer_id} proposed {p.operation} to {p.tally.electorate_size} voters "
            f"(quorum {p.tally.quorum})",
        )
    if e.type == consensus_pb2.EVENT_TYPE_VOTE_RECORDED:
        choice = CHOICE_NAMES.get(e.vote.choice, "?")
        attrs.update(voter_id=e.vote.voter_id, choice=choice)
        return Draft(
            "consensus.vote",
            "consensus",
            p.proposal_id,
            attrs,
            f"{e.vote.voter_id} votes {choice} on {p.operation} ({_tally(p.tally)})",
        )
    if e.type == consensus_pb2.EVENT_TYPE_EQUIVOCATION:
        attrs.update(voter_id=e.evidence.voter_id, evidence_id=e.evidence.evidence_id)
        return Draft(
            "consensus.equivocation",
            "consensus",
            p.proposal_id,
            attrs,
            f"{e.evidence.voter_id} signed both choices on {p.operation}: its votes no longer count",
        )
    if e.type == consensus_pb2.EVENT_TYPE_DECIDED:
        status = PROPOSAL_STATUS.get(p.status, "?")
        event_type = {
            "approved": "consensus.reached",
            "rejected": "consensus.rejected",
            "expired": "consensus.expired",
        }.get(status)
        if event_type is None:
            return None
        attrs.update(status=status, certificate_votes=str(len(p.certificate.votes)))
        return Draft(
            event_type,
            "consensus",
            p.proposal_id,
            attrs,
            f"{p.operation} {status} ({_tally(p.tally)})",
        )
    return None


MARKET_TYPES = {
    market_pb2.EVENT_TYPE_TASK_LISTED: "market.task_listed",
    market_pb2.EVENT_TYPE_BID_PLACED: "market.bid_placed",
    market_pb2.EVENT_TYPE_AUCTION_WON: "market.auction_won",
    market_pb2.EVENT_TYPE_TASK_COMPLETED: "market.task_completed",
    market_pb2.EVENT_TYPE_TASK_FAILED: "market.task_failed",
    market_pb2.EVENT_TYPE_TASK_EXPIRED: "market.task_expired",
    market_pb2.EVENT_TYPE_TASK_RELISTED: "market.task_relisted",
}


def market_draft(e: market_pb2.MarketEvent) -> Draft | None:
    event_type = MARKET_TYPES.get(e.type)
    if event_type is None:
        return None
    t = e.task
    attrs = {
        "attempt": str(t.attempt),
        "requirements": ",".join(t.requirements),
        "dispatch": "broker" if t.dispatch == market_pb2.DISPATCH_BROKER else "winner",
    }
    if e.agent_id:
        attrs["agent_id"] = e.agent_id
    if e.type == market_pb2.EVENT_TYPE_TASK_LISTED:
        summary = f"{t.task_id} listed (requires {', '.join(t.requirements)})"
    elif e.type == market_pb2.EVENT_TYPE_BID_PLACED:
        attrs.update(price=f"{e.bid.price:g}", confidence=f"{e.bid.confidence:.2f}")
        summary = (
            f"{e.agent_id} bids {e.bid.price:g} on {t.task_id} "
            f"({e.bid.estimated_completion_seconds:g}s, confidence {e.bid.confidence:.2f})"
        )
    elif e.type == market_pb2.EVENT_TYPE_AUCTION_WON:
        attrs.update(score=f"{e.bid.score:.4f}", load=str(e.bid.load))
        summary = f"{t.task_id} won by {e.agent_id} (score {e.bid.score:.4f}, load {e.bid.load})"
    elif e.type == market_pb2.EVENT_TYPE_TASK_COMPLETED:
        summary = f"{t.task_id} completed by {e.agent_id}"
    elif e.type == market_pb2.EVENT_TYPE_TASK_FAILED:
        attrs["error"] = t.error[:200]
        summary = f"{t.task_id} failed by {e.agent_id}: {t.error[:80]}"
    elif e.type == market_pb2.EVENT_TYPE_TASK_EXPIRED:
        summary = f"{t.task_id} expired"
    else:
        attrs["excluded"] = ",".join(t.excluded_agent_ids)
        summary = f"{t.task_id} relisted (attempt {t.attempt})"
    return Draft(event_type, "market", t.task_id, attrs, summary)


def hive_draft(e: swarm_pb2.HiveEvent) -> Draft | None:
    attrs = {"generation": str(e.generation)}
    if e.kind == swarm_pb2.HIVE_EVENT_KIND_BELIEF_SET:
        b = e.belief
        attrs.update(name=b.name, confidence=f"{b.confidence:.3f}", source=b.source)
        return Draft(
            "hive.belief_set",
            "swarm",
            b.name,
            attrs,
            f"belief {b.name} = {b.confidence:.3f} (from {b.source}, generation {e.generation})",
        )
    if e.kind == swarm_pb2.HIVE_EVENT_KIND_INTENTION_ADDED:
        i = e.intention
        attrs.update(intention=i.text, source=i.source)
        return Draft(
            "hive.intention_added",
            "swarm",
            i.text[:256],
            attrs,
            f"intention {i.text!r} (from {i.source}, generation {e.generation})",
        )
    if e.kind == swarm_pb2.HIVE_EVENT_KIND_DECISION_ADOPTED:
        d = e.decision
        attrs.update(
            topic=d.topic,
            decision=d.decision,
            confidence=f"{d.confidence:.3f}",
            pool_id=d.pool_id,
            final=str(d.final).lower(),
        )
        return Draft(
            "hive.decision_adopted",
            "swarm",
            d.topic,
            attrs,
            f"the hive adopted {d.topic}:{d.decision} = {d.confidence:.3f} "
            f"(generation {e.generation})",
        )
    return None


POOL_STATUS = {1: "pending", 2: "decided", 3: "no_consensus"}


def pool_attrs(pool: swarm_pb2.Pool) -> dict[str, str]:
    return {
        "topic": pool.topic,
        "status": POOL_STATUS.get(pool.status, "unknown"),
        "decision": pool.decision,
        "confidence": f"{pool.confidence:.3f}",
        "votes": str(pool.vote_count),
    }


# --- the sources -----------------------------------------------------------------------


class Sources:
    """Runs every configured source until stopped."""

    def __init__(
        self,
        bus: EventBus,
        bridge: Bridge,
        *,
        registry: RegistryClient,
        trust: TrustClient,
        consensus: ConsensusClient,
        market: MarketClient,
        swarm: SwarmClient,
        stigmergy: StigmergyClient,
        names: tuple[str, ...],
        retry_s: float = 0.5,
        pool_poll_s: float = 0.5,
        field_poll_s: float = 2.0,
        field_change: float = 0.25,
    ) -> None:
        self.bus = bus
        self.bridge = bridge
        self.registry = registry
        self.trust = trust
        self.consensus = consensus
        self.market = market
        self.swarm = swarm
        self.stigmergy = stigmergy
        self.names = names
        self.retry_s = retry_s
        self.pool_poll_s = pool_poll_s
        self.field_poll_s = field_poll_s
        self.field_change = field_change
        # agent id -> health status, for the topology's counts
        self.agents: dict[str, int] = {}
        # open pools followed until they close
        self.open_pools: set[str] = set()
        self.connected: dict[str, asyncio.Event] = {}
        self._layers: dict[str, tuple[bool, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        runners: dict[str, Callable[[], Awaitable[None]]] = {
            "registry": self._registry,
            "trust": self._trust,
            "consensus": self._consensus,
            "market": self._market,
            "swarm": self._pools,
            "hive": self._hive,
            "stigmergy": self._field,
        }
        for name in self.names:
            self.connected[name] = asyncio.Event()
            self._tasks.append(
                asyncio.create_task(self._forever(name, runners[name]), name=f"source-{name}")
            )
        if "swarm" in self.names:
            self._tasks.append(asyncio.create_task(self._poll_pools(), name="source-pool-poll"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _forever(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Runs one source again and again: a stream that ends or breaks is
        reopened (from the position its last commit recorded) after a pause."""
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except errors.ClientError as exc:
                level = logging.INFO if isinstance(exc, _RETRYABLE) else logging.WARNING
                log.log(level, "source %s interrupted: %s", name, exc)
            except Exception:
                log.exception("source %s failed", name)
            await asyncio.sleep(self.retry_s)

    # --- registry ----------------------------------------------------------------------

    async def _registry(self) -> None:
        index = self.bus.positions.get("registry", 0)
        in_snapshot = False
        # Agents known before the registry's stream started over: those
        # missing from the fresh snapshot left with the registry's state.
        known_before: set[str] | None = None
        async for response in self.registry.watch(from_index=index, retry_delay_s=self.retry_s):
            self.connected["registry"].set()
            drafts: list[Draft] = []
            if response.snapshot and not in_snapshot:
                # A fresh stream (first start, or the registry restarted
                # empty): resynchronise with the agents as they are now.
                first = "registry" not in self.bus.positions
                known_before = None if first else set(self.agents)
                self.agents.clear()
            if not response.snapshot and in_snapshot and known_before is not None:
                for agent_id in sorted(known_before - set(self.agents)):
                    drafts.append(
                        Draft(
                            "agent.left",
                            "registry",
                            agent_id,
                            {"status": "unknown", "reason": "resync"},
                            f"{agent_id} is no longer registered (the registry started over)",
                        )
                    )
                known_before = None
            in_snapshot = response.snapshot
            for e in response.events:
                agent_id = e.agent.card.agent_id
                if e.type in (
                    registry_pb2.EVENT_TYPE_DEREGISTERED,
                    registry_pb2.EVENT_TYPE_EXPIRED,
                ):
                    self.agents.pop(agent_id, None)
                else:
                    self.agents[agent_id] = e.agent.status
                if not response.snapshot:
                    draft = registry_draft(e)
                elif known_before is not None and agent_id not in known_before:
                    # Joined while the stream was down.
                    draft = registry_draft(e)
                else:
                    draft = None
                if draft is not None:
                    drafts.append(draft)
            await self.bus.publish(drafts, position=("registry", response.index))

    # --- trust ---------------------------------------------------------------------------

    async def _trust(self) -> None:
        index = self.bus.positions.get("trust", 0)
        while True:
            try:
                async for response in self.trust.watch(from_index=index):
                    self.connected["trust"].set()
                    drafts = [trust_draft(e) for e in response.events]
                    await self.bus.publish(drafts, position=("trust", response.index))
                    index = response.index
                return
            except errors.OutOfRange:
                log.info("trust no longer has index %d; following it from now", index)
                index = 0

    # --- consensus ----------------------------------------------------------------------

    async def _consensus(self) -> None:
        index = self.bus.positions.get("consensus", 0)
        async for response in self.consensus.watch(from_index=index, retry_delay_s=self.retry_s):
            self.connected["consensus"].set()
            drafts = [d for d in map(consensus_draft, response.events) if d is not None]
            await self.bus.publish(drafts, position=("consensus", response.index))

    # --- market ----------------------------------------------------------------------------

    async def _market(self) -> None:
        index = self.bus.positions.get("market", 0)
        resumed = False
        async for response in self.market.watch(from_index=index, retry_delay_s=self.retry_s):
            self.connected["market"].set()
            if not resumed:
                # Tasks won while nobody listened (or before a restart).
                resumed = True
                with contextlib.suppress(errors.ClientError):
                    await self.bridge.resume_assigned()
            drafts = [d for d in map(market_draft, response.events) if d is not None]
            await self.bus.publish(drafts, position=("market", response.index))
            for e in response.events:
                if (
                    e.type == market_pb2.EVENT_TYPE_AUCTION_WON
                    and e.task.dispatch == market_pb2.DISPATCH_BROKER
                ):
                    self.bridge.on_assigned(e.task)

    # --- pools -------------------------------------------------------------------------------

    async def _pools(self) -> None:
        async for pool in self.swarm.watch_pools():
            self.connected["swarm"].set()
            if pool.closed or pool.pool_id in self.open_pools:
                continue
            self.open_pools.add(pool.pool_id)
            await self.bus.publish_one(
                Draft(
                    "swarm.pool_opened",
                    "swarm",
                    pool.pool_id,
                    pool_attrs(pool),
                    f"pool {pool.pool_id} opened: {pool.topic}",
                    request_id=f"pool:{pool.pool_id}:opened",
                )
            )

    async def _poll_pools(self) -> None:
        while True:
            await asyncio.sleep(self.pool_poll_s)
            followed = self.open_pools | set(self.bridge.pools)
            if not followed:
                continue
            try:
                still_open = set()
                token = ""
                while True:
                    page = await self.swarm.list_pools(
                        page_size=1000, page_token=token, open_only=True
                    )
                    still_open.update(p.pool_id for p in page.pools)
                    token = page.next_page_token
                    if not token:
                        break
                for pool_id in followed - still_open:
                    await self._closed(pool_id)
            except asyncio.CancelledError:
                raise
            except errors.ClientError as exc:
                log.info("pool poll: %s", exc)
            except Exception:
                log.exception("pool poll failed")

    async def _closed(self, pool_id: str) -> None:
        try:
            pool = await self.swarm.get_pool(pool_id)
        except errors.NotFound:
            self.open_pools.discard(pool_id)
            await self.bridge.forget_pool(pool_id)
            return
        if not pool.closed:
            return  # listed as closed a moment too early; next round
        decided = pool.status == swarm_pb2.POOL_STATUS_DECIDED
        await self.bus.publish_one(
            Draft(
                "swarm.pool_decided" if decided else "swarm.pool_no_consensus",
                "swarm",
                pool.pool_id,
                pool_attrs(pool),
                f"pool {pool.topic!r} closed: "
                + (
                    f"{pool.decision} with confidence {pool.confidence:.3f}"
                    if decided
                    else "no consensus"
                ),
                request_id=f"pool:{pool.pool_id}:closed",
            )
        )
        if decided and self.bridge.wants_adoption(pool.pool_id):
            await self.bridge.adopt(pool)
        self.open_pools.discard(pool_id)
        await self.bridge.forget_pool(pool_id)

    # --- hive -------------------------------------------------------------------------------

    async def _hive(self) -> None:
        generation = self.bus.positions.get("hive", 0)
        while True:
            try:
                async for response in self.swarm.watch_hive(from_generation=generation):
                    self.connected["hive"].set()
                    if response.HasField("snapshot"):
                        await self.bus.publish([], position=("hive", response.generation))
                    else:
                        drafts = [d for d in map(hive_draft, response.events) if d is not None]
                        await self.bus.publish(drafts, position=("hive", response.generation))
                    generation = response.generation
                return
            except errors.OutOfRange:
                log.info("the hive no longer has generation %d; following it from now", generation)
                generation = 0

    # --- the field -------------------------------------------------------------------------

    async def _field(self) -> None:
        while True:
            field = await self.stigmergy.get_field()
            self.connected["stigmergy"].set()
            drafts = []
            for layer in field.layers:
                name = layer.pheromone_type
                was_active, last_total = self._layers.get(name, (False, 0.0))
                attrs = {
                    "pheromone_type": name,
                    "total": f"{layer.total:.4g}",
                    "maximum": f"{layer.maximum:.4g}",
                }
                if layer.active and not was_active:
                    drafts.append(
                        Draft(
                            "stigmergy.layer_active",
                            "stigmergy",
                            name,
                            attrs,
                            f"{name} appeared on the field (total {layer.total:.3g})",
                        )
                    )
                    self._layers[name] = (True, layer.total)
                elif layer.active and abs(layer.total - last_total) > self.field_change * max(
                    last_total, 1e-9
                ):
                    drafts.append(
                        Draft(
                            "stigmergy.layer_updated",
                            "stigmergy",
                            name,
                            attrs,
                            f"{name}: total {last_total:.3g} → {layer.total:.3g}, "
                            f"peak {layer.maximum:.3g}",
                        )
                    )
                    self._layers[name] = (True, layer.total)
                elif not layer.active and was_active:
                    drafts.append(
                        Draft(
                            "stigmergy.layer_faded",
                            "stigmergy",
                            name,
                            attrs,
                            f"{name} decayed away",
                        )
                    )
                    self._layers[name] = (False, 0.0)
            if drafts:
                await self.bus.publish(drafts)
            await asyncio.sleep(self.field_poll_s)
