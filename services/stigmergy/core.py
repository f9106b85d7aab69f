"""Pheromone fields: typed layers on a bounded grid, deposits, sensing, and the
decay-and-diffusion tick. No grpc here.

The grid
- ``width`` x ``height`` cells, one numpy float32 layer per pheromone type,
  indexed ``layer[y, x]``. A point (x, y) with 0 <= x < width and
  0 <= y < height lies in cell (floor(x), floor(y)); anything else is outside
  the grid and refused, as are NaN and infinite numbers.
- Types: when the service declares its types, only those exist; otherwise a
  layer is created by the first deposit of a well-formed type name, up to
  ``max_types`` layers. Reading a type nothing was deposited in yet gives 0.
- A cell's intensity never exceeds ``max_intensity`` (a deposit is capped).

The tick (decay, then diffusion, in one pass)
    g <- (1 - decay_rate) * ((1 - d) * g + d * mean4(g))
where mean4 is the mean of the four edge neighbours. Boundary rule: zero flux
(reflecting). A neighbour outside the grid counts as the edge cell itself, so
what an edge cell would send outside stays in it; diffusion therefore conserves
the total exactly (up to float32 rounding) and only decay removes mass. Every
``flush_every`` ticks, values below ``min_intensity`` are set to zero, so an
isolated deposit decays to exactly nothing (and no denormal floats slow the
arithmetic down), and an empty layer stops being ticked until a deposit.

The tick is whole-array numpy arithmetic (never a Python loop over cells) and
runs out of place: ``begin_tick`` hands a ``TickJob`` the current arrays, the
job computes the next ones into spare buffers (in a worker thread; numpy lets
go of the GIL), and ``finish_tick`` swaps them in. Deposits that arrive while a
job runs are kept aside and added to the new arrays on the swap, and every read
meanwhile sees the current arrays plus those deposits: nothing is lost, and no
reader ever sees a half-computed layer.

Sensing
- Gradient(x, y, radius): the least-squares slope of the field around the cell,
  from the first moment of the cells within ``radius``:
      v = sum over offsets d with 0 < |d| <= radius of g(cell + d) * d
  For radius 1 that is exactly the central differences (g[x+1] - g[x-1],
  g[y+1] - g[y-1]); for a larger radius it is the gradient of the field
  smoothed with an Epanechnikov kernel, which points straight at a lone deposit
  anywhere within reach. Cells outside the grid mirror the nearest edge cell
  (the same zero-flux rule), so a uniform field is flat everywhere. The result
  is the unit vector along v, or (0, 0) when the field is flat there.
- FindNearest: the closest cell within a radius whose intensity is above a floor.
- Sense: a window of the grid, pooled down to at most a given number of cells.

Deposits are attributed to a registered agent and signed by it (the servicer
checks the signature); here they are rate-limited per agent with a token bucket
and deduplicated, so a retried or replayed deposit counts once.
"""

from __future__ import annotations

import enum
import functools
import io
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.validation import require_finite

TYPE_RE = re.compile(r"[a-z][a-z0-9_\-]*")
MAX_TYPE_LEN = 64
MAX_GRID_SIDE = 20_000


class Aggregation(enum.IntEnum):
    """Values match agent2028.stigmergy.v1.Aggregation."""

    MEAN = 1
    MAX = 2
    SUM = 3


@dataclass(frozen=True)
class FieldSettings:
    width: int = 1000
    height: int = 1000
    # Declared pheromone types; empty means any well-formed name, up to max_types.
    types: tuple[str, ...] = ()
    max_types: int = 16
    decay_rate: float = 0.1
    diffusion_rate: float = 0.05
    max_intensity: float = 1000.0
    min_intensity: float = 1e-4
    flush_every: int = 8
    default_amount: float = 1.0
    deposit_rate: float = 50.0
    deposit_burst: float = 100.0
    clock_skew_s: float = 300.0
    default_sense_radius: int = 150
    max_sense_radius: int = 500
    max_sense_cells: int = 65_536
    dedupe_capacity: int = 200_000


def require_type_name(value: str, field: str = "pheromone_type") -> str:
    if not value:
        raise InvalidArgument(f"{field} must not be empty", field=field, reason="EMPTY_FIELD")
    if len(value) > MAX_TYPE_LEN:
        raise InvalidArgument(
            f"{field} is {len(value)} characters; at most {MAX_TYPE_LEN} allowed",
            field=field,
            reason="FIELD_TOO_LONG",
        )
    if not TYPE_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} must be a lowercase word of [a-z0-9_-] such as 'food'",
            field=field,
            reason="MALFORMED_PHEROMONE_TYPE",
        )
    return value


# --- per-agent limits --------------------------------------------------------------------


class TokenBucket:
    """Per-key token buckets: ``rate`` tokens a second, at most ``burst`` saved."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, cost: float = 1.0) -> float:
        """Takes ``cost`` tokens and returns 0, or returns the seconds until
        they would be there (taking nothing)."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate if self.rate > 0 else math.inf
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        full = [
            k
            for k, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


class ReplayGuard:
    """Remembers keys of accepted statements for ``ttl_s`` (at most
    ``capacity`` of them, oldest forgotten first)."""

    def __init__(
        self, ttl_s: float, capacity: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._seen:
            key, expiry = next(iter(self._seen.items()))
            if expiry > now and len(self._seen) <= self.capacity:
                break
            del self._seen[key]

    def seen(self, key: bytes) -> bool:
        now = self._clock()
        self._expire(now)
        return key in self._seen

    def remember(self, key: bytes) -> None:
        now = self._clock()
        self._seen[key] = now + self.ttl_s
        self._seen.move_to_end(key)
        self._expire(now)


# --- the tick ----------------------------------------------------------------------------


def diffuse_and_decay(
    src: np.ndarray, dst: np.ndarray, scratch: np.ndarray, decay_rate: float, diffusion: float
) -> None:
    """dst = (1 - decay) * ((1 - d) * src + d * mean4(src)), zero-flux boundary.

    Whole-array operations only; ``scratch`` (same shape) receives the sum of
    the four neighbours, where a neighbour outside the grid is the cell itself.
    """
    keep = (1.0 - decay_rate) * (1.0 - diffusion)
    share = (1.0 - decay_rate) * diffusion / 4.0
    s = scratch
    # Neighbour above (y - 1); the top row's missing one is itself.
    s[1:, :] = src[:-1, :]
    s[0, :] = src[0, :]
    # Below (y + 1).
    s[:-1, :] += src[1:, :]
    s[-1, :] += src[-1, :]
    # Left (x - 1).
    s[:, 1:] += src[:, :-1]
    s[:, 0] += src[:, 0]
    # Right (x + 1).
    s[:, :-1] += src[:, 1:]
    s[:, -1] += src[:, -1]
    np.multiply(src, np.float32(keep), out=dst)
    np.multiply(s, np.float32(share), out=s)
    np.add(dst, s, out=dst)


class TickJob:
    """One tick's computation: reads the current layers, writes spare buffers.
    ``run`` touches nothing the event loop uses, so it may run in a thread."""

    def __init__(self, field: PheromoneField, names: list[str], flush: bool) -> None:
        self.field = field
        self.names = names
        self.flush = flush
        self.sources = [field.layers[name] for name in names]
        self.targets = [field._spare(name) for name in names]
        self.active: list[bool] = [True] * len(names)
        self.seconds = 0.0

    def run(self) -> None:
        start = time.perf_counter()
        settings = self.field.settings
        scratch = self.field._scratch()
        for i, (src, dst) in enumerate(zip(self.sources, self.targets, strict=True)):
            diffuse_and_decay(src, dst, scratch, settings.decay_rate, settings.diffusion_rate)
            if self.flush:
                if settings.min_intensity > 0:
                    np.putmask(dst, dst < np.float32(settings.min_intensity), np.float32(0.0))
                self.active[i] = bool(dst.any())
        self.seconds = time.perf_counter() - start


# --- the field ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DepositResult:
    intensity: float
    duplicate: bool
    capped: bool


@dataclass(frozen=True)
class GradientResult:
    dx: float
    dy: float
    # Least-squares slope of the field around the cell (intensity per cell).
    magnitude: float
    flat: bool


@dataclass(frozen=True)
class NearestResult:
    found: bool
    x: int = 0
    y: int = 0
    intensity: float = 0.0
    distance: float = 0.0


@dataclass(frozen=True)
class SenseResult:
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    columns: int
    rows: int
    # rows x columns, row-major (row 0 is y_min).
    values: np.ndarray
    maximum: float
    total: float


@dataclass(frozen=True)
class LayerInfo:
    name: str
    total: float
    maximum: float
    active: bool


@functools.lru_cache(maxsize=64)
def _moment_kernel(radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Offsets within the disc 0 < |d| <= radius as (2r+1)^2 weight arrays: the
    x and y components, |x| + |y| (for the flatness scale), and the sum of
    squares along one axis."""
    span = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(span, span, indexing="ij")
    inside = (dx * dx + dy * dy) <= radius * radius
    kx = np.where(inside, dx, 0.0)
    ky = np.where(inside, dy, 0.0)
    spread = np.abs(kx) + np.abs(ky)
    for array in (kx, ky, spread):
        array.setflags(write=False)
    return kx, ky, spread, float((kx * kx).sum())


class PheromoneField:
    """The layers and everything that reads or writes them. Not thread-safe
    except for ``TickJob.run``; one event loop drives the rest."""

    def __init__(
        self,
        settings: FieldSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or FieldSettings()
        s = self.settings
        if not (1 <= s.width <= MAX_GRID_SIDE and 1 <= s.height <= MAX_GRID_SIDE):
            raise ValueError(f"grid must be within 1..{MAX_GRID_SIDE} cells a side")
        for name in s.types:
            require_type_name(name, "types")
        if not 1 <= s.default_sense_radius <= s.max_sense_radius:
            raise ValueError("default_sense_radius must be within 1..max_sense_radius")
        self._clock = clock
        self._wall = wall_clock
        self.layers: dict[str, np.ndarray] = {}
        self.active: dict[str, bool] = {}
        self._spares: dict[str, np.ndarray] = {}
        self._scratch_buffer: np.ndarray | None = None
        self._scratch_lock = threading.Lock()
        # Deposits made while a tick job runs: layer -> {(iy, ix): amount}.
        self.pending: dict[str, dict[tuple[int, int], float]] = {}
        self.job: TickJob | None = None
        self.ticks = 0
        # Bumped by every change; lets watchers skip frames when nothing changed.
        self.version = 0
        self.last_tick_seconds = 0.0
        self.buckets = TokenBucket(s.deposit_rate, s.deposit_burst, clock=clock)
        self.replays = ReplayGuard(2 * s.clock_skew_s, s.dedupe_capacity, clock=clock)
        self.deposits = 0
        for name in s.types:
            self._create_layer(name)

    # --- layers -------------------------------------------------------------------

    @property
    def declared(self) -> bool:
        return bool(self.settings.types)

    def _create_layer(self, name: str) -> np.ndarray:
        layer = np.zeros((self.settings.height, self.settings.width), dtype=np.float32)
        self.layers[name] = layer
        self.active[name] = False
        return layer

    def _spare(self, name: str) -> np.ndarray:
        spare = self._spares.get(name)
        if spare is None:
            spare = self._spares[name] = np.empty_like(self.layers[name])
        return spare

    def _scratch(self) -> np.ndarray:
        with self._scratch_lock:
            if self._scratch_buffer is None:
                self._scratch_buffer = np.empty(
                    (self.settings.height, self.settings.width), dtype=np.float32
                )
            return self._scratch_buffer

    def check_type(self, name: str, field: str = "pheromone_type") -> str:
        require_type_name(name, field)
        if self.declared and name not in self.layers:
            raise InvalidArgument(
                f"{field} {name!r} is not one of this field's types: "
                + ", ".join(self.settings.types),
                field=field,
                reason="UNKNOWN_PHEROMONE_TYPE",
            )
        return name

    def _layer_for_deposit(self, name: str) -> np.ndarray:
        layer = self.layers.get(name)
        if layer is not None:
            return layer
        if len(self.layers) >= self.settings.max_types:
            raise ResourceExhausted(
                f"the field holds {len(self.layers)} pheromone types, its maximum",
                field="pheromone_type",
                reason="TOO_MANY_PHEROMONE_TYPES",
            )
        return self._create_layer(name)

    # --- coordinates ----------------------------------------------------------------

    def cell(self, x: float, y: float) -> tuple[int, int]:
        """(iy, ix) of a point; INVALID_ARGUMENT naming x or y outside the grid."""
        require_finite(x, "x")
        require_finite(y, "y")
        if not 0 <= x < self.settings.width:
            raise InvalidArgument(
                f"x must be within [0, {self.settings.width}), got {x}",
                field="x",
                reason="OUTSIDE_GRID",
            )
        if not 0 <= y < self.settings.height:
            raise InvalidArgument(
                f"y must be within [0, {self.settings.height}), got {y}",
                field="y",
                reason="OUTSIDE_GRID",
            )
        return int(y), int(x)

    def _radius(self, radius: int, field: str = "radius") -> int:
        if radius < 0:
            raise InvalidArgument(
                f"{field} must not be negative, got {radius}", field=field, reason="OUT_OF_RANGE"
            )
        if radius == 0:
            radius = self.settings.default_sense_radius
        if radius > self.settings.max_sense_radius:
            raise InvalidArgument(
                f"{field} must be at most {self.settings.max_sense_radius}, got {radius}",
                field=field,
                reason="OUT_OF_RANGE",
            )
        return radius

    # --- deposits ----------------------------------------------------------------------

    def check_deposit(
        self, x: float, y: float, pheromone_type: str, amount: float
    ) -> tuple[int, int, float]:
        """Validates a deposit (before its signature is checked): (iy, ix, amount)."""
        iy, ix = self.cell(x, y)
        self.check_type(pheromone_type)
        require_finite(amount, "amount")
        if amount < 0:
            raise InvalidArgument(
                f"amount must not be negative, got {amount}", field="amount", reason="OUT_OF_RANGE"
            )
        if amount == 0:
            amount = self.settings.default_amount
        if amount > self.settings.max_intensity:
            raise InvalidArgument(
                f"amount must be at most {self.settings.max_intensity}, got {amount}",
                field="amount",
                reason="OUT_OF_RANGE",
            )
        return iy, ix, float(amount)

    def check_issue_time(self, issue_ns: int) -> None:
        drift = abs(issue_ns / 1e9 - self._wall())
        if drift > self.settings.clock_skew_s:
            raise InvalidArgument(
                f"issue_time is {drift:.0f}s away from the service's clock; at most "
                f"{self.settings.clock_skew_s:.0f}s allowed",
                field="issue_time",
                reason="CLOCK_SKEW",
            )

    def deposit(
        self,
        agent_id: str,
        x: float,
        y: float,
        pheromone_type: str,
        amount: float,
        *,
        issue_ns: int,
        replay_key: bytes,
    ) -> DepositResult:
        """Adds a deposit whose signature the caller has verified."""
        iy, ix, amount = self.check_deposit(x, y, pheromone_type, amount)
        self.check_issue_time(issue_ns)
        key = agent_id.encode() + b"\x00" + replay_key
        if self.replays.seen(key):
            return DepositResult(self._value(pheromone_type, iy, ix), True, False)
        wait = self.buckets.take(agent_id)
        if wait:
            raise ResourceExhausted(
                f"agent {agent_id} deposits faster than {self.settings.deposit_rate:g}/s "
                f"(burst {self.settings.deposit_burst:g}); retry in {wait:.2f}s",
                field="agent_id",
                reason="DEPOSIT_RATE_LIMITED",
                metadata={"retry_after_s": f"{wait:.3f}"},
            )
        layer = self._layer_for_deposit(pheromone_type)
        current = self._value(pheromone_type, iy, ix)
        target = min(current + amount, self.settings.max_intensity)
        capped = current + amount > self.settings.max_intensity
        if self.job is not None and pheromone_type in self.job.names:
            pending = self.pending.setdefault(pheromone_type, {})
            pending[(iy, ix)] = pending.get((iy, ix), 0.0) + (target - current)
        else:
            layer[iy, ix] = target
        self.active[pheromone_type] = True
        self.replays.remember(key)
        self.deposits += 1
        self.version += 1
        return DepositResult(float(np.float32(target)), False, capped)

    # --- reads -----------------------------------------------------------------------

    def _value(self, name: str, iy: int, ix: int) -> float:
        layer = self.layers.get(name)
        if layer is None:
            return 0.0
        value = float(layer[iy, ix])
        pending = self.pending.get(name)
        if pending:
            value += pending.get((iy, ix), 0.0)
        return value

    def read(self, x: float, y: float, pheromone_type: str) -> float:
        iy, ix = self.cell(x, y)
        self.check_type(pheromone_type)
        return float(np.float32(self._value(pheromone_type, iy, ix)))

    def _window(self, name: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """A float64 copy of layer[y0:y1, x0:x1] (within the grid), pending deposits included."""
        layer = self.layers.get(name)
        if layer is None:
            return np.zeros((y1 - y0, x1 - x0), dtype=np.float64)
        window = layer[y0:y1, x0:x1].astype(np.float64)
        pending = self.pending.get(name)
        if pending:
            for (iy, ix), amount in pending.items():
                if y0 <= iy < y1 and x0 <= ix < x1:
                    window[iy - y0, ix - x0] += amount
        return window

    def gradient(self, x: float, y: float, pheromone_type: str, radius: int = 0) -> GradientResult:
        iy, ix = self.cell(x, y)
        self.check_type(pheromone_type)
        r = self._radius(radius)
        height, width = self.settings.height, self.settings.width
        y0, y1 = iy - r, iy + r + 1
        x0, x1 = ix - r, ix + r + 1
        window = self._window(
            pheromone_type, max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
        )
        pad = ((max(-y0, 0), max(y1 - height, 0)), (max(-x0, 0), max(x1 - width, 0)))
        if any(any(p) for p in pad):
            # Beyond the edge the field mirrors the edge cell (zero-flux rule).
            window = np.pad(window, pad, mode="edge")
        kx, ky, spread, norm = _moment_kernel(r)
        vx = float(np.vdot(window, kx))
        vy = float(np.vdot(window, ky))
        length = math.hypot(vx, vy)
        # Intensities are never negative, so |window| is the window itself.
        scale = float(np.vdot(window, spread))
        # Flat: no moment beyond float32 rounding of what the window holds.
        if scale == 0.0 or length <= 1e-6 * scale:
            return GradientResult(0.0, 0.0, 0.0, True)
        return GradientResult(vx / length, vy / length, length / norm, False)

    def find_nearest(
        self,
        x: float,
        y: float,
        pheromone_type: str,
        radius: int = 0,
        min_intensity: float = 0.0,
    ) -> NearestResult:
        """The closest cell (by distance from (x, y) to the cell's centre) within
        ``radius`` whose intensity is above ``min_intensity``; equally close
        cells go to the stronger one."""
        iy, ix = self.cell(x, y)
        self.check_type(pheromone_type)
        r = self._radius(radius)
        require_finite(min_intensity, "min_intensity", lo=0.0)
        height, width = self.settings.height, self.settings.width
        y0, y1 = max(iy - r, 0), min(iy + r + 1, height)
        x0, x1 = max(ix - r, 0), min(ix + r + 1, width)
        window = self._window(pheromone_type, y0, y1, x0, x1)
        cy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - y
        cx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - x
        dist2 = cy * cy + cx * cx
        candidates = (window > min_intensity) & (dist2 <= r * r)
        if not candidates.any():
            return NearestResult(False)
        rows, cols = np.nonzero(candidates)
        d2 = dist2[rows, cols]
        values = window[rows, cols]
        best = np.lexsort((-values, d2))[0]
        return NearestResult(
            True,
            x=int(cols[best] + x0),
            y=int(rows[best] + y0),
            intensity=float(np.float32(values[best])),
            distance=float(math.sqrt(d2[best])),
        )

    def sense(
        self,
        pheromone_type: str,
        *,
        x_min: int = 0,
        y_min: int = 0,
        x_max: int = 0,
        y_max: int = 0,
        columns: int = 0,
        rows: int = 0,
        aggregation: Aggregation = Aggregation.MEAN,
    ) -> SenseResult:
        """The window [x_min, x_max) x [y_min, y_max) (all zero: the whole
        grid), pooled to ``columns`` x ``rows`` cells (0: full resolution,
        within ``max_sense_cells``)."""
        self.check_type(pheromone_type)
        width, height = self.settings.width, self.settings.height
        if (x_min, y_min, x_max, y_max) == (0, 0, 0, 0):
            x_max, y_max = width, height
        for name, value, hi in (
            ("x_min", x_min, width - 1),
            ("y_min", y_min, height - 1),
            ("x_max", x_max, width),
            ("y_max", y_max, height),
        ):
            if not 0 <= value <= hi:
                raise InvalidArgument(
                    f"{name} must be within 0..{hi}, got {value}",
                    field=name,
                    reason="OUTSIDE_GRID",
                )
        if x_max <= x_min:
            raise InvalidArgument(
                f"x_max ({x_max}) must be greater than x_min ({x_min})",
                field="x_max",
                reason="EMPTY_REGION",
            )
        if y_max <= y_min:
            raise InvalidArgument(
                f"y_max ({y_max}) must be greater than y_min ({y_min})",
                field="y_max",
                reason="EMPTY_REGION",
            )
        for name, value in (("columns", columns), ("rows", rows)):
            if value < 0:
                raise InvalidArgument(
                    f"{name} must not be negative, got {value}", field=name, reason="OUT_OF_RANGE"
                )
        span_x, span_y = x_max - x_min, y_max - y_min
        columns = min(columns or span_x, span_x)
        rows = min(rows or span_y, span_y)
        if columns * rows > self.settings.max_sense_cells:
            field = "columns" if columns >= rows else "rows"
            raise InvalidArgument(
                f"{columns} x {rows} cells is more than the {self.settings.max_sense_cells} "
                "one answer may hold; ask for fewer columns and rows",
                field=field,
                reason="TOO_MANY_CELLS",
            )
        window = self._window(pheromone_type, y_min, y_max, x_min, x_max)
        # Block boundaries: strictly increasing because columns <= span.
        col_edges = np.linspace(0, span_x, columns + 1).astype(np.int64)
        row_edges = np.linspace(0, span_y, rows + 1).astype(np.int64)
        if aggregation is Aggregation.MAX:
            pooled = np.maximum.reduceat(
                np.maximum.reduceat(window, row_edges[:-1], axis=0), col_edges[:-1], axis=1
            )
        else:
            pooled = np.add.reduceat(
                np.add.reduceat(window, row_edges[:-1], axis=0), col_edges[:-1], axis=1
            )
            if aggregation is Aggregation.MEAN:
                area = np.outer(np.diff(row_edges), np.diff(col_edges))
                pooled = pooled / area
        return SenseResult(
            x_min=x_min,
            y_min=y_min,
            x_max=x_max,
            y_max=y_max,
            columns=columns,
            rows=rows,
            values=pooled.astype(np.float32),
            maximum=float(window.max()) if window.size else 0.0,
            total=float(window.sum()),
        )

    def info(self) -> list[LayerInfo]:
        out = []
        for name in sorted(self.layers):
            window = self.layers[name]
            total = float(window.sum(dtype=np.float64))
            maximum = float(window.max())
            for amount in self.pending.get(name, {}).values():
                total += amount
            out.append(LayerInfo(name, total, maximum, self.active.get(name, False)))
        return out

    def names(self) -> list[str]:
        return sorted(self.layers)

    # --- ticking ----------------------------------------------------------------------

    def begin_tick(self) -> TickJob | None:
        """Starts a tick of every active layer (None when none is active)."""
        if self.job is not None:
            raise RuntimeError("a tick is already running")
        names = [name for name in self.layers if self.active.get(name)]
        if not names:
            self.ticks += 1
            return None
        flush = (self.ticks + 1) % max(self.settings.flush_every, 1) == 0
        self.job = TickJob(self, names, flush)
        return self.job

    def finish_tick(self, job: TickJob) -> None:
        """Swaps the computed layers in and adds the deposits that came meanwhile."""
        for i, name in enumerate(job.names):
            old, new = self.layers[name], job.targets[i]
            self.layers[name] = new
            self._spares[name] = old
            pending = self.pending.pop(name, None)
            if pending:
                cap = np.float32(self.settings.max_intensity)
                for (iy, ix), amount in pending.items():
                    new[iy, ix] = min(new[iy, ix] + np.float32(amount), cap)
                self.active[name] = True
            elif job.flush:
                self.active[name] = job.active[i]
        self.pending.clear()
        self.job = None
        self.ticks += 1
        self.version += 1
        self.last_tick_seconds = job.seconds

    def tick(self, count: int = 1) -> None:
        """Runs ``count`` ticks here and now (tests, tools, the benchmark)."""
        for _ in range(count):
            job = self.begin_tick()
            if job is not None:
                job.run()
                self.finish_tick(job)

    # --- snapshots ---------------------------------------------------------------------

    def export(self) -> dict[str, np.ndarray]:
        """Copies of the layers (with pending deposits) for a snapshot."""
        out = {}
        for name, layer in self.layers.items():
            copy = layer.copy()
            for (iy, ix), amount in self.pending.get(name, {}).items():
                copy[iy, ix] += np.float32(amount)
            out[name] = copy
        return out

    def snapshot_meta(self) -> dict[str, object]:
        return {
            "width": self.settings.width,
            "height": self.settings.height,
            "ticks": self.ticks,
            "wall": self._wall(),
        }

    def restore(
        self, layers: dict[str, np.ndarray], meta: dict[str, object], *, decay_ticks: int = 0
    ) -> list[str]:
        """Loads a snapshot's layers (decayed by ``decay_ticks`` missed ticks);
        returns the names of layers skipped because they do not fit."""
        skipped = []
        factor = np.float32((1.0 - self.settings.decay_rate) ** max(decay_ticks, 0))
        for name, values in layers.items():
            fits = (
                values.shape == (self.settings.height, self.settings.width)
                and TYPE_RE.fullmatch(name) is not None
                and (not self.declared or name in self.layers)
                and (name in self.layers or len(self.layers) < self.settings.max_types)
            )
            if not fits:
                skipped.append(name)
                continue
            layer = self.layers.get(name)
            if layer is None:
                layer = self._create_layer(name)
            # A snapshot is a file on disk: whatever it holds, the layer stays
            # within [0, max_intensity] and finite.
            clean = np.nan_to_num(
                values.astype(np.float32), nan=0.0, posinf=self.settings.max_intensity, neginf=0.0
            )
            np.clip(clean, 0.0, self.settings.max_intensity, out=clean)
            np.multiply(clean, factor, out=layer)
            if self.settings.min_intensity > 0:
                np.putmask(layer, layer < np.float32(self.settings.min_intensity), 0.0)
            self.active[name] = bool(layer.any())
        ticks = meta.get("ticks", 0)
        self.ticks = int(ticks) if isinstance(ticks, int | float) else 0
        self.version += 1
        return skipped


def save_snapshot(path: str, layers: dict[str, np.ndarray], meta: dict[str, object]) -> None:
    """Writes layers and metadata to ``path`` atomically (a reader never sees
    half a file)."""
    import os

    buffer = io.BytesIO()
    arrays = {f"layer:{name}": values for name, values in layers.items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(buffer, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_snapshot(path: str) -> tuple[dict[str, np.ndarray], dict[str, object]] | None:
    """The layers and metadata saved in ``path``, or None when there is none."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            layers = {
                key.split(":", 1)[1]: data[key] for key in data.files if key.startswith("layer:")
            }
    except FileNotFoundError:
        return None
    return layers, meta


def layer_names(values: Iterable[str]) -> list[str]:
    return [require_type_name(v, "types") for v in values]
