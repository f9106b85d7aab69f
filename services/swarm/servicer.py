"""SwarmService over gRPC: converts protos to core calls and back, checks
agents' signatures against the keys they registered, and persists every change
before acknowledging it.

A change is applied in memory first (so compare-and-set and ordering are
decided on the event loop, atomically) and acknowledged after its commit;
watchers and readers may see it a moment before its writer's acknowledgement.

Who may do what: votes and hive writes are signed by registered agents.
CreatePool, UpdateFromVote and the flock calls are not: opening a pool asks
nothing of anyone (and open pools are capped), adopting a result only copies
what the signed votes already decided, and flocks are simulations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from prometheus_client import Counter, Gauge

from agent2028.swarm.v1 import swarm_pb2, swarm_pb2_grpc
from clients.registry import RegistryClient, public_key_fetch
from services.common import signing
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.registered_keys import RegisteredKeys
from services.common.timeutil import (
    from_duration,
    timestamp_from_ns,
    timestamp_ns,
    to_timestamp,
)
from services.common.validation import optional_id, page_size
from services.swarm.config import SwarmConfig
from services.swarm.core import (
    Belief,
    Decision,
    Hive,
    HiveEvent,
    Intention,
    Pool,
    Pools,
    require_duration,
)
from services.swarm.flock import Flock, FlockRecord, FlockRules, Flocks, World
from services.swarm.store import SwarmStore

log = logging.getLogger(__name__)

VOTES = Counter("agent2028_swarm_votes_total", "Votes recorded (replacements included).")
HIVE_GENERATION = Gauge("agent2028_swarm_hive_generation", "The hive mind's generation.")
FLOCK_STEPS = Counter("agent2028_swarm_flock_steps_total", "Flock steps simulated.")

SNAPSHOT_BATCH = 256


# --- conversions ---------------------------------------------------------------------------


def pool_to_proto(pool: Pool, now_wall: float) -> swarm_pb2.Pool:
    result = pool.consensus(now_wall)
    return swarm_pb2.Pool(
        pool_id=pool.pool_id,
        topic=pool.topic,
        threshold=int(pool.threshold),
        min_votes=pool.min_votes,
        create_time=to_timestamp(pool.create_wall),
        close_time=to_timestamp(pool.close_wall),
        closed=result.closed,
        status=int(result.status),
        decision=result.decision,
        confidence=result.confidence,
        vote_count=result.votes,
        tallies=[
            swarm_pb2.Tally(decision=t.decision, score=t.score, votes=t.votes)
            for t in result.tallies
        ],
    )


def belief_to_proto(b: Belief) -> swarm_pb2.Belief:
    return swarm_pb2.Belief(
        name=b.name,
        confidence=b.confidence,
        source=b.source,
        generation=b.generation,
        update_time=to_timestamp(b.wall),
    )


def intention_to_proto(i: Intention) -> swarm_pb2.Intention:
    return swarm_pb2.Intention(
        text=i.text, source=i.source, generation=i.generation, create_time=to_timestamp(i.wall)
    )


def decision_to_proto(d: Decision) -> swarm_pb2.Decision:
    return swarm_pb2.Decision(
        topic=d.topic,
        decision=d.decision,
        confidence=d.confidence,
        pool_id=d.pool_id,
        final=d.final,
        generation=d.generation,
        adopt_time=to_timestamp(d.wall),
    )


def event_to_proto(e: HiveEvent) -> swarm_pb2.HiveEvent:
    event = swarm_pb2.HiveEvent(
        generation=e.generation,
        kind=int(e.kind),
        removed_belief=e.removed_belief,
        event_time=to_timestamp(e.wall),
    )
    if e.belief is not None:
        event.belief.CopyFrom(belief_to_proto(e.belief))
    if e.intention is not None:
        event.intention.CopyFrom(intention_to_proto(e.intention))
    if e.decision is not None:
        event.decision.CopyFrom(decision_to_proto(e.decision))
    return event


def hive_to_proto(hive: Hive) -> swarm_pb2.HiveState:
    state = hive.state
    return swarm_pb2.HiveState(
        generation=state.generation,
        beliefs=[belief_to_proto(state.beliefs[n]) for n in sorted(state.beliefs)],
        intentions=[intention_to_proto(i) for i in state.intentions.values()],
        decisions=[decision_to_proto(state.decisions[t]) for t in sorted(state.decisions)],
    )


def rules_from_proto(message: swarm_pb2.FlockRules) -> FlockRules:
    defaults = FlockRules()
    values: dict[str, Any] = {}
    for name in (
        "separation_distance",
        "alignment_distance",
        "cohesion_distance",
        "separation_weight",
        "alignment_weight",
        "cohesion_weight",
        "max_speed",
        "max_force",
        "max_neighbors",
    ):
        values[name] = getattr(message, name) if message.HasField(name) else getattr(defaults, name)
    return FlockRules(**values)


def rules_to_proto(rules: FlockRules) -> swarm_pb2.FlockRules:
    return swarm_pb2.FlockRules(**rules.to_dict())


def flock_to_proto(record: FlockRecord) -> swarm_pb2.Flock:
    flock = record.flock
    return swarm_pb2.Flock(
        flock_id=record.flock_id,
        boids=flock.size,
        rules=rules_to_proto(flock.rules),
        world=swarm_pb2.World(width=flock.world.width, height=flock.world.height),
        seed=record.seed,
        steps=flock.steps,
        order_parameter=flock.order(),
        create_time=to_timestamp(record.create_wall),
    )


def _issue_ns(request: Any) -> int:
    if not request.HasField("issue_time"):
        raise InvalidArgument("issue_time is required", field="issue_time", reason="EMPTY_FIELD")
    return timestamp_ns(request.issue_time)


def _expected(request: Any) -> int | None:
    return request.expected_generation if request.HasField("expected_generation") else None


class _Watchers:
    """Bounded per-watcher queues; a watcher that falls behind is told so."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.queues: dict[asyncio.Queue[Any], list[bool]] = {}

    def add(self) -> tuple[asyncio.Queue[Any], list[bool]]:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.maxsize)
        lagged: list[bool] = []
        self.queues[queue] = lagged
        return queue, lagged

    def remove(self, queue: asyncio.Queue[Any]) -> None:
        self.queues.pop(queue, None)

    def publish(self, item: Any) -> None:
        for queue, lagged in self.queues.items():
            if lagged:
                continue
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                lagged.append(True)


class SwarmServicer(swarm_pb2_grpc.SwarmServiceServicer):
    def __init__(self, app: SwarmApp) -> None:
        self.app = app
        self.pools = app.pools
        self.hive = app.hive
        self.flocks = app.flocks
        self.config = app.config
        self._flock_locks: dict[str, asyncio.Lock] = {}

    @property
    def store(self) -> SwarmStore:
        assert self.app.store is not None, "the swarm service is not started"
        return self.app.store

    @property
    def keys(self) -> RegisteredKeys:
        assert self.app.keys is not None, "the swarm service is not started"
        return self.app.keys

    # --- pools -----------------------------------------------------------------------

    async def CreatePool(
        self, request: swarm_pb2.CreatePoolRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.CreatePoolResponse:
        if not request.HasField("duration"):
            raise InvalidArgument("duration is required", field="duration", reason="EMPTY_FIELD")
        d = request.duration
        if (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos) or abs(d.nanos) > 999_999_999:
            raise InvalidArgument(
                "duration is not a valid duration", field="duration", reason="INVALID_DURATION"
            )
        seconds = require_duration(from_duration(d))
        pool, created = self.pools.create(
            topic=request.topic,
            threshold=request.threshold or swarm_pb2.THRESHOLD_SIMPLE_MAJORITY,
            duration_s=seconds,
            min_votes=request.min_votes,
            request_id=request.request_id,
        )
        if created:
            await self.store.save_pool(pool)
            self.app.pool_watchers.publish(pool)
            log.info(
                "pool %s opened on %r (%s, %.0fs)",
                pool.pool_id,
                pool.topic,
                pool.threshold.name,
                pool.duration_s,
            )
        return swarm_pb2.CreatePoolResponse(
            pool=pool_to_proto(pool, self.pools.now()), created=created
        )

    async def GetPool(
        self, request: swarm_pb2.GetPoolRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.GetPoolResponse:
        pool = self.pools.get(request.pool_id)
        return swarm_pb2.GetPoolResponse(pool=pool_to_proto(pool, self.pools.now()))

    async def ListVotes(
        self, request: swarm_pb2.ListVotesRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ListVotesResponse:
        votes, token, total = self.pools.list_votes(
            request.pool_id, page_size=page_size(request.page_size), page_token=request.page_token
        )
        return swarm_pb2.ListVotesResponse(
            votes=[
                swarm_pb2.PoolVote(
                    agent_id=v.agent_id,
                    decision=v.decision,
                    confidence=v.confidence,
                    weight=v.weight,
                    issue_time=timestamp_from_ns(v.issue_ns),
                )
                for v in votes
            ],
            next_page_token=token,
            total_size=total,
        )

    async def ListPools(
        self, request: swarm_pb2.ListPoolsRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ListPoolsResponse:
        size = page_size(request.page_size)
        page, token, total = self.pools.list(
            page_size=size, page_token=request.page_token, open_only=request.open_only
        )
        now = self.pools.now()
        return swarm_pb2.ListPoolsResponse(
            pools=[pool_to_proto(p, now) for p in page], next_page_token=token, total_size=total
        )

    async def Vote(
        self, request: swarm_pb2.VoteRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.VoteResponse:
        issue_ns = _issue_ns(request)
        args = (
            request.pool_id,
            request.agent_id,
            request.decision,
            request.confidence,
            request.weight,
            issue_ns,
        )
        self.pools.check_vote(*args)
        await self.keys.verify(request.agent_id, request.signature, signing.swarm_vote(*args))
        outcome = self.pools.vote(*args, request.signature)
        if not outcome.duplicate:
            await self.store.save_vote(outcome.pool.pool_id, outcome.vote)
            VOTES.inc()
        return swarm_pb2.VoteResponse(
            pool=pool_to_proto(outcome.pool, self.pools.now()),
            replaced=outcome.replaced is not None,
            duplicate=outcome.duplicate,
        )

    async def GetConsensus(
        self, request: swarm_pb2.GetConsensusRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.GetConsensusResponse:
        pool = self.pools.get(request.pool_id)
        now = self.pools.now()
        result = pool.consensus(now)
        return swarm_pb2.GetConsensusResponse(
            decision=result.decision,
            confidence=result.confidence,
            status=int(result.status),
            closed=result.closed,
            vote_count=result.votes,
            pool=pool_to_proto(pool, now),
        )

    async def WatchPools(
        self, request: swarm_pb2.WatchPoolsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.WatchPoolsResponse]:
        queue, lagged = self.app.pool_watchers.add()
        try:
            now = self.pools.now()
            open_pools = self.pools.open_pools()
            yield swarm_pb2.WatchPoolsResponse(
                pools=[pool_to_proto(p, now) for p in open_pools[:SNAPSHOT_BATCH]]
            )
            for start in range(SNAPSHOT_BATCH, len(open_pools), SNAPSHOT_BATCH):
                yield swarm_pb2.WatchPoolsResponse(
                    pools=[
                        pool_to_proto(p, now) for p in open_pools[start : start + SNAPSHOT_BATCH]
                    ]
                )
            while True:
                pools = [await queue.get()]
                while not queue.empty():
                    pools.append(queue.get_nowait())
                now = self.pools.now()
                yield swarm_pb2.WatchPoolsResponse(pools=[pool_to_proto(p, now) for p in pools])
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        "pool watcher fell behind; watch again", reason="WATCHER_LAGGED"
                    )
        finally:
            self.app.pool_watchers.remove(queue)

    # --- the hive ----------------------------------------------------------------------

    async def GetHive(
        self, request: swarm_pb2.GetHiveRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.GetHiveResponse:
        return swarm_pb2.GetHiveResponse(state=hive_to_proto(self.hive))

    async def ProposeBelief(
        self, request: swarm_pb2.ProposeBeliefRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ProposeBeliefResponse:
        issue_ns = _issue_ns(request)
        expected = _expected(request)
        self.hive.check_write(request.agent_id, issue_ns)
        await self.keys.verify(
            request.agent_id,
            request.signature,
            signing.hive_belief(
                request.agent_id, request.name, request.confidence, expected, issue_ns
            ),
        )
        write = self.hive.propose_belief(
            request.agent_id,
            request.name,
            request.confidence,
            issue_ns=issue_ns,
            signature=request.signature,
            expected_generation=expected,
        )
        await self.store.save_hive(write)
        HIVE_GENERATION.set(self.hive.generation)
        return swarm_pb2.ProposeBeliefResponse(
            generation=write.generation, changed=write.event is not None, duplicate=write.duplicate
        )

    async def ProposeIntention(
        self, request: swarm_pb2.ProposeIntentionRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ProposeIntentionResponse:
        issue_ns = _issue_ns(request)
        expected = _expected(request)
        self.hive.check_write(request.agent_id, issue_ns)
        await self.keys.verify(
            request.agent_id,
            request.signature,
            signing.hive_intention(request.agent_id, request.intention, expected, issue_ns),
        )
        write = self.hive.propose_intention(
            request.agent_id,
            request.intention,
            issue_ns=issue_ns,
            signature=request.signature,
            expected_generation=expected,
        )
        await self.store.save_hive(write)
        HIVE_GENERATION.set(self.hive.generation)
        return swarm_pb2.ProposeIntentionResponse(
            generation=write.generation, changed=write.event is not None, duplicate=write.duplicate
        )

    async def UpdateFromVote(
        self, request: swarm_pb2.UpdateFromVoteRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.UpdateFromVoteResponse:
        pool = self.pools.get(request.pool_id)
        write = self.hive.update_from_vote(
            pool, now_wall=self.pools.now(), expected_generation=_expected(request)
        )
        await self.store.save_hive(write)
        HIVE_GENERATION.set(self.hive.generation)
        decision = self.hive.state.decisions[pool.topic]
        if write.event is not None:
            log.info(
                "hive adopted %s=%s (%.3f) from %s at generation %d",
                decision.topic,
                decision.decision,
                decision.confidence,
                pool.pool_id,
                write.generation,
            )
        return swarm_pb2.UpdateFromVoteResponse(
            generation=write.generation,
            changed=write.event is not None,
            decision=decision_to_proto(decision),
        )

    async def WatchHive(
        self, request: swarm_pb2.WatchHiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.WatchHiveResponse]:
        if request.from_generation < 0:
            raise InvalidArgument(
                "from_generation must not be negative",
                field="from_generation",
                reason="OUT_OF_RANGE",
            )
        queue, lagged = self.app.hive_watchers.add()
        try:
            # No await between subscribing and reading the state or backlog, so
            # nothing falls between them and nothing comes twice.
            if request.from_generation == 0:
                first = swarm_pb2.WatchHiveResponse(
                    snapshot=hive_to_proto(self.hive), generation=self.hive.generation
                )
            else:
                backlog = self.hive.events_since(request.from_generation)
                first = swarm_pb2.WatchHiveResponse(
                    events=[event_to_proto(e) for e in backlog],
                    generation=self.hive.generation,
                )
            yield first
            while True:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                yield swarm_pb2.WatchHiveResponse(
                    events=[event_to_proto(e) for e in events], generation=events[-1].generation
                )
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        f"hive watcher fell behind; watch again from {events[-1].generation}",
                        reason="WATCHER_LAGGED",
                        metadata={"resume_generation": str(events[-1].generation)},
                    )
        finally:
            self.app.hive_watchers.remove(queue)

    # --- flocks ---------------------------------------------------------------------------

    async def CreateFlock(
        self, request: swarm_pb2.CreateFlockRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.CreateFlockResponse:
        world = World()
        if request.HasField("world"):
            world = World(request.world.width, request.world.height)
        rules = rules_from_proto(request.rules)
        record, created = self.flocks.create(
            request.boids,
            rules,
            world,
            request.seed,
            request_id=request.request_id,
            now_wall=self.pools.now(),
        )
        if created:
            await self.store.save_flock(record)
            log.info("flock %s of %d boids created", record.flock_id, record.flock.size)
        return swarm_pb2.CreateFlockResponse(flock=flock_to_proto(record), created=created)

    async def StepFlock(
        self, request: swarm_pb2.StepFlockRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.StepFlockResponse:
        optional_id(request.request_id, "request_id")
        record = self.flocks.check_step(request.flock_id, request.steps)
        lock = self._flock_locks.setdefault(record.flock_id, asyncio.Lock())
        async with lock:
            if request.request_id and request.request_id == record.last_step_request:
                return swarm_pb2.StepFlockResponse(
                    flock=flock_to_proto(record), order_parameters=record.last_step_orders or []
                )
            current = record.flock
            # Step a copy off the event loop, so readers never see a half-step.
            copy = Flock(
                current.rules,
                current.world,
                current.positions.copy(),
                current.velocities.copy(),
                steps=current.steps,
            )
            orders = await asyncio.to_thread(copy.step, request.steps)
            if self.flocks.flocks.get(record.flock_id) is not record:
                # Deleted meanwhile: nothing to save.
                return swarm_pb2.StepFlockResponse(
                    flock=flock_to_proto(record), order_parameters=orders
                )
            record.flock = copy
            record.last_step_request = request.request_id
            record.last_step_orders = orders
            await self.store.save_flock(record)
        FLOCK_STEPS.inc(request.steps)
        return swarm_pb2.StepFlockResponse(flock=flock_to_proto(record), order_parameters=orders)

    async def GetFlock(
        self, request: swarm_pb2.GetFlockRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.GetFlockResponse:
        record = self.flocks.get(request.flock_id)
        response = swarm_pb2.GetFlockResponse(flock=flock_to_proto(record))
        if request.include_boids:
            flock = record.flock
            p = flock.positions.astype(np.float32)
            v = flock.velocities.astype(np.float32)
            response.boids.x.extend(p[:, 0].tolist())
            response.boids.y.extend(p[:, 1].tolist())
            response.boids.vx.extend(v[:, 0].tolist())
            response.boids.vy.extend(v[:, 1].tolist())
        return response

    async def ListFlocks(
        self, request: swarm_pb2.ListFlocksRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ListFlocksResponse:
        size = page_size(request.page_size)
        page, token, total = self.flocks.list(page_size=size, page_token=request.page_token)
        return swarm_pb2.ListFlocksResponse(
            flocks=[flock_to_proto(r) for r in page], next_page_token=token, total_size=total
        )

    async def DeleteFlock(
        self, request: swarm_pb2.DeleteFlockRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.DeleteFlockResponse:
        record = self.flocks.delete(request.flock_id)
        self._flock_locks.pop(record.flock_id, None)
        await self.store.delete_flock(record.flock_id)
        return swarm_pb2.DeleteFlockResponse()


class SwarmApp(ServiceApp):
    label = "swarm"

    def __init__(self, config: SwarmConfig, data_dir: str) -> None:
        super().__init__()
        self.config = config
        self.data_dir = data_dir
        self.pools = Pools(config.settings)
        self.hive = Hive(config.settings)
        self.flocks = Flocks(config.flocks)
        self.store: SwarmStore | None = None
        self.keys: RegisteredKeys | None = None
        self.registry: RegistryClient | None = None
        self.pool_watchers = _Watchers(config.watch_queue)
        self.hive_watchers = _Watchers(config.watch_queue)
        self.hive.listeners.append(self.hive_watchers.publish)
        self.servicer = SwarmServicer(self)
        self._sweeper: asyncio.Task[None] | None = None

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, swarm_pb2.DESCRIPTOR.services_by_name["SwarmService"])]

    async def start(self) -> None:
        self.store = SwarmStore(
            os.path.join(self.data_dir, "swarm.db"), synchronous=self.config.db_synchronous
        )
        await self.store.open()
        loaded = await self.store.load()
        for pool in loaded.pools:
            self.pools.add(pool)
        self.hive.load(
            loaded.generation, loaded.beliefs, loaded.intentions, loaded.decisions, loaded.writers
        )
        for record in loaded.flocks:
            self.flocks.add(record)
        HIVE_GENERATION.set(self.hive.generation)
        log.info(
            "swarm state loaded: %d pools, hive generation %d, %d flocks",
            len(loaded.pools),
            loaded.generation,
            len(loaded.flocks),
        )
        self.registry = RegistryClient(self.config.registry_addr, timeout_s=2.0)
        self.keys = RegisteredKeys(
            public_key_fetch(self.registry), ttl_s=self.config.key_cache_ttl_s
        )
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="swarm-sweeper")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                expired = [p.pool_id for p in self.pools.expired()]
                if expired and self.store is not None:
                    await self.store.delete_pools(expired)
                    self.pools.forget(expired)
                    log.info("forgot %d pools past their retention", len(expired))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("swarm sweep failed")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.store is not None:
            await self.store.close()
        if self.registry is not None:
            await self.registry.close()


async def build(server_config: ServerConfig) -> SwarmApp:
    return SwarmApp(SwarmConfig.from_env(), server_config.data_dir)
