"""Flocks: Reynolds boids on a toroidal world, vectorised with numpy. No grpc.

Each step, for every boid at once:

1. Neighbours: a ``scipy.spatial.cKDTree`` built with ``boxsize`` (so distances
   wrap around the torus) answers, for every boid, its ``max_neighbors``
   nearest boids within the largest rule radius. Interaction is topological,
   as measured in starling flocks (each bird follows its six or seven nearest
   neighbours): in a sparse flock that is every boid within reach, and in a
   dense one the cost per step stays O(n log n) instead of growing with the
   square of the local density. Nothing loops over boids in Python.
2. Three steering forces, each Reynolds' "desired minus velocity, capped at
   max_force", where desired is max_speed along:
   - separation: the mean of ``-offset / distance**2`` over neighbours closer
     than ``separation_distance`` (away from crowding, harder when closer);
   - alignment: the mean velocity of neighbours within ``alignment_distance``;
   - cohesion: the mean offset to neighbours within ``cohesion_distance`` (toward
     their centre, measured across the wrap).
3. acceleration = weighted sum; velocity += acceleration, capped at max_speed;
   position += velocity, wrapped onto [0, width) x [0, height).

The order parameter is ``|mean of unit velocities|``: about 1/sqrt(n) for random
headings, 1 when every boid flies the same way. It is how emergence is measured.
"""

from __future__ import annotations

import bisect
import math
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    optional_id,
    require_finite,
    require_id,
)

MAX_WORLD_SIDE = 1e7
MAX_NEIGHBORS_LIMIT = 64


@dataclass(frozen=True)
class FlockRules:
    """The guide's FlockingRules, plus the speed limits of its BoidAgent and the
    number of neighbours a boid perceives."""

    separation_distance: float = 25.0
    alignment_distance: float = 50.0
    cohesion_distance: float = 50.0
    separation_weight: float = 1.5
    alignment_weight: float = 1.0
    cohesion_weight: float = 1.0
    max_speed: float = 4.0
    max_force: float = 0.1
    max_neighbors: int = 7

    @property
    def reach(self) -> float:
        return max(self.separation_distance, self.alignment_distance, self.cohesion_distance)

    def validated(self, world: World, field: str = "rules") -> FlockRules:
        for name in ("separation_distance", "alignment_distance", "cohesion_distance"):
            require_finite(getattr(self, name), f"{field}.{name}", lo=0.0, lo_open=True)
        for name in ("separation_weight", "alignment_weight", "cohesion_weight"):
            require_finite(getattr(self, name), f"{field}.{name}", lo=0.0, hi=1e6)
        require_finite(self.max_speed, f"{field}.max_speed", lo=0.0, lo_open=True, hi=1e6)
        require_finite(self.max_force, f"{field}.max_force", lo=0.0, lo_open=True, hi=1e6)
        if not 1 <= self.max_neighbors <= MAX_NEIGHBORS_LIMIT:
            raise InvalidArgument(
                f"{field}.max_neighbors must be within 1..{MAX_NEIGHBORS_LIMIT}, got {self.max_neighbors}",
                field=f"{field}.max_neighbors",
                reason="OUT_OF_RANGE",
            )
        # On a torus a neighbourhood wider than half the world would meet itself.
        half = min(world.width, world.height) / 2
        if self.reach >= half:
            raise InvalidArgument(
                f"the largest rule distance ({self.reach}) must be less than half the "
                f"world's smaller side ({half})",
                field=f"{field}.{_widest(self)}",
                reason="NEIGHBOURHOOD_WIDER_THAN_WORLD",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FlockRules:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _widest(rules: FlockRules) -> str:
    return max(
        ("separation_distance", "alignment_distance", "cohesion_distance"),
        key=lambda name: getattr(rules, name),
    )


@dataclass(frozen=True)
class World:
    width: float = 1000.0
    height: float = 1000.0

    def validated(self, field: str = "world") -> World:
        require_finite(self.width, f"{field}.width", lo=0.0, lo_open=True, hi=MAX_WORLD_SIDE)
        require_finite(self.height, f"{field}.height", lo=0.0, lo_open=True, hi=MAX_WORLD_SIDE)
        return self


def order_parameter(velocities: np.ndarray) -> float:
    """|mean of unit velocities| in [0, 1]; a boid at rest counts as zero."""
    n = len(velocities)
    if n == 0:
        return 0.0
    speed = np.hypot(velocities[:, 0], velocities[:, 1])
    moving = speed > 0
    units = velocities[moving] / speed[moving, None]
    total = units.sum(axis=0)
    return float(min(math.hypot(float(total[0]), float(total[1])) / n, 1.0))


def _limit(vectors: np.ndarray, cap: float) -> None:
    """Caps the length of each row at ``cap``, in place."""
    length = np.hypot(vectors[:, 0], vectors[:, 1])
    over = length > cap
    if over.any():
        vectors[over] *= (cap / length[over])[:, None]


class Flock:
    """Positions and velocities of n boids (float64, shape (n, 2))."""

    def __init__(
        self,
        rules: FlockRules,
        world: World,
        positions: np.ndarray,
        velocities: np.ndarray,
        *,
        steps: int = 0,
    ) -> None:
        self.rules = rules
        self.world = world
        self.positions = np.ascontiguousarray(positions, dtype=np.float64)
        self.velocities = np.ascontiguousarray(velocities, dtype=np.float64)
        self.steps = steps
        self._box = np.array([world.width, world.height], dtype=np.float64)

    @classmethod
    def random(cls, n: int, rules: FlockRules, world: World, seed: int) -> Flock:
        """The guide's start: uniform positions over the world and each velocity
        component uniform in [-2, 2)."""
        rng = np.random.default_rng(seed)
        positions = rng.random((n, 2)) * np.array([world.width, world.height])
        velocities = (rng.random((n, 2)) - 0.5) * 4.0
        _limit(velocities, rules.max_speed)
        return cls(rules, world, positions, velocities)

    @property
    def size(self) -> int:
        return len(self.positions)

    def order(self) -> float:
        return order_parameter(self.velocities)

    def neighbours(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For every boid, up to max_neighbors nearest others within reach, as
        (n, k) arrays: neighbour index (clamped; check ``distance``), x and y
        offsets to it across the wrap, and distance (inf where there is none)."""
        n = self.size
        k = min(self.rules.max_neighbors + 1, n)
        tree = cKDTree(self.positions, boxsize=self._box)
        distance, index = tree.query(self.positions, k=k, distance_upper_bound=self.rules.reach)
        if k == 1:
            distance, index = distance[:, None], index[:, None]
        # Drop each boid itself (not necessarily column 0 when two boids coincide).
        distance[index == np.arange(n)[:, None]] = np.inf
        index = np.minimum(index, n - 1)
        px = self.positions[:, 0]
        py = self.positions[:, 1]
        ox = px[index] - px[:, None]
        oy = py[index] - py[:, None]
        width, height = self.world.width, self.world.height
        ox -= width * np.rint(ox / width)
        oy -= height * np.rint(oy / height)
        return index, ox, oy, distance

    def _steer(self, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
        """Reynolds steering toward the direction (sx, sy), per boid; zero
        where that direction is zero (no neighbours)."""
        rules = self.rules
        steer = np.zeros_like(self.velocities)
        length = np.hypot(sx, sy)
        active = length > 0
        if active.any():
            scale = rules.max_speed / length[active]
            steer[active, 0] = sx[active] * scale - self.velocities[active, 0]
            steer[active, 1] = sy[active] * scale - self.velocities[active, 1]
            _limit(steer, rules.max_force)
        return steer

    def step(self, count: int = 1) -> list[float]:
        """Advances ``count`` steps; returns the order parameter after each."""
        orders = []
        for _ in range(count):
            self._step_once()
            orders.append(self.order())
        return orders

    def _step_once(self) -> None:
        rules = self.rules
        if self.size > 1:
            index, ox, oy, distance = self.neighbours()
            # Each rule is a weighted sum over the neighbour columns; a weight
            # of zero drops a neighbour outside the rule's distance. Means are
            # not needed: only the direction of the sum matters.
            with np.errstate(divide="ignore"):
                push = np.where(
                    (distance < rules.separation_distance) & (distance > 0),
                    1.0 / np.square(distance),
                    0.0,
                )
            separation = self._steer(-(push * ox).sum(axis=1), -(push * oy).sum(axis=1))
            aligned = (distance < rules.alignment_distance).astype(np.float64)
            alignment = self._steer(
                (aligned * self.velocities[index, 0]).sum(axis=1),
                (aligned * self.velocities[index, 1]).sum(axis=1),
            )
            cohesive = (distance < rules.cohesion_distance).astype(np.float64)
            cohesion = self._steer((cohesive * ox).sum(axis=1), (cohesive * oy).sum(axis=1))
            acceleration = (
                rules.separation_weight * separation
                + rules.alignment_weight * alignment
                + rules.cohesion_weight * cohesion
            )
            self.velocities += acceleration
            _limit(self.velocities, rules.max_speed)
        self.positions += self.velocities
        np.mod(self.positions, self._box, out=self.positions)
        # mod of a tiny negative number can round up to exactly the box size.
        self.positions[self.positions >= self._box] = 0.0
        self.steps += 1

    # --- persistence -----------------------------------------------------------

    def state_bytes(self) -> bytes:
        """Positions then velocities as little-endian float64."""
        return np.concatenate([self.positions, self.velocities]).astype("<f8", copy=False).tobytes()

    @classmethod
    def from_state(cls, rules: FlockRules, world: World, n: int, data: bytes, steps: int) -> Flock:
        values = np.frombuffer(data, dtype="<f8")
        if values.size != 4 * n:
            raise ValueError(f"flock state holds {values.size} numbers, expected {4 * n}")
        values = values.reshape(2 * n, 2).astype(np.float64)
        return cls(rules, world, values[:n].copy(), values[n:].copy(), steps=steps)


# --- the flocks a service holds ------------------------------------------------------


@dataclass(frozen=True)
class FlockSettings:
    # Boids in one flock; a larger CreateFlock is refused (INVALID_ARGUMENT).
    max_boids: int = 20_000
    # Boids across every flock (RESOURCE_EXHAUSTED beyond).
    max_total_boids: int = 200_000
    max_flocks: int = 64
    # Boid-steps (boids x steps) one StepFlock may ask for, so one call cannot
    # hold a core for minutes.
    max_step_work: int = 5_000_000
    max_steps_per_call: int = 10_000


@dataclass
class FlockRecord:
    flock_id: str
    seed: int
    create_wall: float
    flock: Flock
    request_id: str = ""
    # The last StepFlock's request_id and what it returned, so a retried call
    # does not step twice.
    last_step_request: str = ""
    last_step_orders: list[float] | None = None


class Flocks:
    def __init__(self, settings: FlockSettings | None = None) -> None:
        self.settings = settings or FlockSettings()
        self.flocks: dict[str, FlockRecord] = {}
        self._by_request: dict[str, str] = {}

    @property
    def total_boids(self) -> int:
        return sum(r.flock.size for r in self.flocks.values())

    def validate(
        self, boids: int, rules: FlockRules, world: World, seed: int
    ) -> tuple[FlockRules, World]:
        if boids < 1:
            raise InvalidArgument(
                f"boids must be at least 1, got {boids}", field="boids", reason="OUT_OF_RANGE"
            )
        if boids > self.settings.max_boids:
            raise InvalidArgument(
                f"boids is {boids}; this service runs at most {self.settings.max_boids} per flock",
                field="boids",
                reason="TOO_MANY_BOIDS",
                metadata={"max_boids": str(self.settings.max_boids)},
            )
        if not 0 <= seed < 2**63:
            raise InvalidArgument(
                f"seed must be within 0..2**63-1, got {seed}", field="seed", reason="OUT_OF_RANGE"
            )
        world = world.validated()
        return rules.validated(world), world

    def create(
        self,
        boids: int,
        rules: FlockRules,
        world: World,
        seed: int,
        *,
        request_id: str = "",
        now_wall: float,
    ) -> tuple[FlockRecord, bool]:
        optional_id(request_id, "request_id")
        rules, world = self.validate(boids, rules, world, seed)
        if request_id and request_id in self._by_request:
            existing = self.flocks.get(self._by_request[request_id])
            if existing is not None:
                return existing, False
        if len(self.flocks) >= self.settings.max_flocks:
            raise ResourceExhausted(
                f"{len(self.flocks)} flocks exist; at most {self.settings.max_flocks} allowed",
                reason="TOO_MANY_FLOCKS",
            )
        if self.total_boids + boids > self.settings.max_total_boids:
            raise ResourceExhausted(
                f"{self.total_boids} boids are flying; {boids} more would pass the service's "
                f"limit of {self.settings.max_total_boids}",
                reason="TOO_MANY_BOIDS_IN_SERVICE",
            )
        flock_id = f"flock-{secrets.token_hex(6)}"
        record = FlockRecord(
            flock_id=flock_id,
            seed=seed,
            create_wall=now_wall,
            flock=Flock.random(boids, rules, world, seed),
            request_id=request_id,
        )
        self.add(record)
        return record, True

    def add(self, record: FlockRecord) -> None:
        self.flocks[record.flock_id] = record
        if record.request_id:
            self._by_request[record.request_id] = record.flock_id

    def get(self, flock_id: str) -> FlockRecord:
        require_id(flock_id, "flock_id")
        record = self.flocks.get(flock_id)
        if record is None:
            raise NotFound(f"no flock {flock_id!r}", field="flock_id", reason="FLOCK_NOT_FOUND")
        return record

    def check_step(self, flock_id: str, steps: int) -> FlockRecord:
        record = self.get(flock_id)
        if steps < 1:
            raise InvalidArgument(
                f"steps must be at least 1, got {steps}", field="steps", reason="OUT_OF_RANGE"
            )
        if steps > self.settings.max_steps_per_call:
            raise InvalidArgument(
                f"steps must be at most {self.settings.max_steps_per_call} per call, got {steps}",
                field="steps",
                reason="TOO_MANY_STEPS",
                metadata={"max_steps": str(self.settings.max_steps_per_call)},
            )
        work = steps * record.flock.size
        if work > self.settings.max_step_work:
            most = max(self.settings.max_step_work // record.flock.size, 1)
            raise InvalidArgument(
                f"{steps} steps of {record.flock.size} boids is too much for one call; "
                f"at most {most} steps for this flock",
                field="steps",
                reason="TOO_MANY_STEPS",
                metadata={"max_steps": str(most)},
            )
        return record

    def delete(self, flock_id: str) -> FlockRecord:
        record = self.get(flock_id)
        del self.flocks[flock_id]
        if record.request_id:
            self._by_request.pop(record.request_id, None)
        return record

    def list(self, *, page_size: int, page_token: str = "") -> tuple[list[FlockRecord], str, int]:
        after = decode_page_token(page_token).get("after", "")
        ordered = sorted(self.flocks)
        start = 0
        if isinstance(after, str) and after:
            start = bisect.bisect_right(ordered, after)
        chunk = ordered[start : start + page_size]
        token = encode_page_token({"after": chunk[-1]}) if start + page_size < len(ordered) else ""
        return [self.flocks[i] for i in chunk], token, len(ordered)
