"""Agent behaviour: vote in the swarm's voting pools.

The agent watches the swarm service's pools (open ones first, then each new
one) and casts one signed vote in each by its policy (``--pool-vote SPEC`` or
AGENT_POOL_VOTE):

- ``DECISION[:CONFIDENCE[:WEIGHT]]``, e.g. ``approve:0.9``: always that
  decision (confidence 1 and weight 1 by default);
- ``random``: approve or reject with a confidence in [0.5, 1), drawn from a
  generator seeded by the agent id and the pool, so a rerun votes the same.

When the stream breaks (the service restarts) it reconnects with jittered
backoff and votes in the pools it has not voted in yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from dataclasses import dataclass

from clients.errors import ClientError, FailedPrecondition, NotFound
from clients.swarm import SwarmClient
from services.common.validation import require_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VotePolicy:
    decision: str
    confidence: float = 1.0
    weight: float = 1.0

    @property
    def random(self) -> bool:
        return self.decision == "random"

    @classmethod
    def parse(cls, spec: str) -> VotePolicy:
        parts = spec.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(
                f"vote policy {spec!r}: expected DECISION[:CONFIDENCE[:WEIGHT]] or random"
            )
        try:
            require_id(parts[0], "decision", max_len=64)
            confidence = float(parts[1]) if len(parts) > 1 else 1.0
            weight = float(parts[2]) if len(parts) > 2 else 1.0
        except Exception as exc:
            raise ValueError(f"vote policy {spec!r}: {exc}") from None
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"vote policy {spec!r}: confidence must be within [0, 1]")
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"vote policy {spec!r}: weight must be a number >= 0")
        return cls(parts[0], confidence, weight)

    def choose(self, agent_id: str, pool_id: str) -> tuple[str, float, float]:
        if not self.random:
            return self.decision, self.confidence, self.weight
        seed = hashlib.sha256(f"{agent_id}/{pool_id}".encode()).digest()
        rng = random.Random(int.from_bytes(seed[:8], "big"))
        return rng.choice(("approve", "reject")), round(rng.uniform(0.5, 1.0), 3), self.weight


def behaviour(policy: VotePolicy, swarm_addr: str):  # type: ignore[no-untyped-def]
    """The coroutine for ``Agent.add_behaviour``."""

    async def vote_in_pools(agent) -> None:  # type: ignore[no-untyped-def]
        voted: set[str] = set()
        agent.votes_cast = voted
        delay = 0.1
        async with SwarmClient(swarm_addr, timeout_s=3.0) as client:
            while not agent.stopping.is_set():
                try:
                    async for pool in client.watch_pools():
                        delay = 0.1
                        if pool.pool_id in voted or pool.closed:
                            continue
                        decision, confidence, weight = policy.choose(agent.agent_id, pool.pool_id)
                        try:
                            await client.vote(
                                agent.identity, pool.pool_id, decision, confidence, weight
                            )
                        except (FailedPrecondition, NotFound) as exc:
                            log.info("agent %s: pool %s: %s", agent.agent_id, pool.pool_id, exc)
                        voted.add(pool.pool_id)
                        log.info(
                            "agent %s voted %s (%.2f) on %s (%s)",
                            agent.agent_id,
                            decision,
                            confidence,
                            pool.topic,
                            pool.pool_id,
                        )
                except ClientError as exc:
                    log.info("agent %s: pool watch interrupted (%s)", agent.agent_id, exc)
                await _pause(agent, random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)

    return vote_in_pools


async def _pause(agent, seconds: float) -> None:  # type: ignore[no-untyped-def]
    try:
        await asyncio.wait_for(agent.stopping.wait(), seconds)
    except TimeoutError:
        pass
