"""Typed async client of the swarm service: voting pools, the hive mind, flocks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from agent2028.swarm.v1 import swarm_pb2, swarm_pb2_grpc
from clients.base import ServiceClient
from services.common import signing
from services.common.crypto import Identity
from services.common.timeutil import timestamp_from_ns, to_duration

THRESHOLDS = {
    "simple": swarm_pb2.THRESHOLD_SIMPLE_MAJORITY,
    "super": swarm_pb2.THRESHOLD_SUPER_MAJORITY,
    "unanimous": swarm_pb2.THRESHOLD_UNANIMOUS,
}
STATUS_NAMES = {0: "unspecified", 1: "pending", 2: "decided", 3: "no_consensus"}


def vote_request(
    identity: Identity,
    pool_id: str,
    decision: str,
    confidence: float,
    weight: float = 1.0,
    *,
    issue_ns: int | None = None,
) -> swarm_pb2.VoteRequest:
    issue_ns = time.time_ns() if issue_ns is None else issue_ns
    confidence, weight = float(confidence), float(weight)
    signature = identity.sign(
        *signing.swarm_vote(pool_id, identity.signer_id, decision, confidence, weight, issue_ns)
    )
    return swarm_pb2.VoteRequest(
        pool_id=pool_id,
        agent_id=identity.signer_id,
        decision=decision,
        confidence=confidence,
        weight=weight,
        issue_time=timestamp_from_ns(issue_ns),
        signature=signature,
    )


def belief_request(
    identity: Identity,
    name: str,
    confidence: float,
    *,
    expected_generation: int | None = None,
    issue_ns: int | None = None,
) -> swarm_pb2.ProposeBeliefRequest:
    issue_ns = time.time_ns() if issue_ns is None else issue_ns
    confidence = float(confidence)
    signature = identity.sign(
        *signing.hive_belief(identity.signer_id, name, confidence, expected_generation, issue_ns)
    )
    request = swarm_pb2.ProposeBeliefRequest(
        agent_id=identity.signer_id,
        name=name,
        confidence=confidence,
        issue_time=timestamp_from_ns(issue_ns),
        signature=signature,
    )
    if expected_generation is not None:
        request.expected_generation = expected_generation
    return request


def intention_request(
    identity: Identity,
    intention: str,
    *,
    expected_generation: int | None = None,
    issue_ns: int | None = None,
) -> swarm_pb2.ProposeIntentionRequest:
    issue_ns = time.time_ns() if issue_ns is None else issue_ns
    signature = identity.sign(
        *signing.hive_intention(identity.signer_id, intention, expected_generation, issue_ns)
    )
    request = swarm_pb2.ProposeIntentionRequest(
        agent_id=identity.signer_id,
        intention=intention,
        issue_time=timestamp_from_ns(issue_ns),
        signature=signature,
    )
    if expected_generation is not None:
        request.expected_generation = expected_generation
    return request


class SwarmClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = swarm_pb2_grpc.SwarmServiceStub(self.channel)

    # --- pools ---------------------------------------------------------------------

    async def create_pool(
        self,
        topic: str,
        *,
        threshold: str = "simple",
        duration_s: float = 3600.0,
        min_votes: int = 0,
        request_id: str = "",
    ) -> swarm_pb2.Pool:
        response = await self._unary(
            self.stub.CreatePool,
            swarm_pb2.CreatePoolRequest(
                topic=topic,
                threshold=THRESHOLDS[threshold],
                duration=to_duration(duration_s),
                min_votes=min_votes,
                request_id=request_id,
            ),
        )
        return response.pool

    async def get_pool(self, pool_id: str) -> swarm_pb2.Pool:
        response = await self._unary(self.stub.GetPool, swarm_pb2.GetPoolRequest(pool_id=pool_id))
        return response.pool

    async def list_votes(
        self, pool_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> swarm_pb2.ListVotesResponse:
        return await self._unary(
            self.stub.ListVotes,
            swarm_pb2.ListVotesRequest(pool_id=pool_id, page_size=page_size, page_token=page_token),
        )

    async def list_pools(
        self, *, page_size: int = 0, page_token: str = "", open_only: bool = False
    ) -> swarm_pb2.ListPoolsResponse:
        return await self._unary(
            self.stub.ListPools,
            swarm_pb2.ListPoolsRequest(
                page_size=page_size, page_token=page_token, open_only=open_only
            ),
        )

    async def vote(
        self,
        identity: Identity,
        pool_id: str,
        decision: str,
        confidence: float,
        weight: float = 1.0,
        *,
        timeout_s: float | None = None,
    ) -> swarm_pb2.VoteResponse:
        """Votes as ``identity`` (a registered agent); the vote is signed."""
        return await self._unary(
            self.stub.Vote,
            vote_request(identity, pool_id, decision, confidence, weight),
            timeout_s=timeout_s,
        )

    async def get_consensus(self, pool_id: str) -> swarm_pb2.GetConsensusResponse:
        return await self._unary(
            self.stub.GetConsensus, swarm_pb2.GetConsensusRequest(pool_id=pool_id)
        )

    async def watch_pools(self) -> AsyncIterator[swarm_pb2.Pool]:
        """Open pools, then each pool as it opens (until the stream ends)."""
        async for response in self._stream(self.stub.WatchPools, swarm_pb2.WatchPoolsRequest()):
            for pool in response.pools:
                yield pool

    # --- the hive ----------------------------------------------------------------------

    async def get_hive(self) -> swarm_pb2.HiveState:
        response = await self._unary(self.stub.GetHive, swarm_pb2.GetHiveRequest())
        return response.state

    async def propose_belief(
        self,
        identity: Identity,
        name: str,
        confidence: float,
        *,
        expected_generation: int | None = None,
    ) -> swarm_pb2.ProposeBeliefResponse:
        return await self._unary(
            self.stub.ProposeBelief,
            belief_request(identity, name, confidence, expected_generation=expected_generation),
        )

    async def propose_intention(
        self, identity: Identity, intention: str, *, expected_generation: int | None = None
    ) -> swarm_pb2.ProposeIntentionResponse:
        return await self._unary(
            self.stub.ProposeIntention,
            intention_request(identity, intention, expected_generation=expected_generation),
        )

    async def update_from_vote(
        self, pool_id: str, *, expected_generation: int | None = None
    ) -> swarm_pb2.UpdateFromVoteResponse:
        request = swarm_pb2.UpdateFromVoteRequest(pool_id=pool_id)
        if expected_generation is not None:
            request.expected_generation = expected_generation
        return await self._unary(self.stub.UpdateFromVote, request)

    async def watch_hive(
        self, *, from_generation: int = 0
    ) -> AsyncIterator[swarm_pb2.WatchHiveResponse]:
        async for response in self._stream(
            self.stub.WatchHive, swarm_pb2.WatchHiveRequest(from_generation=from_generation)
        ):
            yield response

    # --- flocks ---------------------------------------------------------------------------

    async def create_flock(
        self,
        boids: int,
        *,
        seed: int = 0,
        world: tuple[float, float] | None = None,
        rules: dict[str, float] | None = None,
        request_id: str = "",
    ) -> swarm_pb2.Flock:
        request = swarm_pb2.CreateFlockRequest(
            boids=boids,
            seed=seed,
            request_id=request_id,
            rules=swarm_pb2.FlockRules(**(rules or {})),
        )
        if world is not None:
            request.world.CopyFrom(swarm_pb2.World(width=world[0], height=world[1]))
        response = await self._unary(self.stub.CreateFlock, request)
        return response.flock

    async def step_flock(
        self, flock_id: str, steps: int = 1, *, request_id: str = "", timeout_s: float = 60.0
    ) -> swarm_pb2.StepFlockResponse:
        return await self._unary(
            self.stub.StepFlock,
            swarm_pb2.StepFlockRequest(flock_id=flock_id, steps=steps, request_id=request_id),
            timeout_s=timeout_s,
        )

    async def get_flock(
        self, flock_id: str, *, include_boids: bool = False
    ) -> swarm_pb2.GetFlockResponse:
        return await self._unary(
            self.stub.GetFlock,
            swarm_pb2.GetFlockRequest(flock_id=flock_id, include_boids=include_boids),
        )

    async def list_flocks(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> swarm_pb2.ListFlocksResponse:
        return await self._unary(
            self.stub.ListFlocks,
            swarm_pb2.ListFlocksRequest(page_size=page_size, page_token=page_token),
        )

    async def delete_flock(self, flock_id: str) -> None:
        await self._unary(self.stub.DeleteFlock, swarm_pb2.DeleteFlockRequest(flock_id=flock_id))
