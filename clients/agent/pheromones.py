"""Agent behaviour: live on the pheromone field (the stigmergy service).

An agent holds a position on the field and, every step, senses the gradient
of a pheromone type at that position and moves along it; what it deposits
depends on the policy (``--field SPEC`` or AGENT_FIELD):

- ``forage[:TYPE]`` (TYPE defaults to ``work``): follow TYPE's gradient, wander
  where the field is flat, and deposit TYPE where it found work: after every
  step in which it ran commands successfully, as much as it ran. Other
  foragers are drawn to where work was found.
- ``follow:TYPE`` (e.g. ``follow:food@440,500``): climb TYPE's gradient and
  leave a ``trail`` deposit at every position it reaches, so its path shows.
- ``walk:TYPE@X,Y>X,Y`` (the guide's 6.3): walk from the start to the target,
  each step ``speed * (toward target + TYPE's gradient / 2)``, depositing TYPE
  along the way; start again when the target (or the edge) is reached. The
  gradient is sensed within 2 * speed cells, so a walker keeps to the trail
  under its feet (the trail behind it can slow it, never stop it). Walkers
  reinforce each other's trail.

``@X,Y`` sets the start (default: a spot derived from the agent id).
AGENT_FIELD_STEP_S (0.1) is the pause between steps and AGENT_FIELD_SPEED (10)
the cells moved per step. Every deposit is signed with the agent's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from dataclasses import dataclass

from clients.errors import ClientError, ResourceExhausted
from clients.stigmergy import StigmergyClient

log = logging.getLogger(__name__)

POLICIES = ("forage", "follow", "walk")
# The field's own rule for type names, checked here so a bad flag fails at start.
TYPE_RE = re.compile(r"[a-z][a-z0-9_\-]{0,63}")
TRAIL_TYPE = "trail"
# How strongly a walker keeps to the trail against heading for its target.
TRAIL_PULL = 0.5


@dataclass(frozen=True)
class FieldPolicy:
    kind: str
    pheromone_type: str
    start: tuple[float, float] | None = None
    target: tuple[float, float] | None = None
    step_s: float = 0.1
    speed: float = 10.0
    # Sensing radius for the gradient; 0 means the service's default.
    radius: int = 0

    @classmethod
    def parse(cls, spec: str, *, step_s: float = 0.1, speed: float = 10.0) -> FieldPolicy:
        """``POLICY[:TYPE][@X,Y][>X,Y]``; ValueError naming what is wrong."""
        text = spec.strip()
        target = None
        if ">" in text:
            text, _, target_text = text.partition(">")
            target = _point(target_text, spec)
        start = None
        if "@" in text:
            text, _, start_text = text.partition("@")
            start = _point(start_text, spec)
        kind, _, pheromone_type = text.partition(":")
        if kind not in POLICIES:
            raise ValueError(f"field policy {spec!r}: expected one of {', '.join(POLICIES)}")
        pheromone_type = pheromone_type or ("work" if kind == "forage" else "")
        if not pheromone_type:
            raise ValueError(
                f"field policy {spec!r}: {kind} needs a pheromone type, e.g. {kind}:food"
            )
        if not TYPE_RE.fullmatch(pheromone_type):
            raise ValueError(
                f"field policy {spec!r}: {pheromone_type!r} is not a lowercase word of [a-z0-9_-]"
            )
        if kind == "walk" and target is None:
            raise ValueError(
                f"field policy {spec!r}: walk needs a target, e.g. walk:trail@0,0>999,999"
            )
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError("AGENT_FIELD_STEP_S must be a positive number")
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError("AGENT_FIELD_SPEED must be a positive number")
        return cls(kind, pheromone_type, start, target, step_s, speed)


def _point(text: str, spec: str) -> tuple[float, float]:
    try:
        x_text, y_text = text.split(",")
        x, y = float(x_text), float(y_text)
    except ValueError:
        raise ValueError(f"field policy {spec!r}: {text!r} is not X,Y") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"field policy {spec!r}: {text!r} is not a finite point")
    return x, y


class FieldWalker:
    """The state of one agent on the field (kept on the agent as ``walker``)."""

    def __init__(self, agent_id: str, policy: FieldPolicy, width: int, height: int) -> None:
        self.policy = policy
        self.width = width
        self.height = height
        seed = int.from_bytes(hashlib.sha256(agent_id.encode()).digest()[:8], "big")
        self.rng = random.Random(seed)
        self.start = policy.start or (self.rng.uniform(0, width), self.rng.uniform(0, height))
        self.x, self.y = self.clamp(*self.start)
        self.steps = 0
        self.deposits = 0
        self.walks = 0

    def clamp(self, x: float, y: float) -> tuple[float, float]:
        # Just inside the grid: the field refuses x == width.
        return (
            min(max(x, 0.0), math.nextafter(self.width, 0)),
            min(max(y, 0.0), math.nextafter(self.height, 0)),
        )

    def inside(self, x: float, y: float) -> bool:
        return 0 <= x < self.width and 0 <= y < self.height


async def _deposit(
    client: StigmergyClient, agent, walker: FieldWalker, pheromone_type: str, amount: float = 0.0
) -> None:  # type: ignore[no-untyped-def]
    try:
        await client.deposit(
            agent.identity, walker.x, walker.y, pheromone_type, amount, timeout_s=2.0
        )
        walker.deposits += 1
    except ResourceExhausted as exc:
        wait = float(exc.metadata.get("retry_after_s", "0.5") or 0.5)
        log.info("agent %s: deposits rate-limited; pausing %.2fs", agent.agent_id, wait)
        await asyncio.sleep(min(wait, 5.0))


def behaviour(policy: FieldPolicy, stigmergy_addr: str):  # type: ignore[no-untyped-def]
    """The coroutine for ``Agent.add_behaviour``."""

    async def pheromones(agent) -> None:  # type: ignore[no-untyped-def]
        async with StigmergyClient(stigmergy_addr, timeout_s=3.0) as client:
            field = None
            while field is None and not agent.stopping.is_set():
                try:
                    field = await client.get_field()
                except ClientError as exc:
                    log.info("agent %s: stigmergy not reachable yet (%s)", agent.agent_id, exc)
                    await _pause(agent, 0.5)
            if field is None:
                return
            walker = FieldWalker(agent.agent_id, policy, field.width, field.height)
            agent.walker = walker
            log.info(
                "agent %s on the field: %s %s from (%.0f, %.0f)",
                agent.agent_id,
                policy.kind,
                policy.pheromone_type,
                walker.x,
                walker.y,
            )
            seen_success = agent.executed - agent.failed
            while not agent.stopping.is_set():
                try:
                    if policy.kind == "walk":
                        await _walk_step(client, agent, walker)
                    elif policy.kind == "follow":
                        await _follow_step(client, agent, walker)
                    else:
                        succeeded = agent.executed - agent.failed
                        found, seen_success = succeeded - seen_success, succeeded
                        await _forage_step(client, agent, walker, found)
                    walker.steps += 1
                except ClientError as exc:
                    log.info("agent %s: field step failed (%s)", agent.agent_id, exc)
                    await _pause(agent, 0.5)
                await _pause(agent, policy.step_s)

    return pheromones


async def _pause(agent, seconds: float) -> None:  # type: ignore[no-untyped-def]
    try:
        await asyncio.wait_for(agent.stopping.wait(), seconds)
    except TimeoutError:
        pass


def _direction(gradient) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    return (0.0, 0.0) if gradient.flat else (gradient.dx, gradient.dy)


async def _walk_step(client: StigmergyClient, agent, walker: FieldWalker) -> None:  # type: ignore[no-untyped-def]
    policy = walker.policy
    assert policy.target is not None
    tx, ty = policy.target
    radius = policy.radius or max(int(2 * policy.speed), 1)
    gx, gy = _direction(
        await client.gradient(walker.x, walker.y, policy.pheromone_type, radius=radius)
    )
    to_x, to_y = tx - walker.x, ty - walker.y
    distance = math.hypot(to_x, to_y)
    if distance <= policy.speed:
        walker.walks += 1
        walker.x, walker.y = walker.clamp(*walker.start)
        return
    ux, uy = to_x / distance, to_y / distance
    nx = walker.x + policy.speed * (ux + TRAIL_PULL * gx)
    ny = walker.y + policy.speed * (uy + TRAIL_PULL * gy)
    if not walker.inside(nx, ny):
        walker.walks += 1
        walker.x, walker.y = walker.clamp(*walker.start)
        return
    walker.x, walker.y = nx, ny
    await _deposit(client, agent, walker, policy.pheromone_type)


async def _follow_step(client: StigmergyClient, agent, walker: FieldWalker) -> None:  # type: ignore[no-untyped-def]
    policy = walker.policy
    gx, gy = _direction(
        await client.gradient(walker.x, walker.y, policy.pheromone_type, radius=policy.radius)
    )
    if gx == gy == 0.0:
        return  # nothing sensed: stay and wait for a signal
    walker.x, walker.y = walker.clamp(walker.x + policy.speed * gx, walker.y + policy.speed * gy)
    await _deposit(client, agent, walker, TRAIL_TYPE)


async def _forage_step(client: StigmergyClient, agent, walker: FieldWalker, found: int) -> None:  # type: ignore[no-untyped-def]
    policy = walker.policy
    if found > 0:
        await _deposit(client, agent, walker, policy.pheromone_type, float(found))
    gx, gy = _direction(
        await client.gradient(walker.x, walker.y, policy.pheromone_type, radius=policy.radius)
    )
    if gx == gy == 0.0:
        angle = walker.rng.uniform(0, 2 * math.pi)
        gx, gy = math.cos(angle), math.sin(angle)
    walker.x, walker.y = walker.clamp(walker.x + policy.speed * gx, walker.y + policy.speed * gy)
