"""Trust domain logic: Bayesian reputation over a directed trust graph. No grpc.

The model (DESIGN §3.4, the guide's section 4)
- Each directed edge observer -> subject (and, separately, each
  observer -> subject for one capability) holds Beta evidence (r, s). An
  outcome's delta is the guide's: Success +0.8, Timeout -0.3,
  PartialFailure -0.5 * error_rate, CompleteFailure -1.0; a positive delta
  adds to r, a negative one to s.
- Score = the mean of Beta(r + a*W, s + (1-a)*W), base rate a = 0.5 and prior
  weight W = 8/15, chosen so that one success scores exactly 0.8
  ((0.8 + W/2) / (0.8 + W) = 0.8): the guide's chain A -> B -> C -> D is then
  0.8^3 = 0.512. The guide's four outcomes score 0.8 (success),
  0.364 (partial 0.4), 0.32 (timeout), 0.174 (complete failure): the order of
  the deltas (DESIGN §6), not the guide's comment.
- Confidence = n / (n + K) with n = r + s the evidence mass and K the
  evidence at which confidence is one half: 0 when nothing is known, always
  below 1.
- Evidence keeps its time. A continuous half-life (off unless configured)
  weighs evidence by 2^(-age / half_life); DecayOldScores(max_age_days)
  multiplies the evidence of every observation older than the cutoff by the
  decay factor, pulling the score toward 0.5 and the confidence down.

ConservativeScore and Sybil resistance
- A subject's aggregate posterior sums the evidence of every observer, each
  weighted by the observer's standing. Trusted roots (the broker, by
  default) have standing 1. Any other observer's standing is earned from
  observers with standing: max over vouchers v of
  standing(v) * max(0, 2 * score(v, observer) - 1), through at most
  ``standing_depth`` levels. An identity nobody with standing has observed
  has standing 0.
- Evidence from observers without standing is pooled across all of them and
  capped at ``unvouched_cap`` units of evidence in total, keeping its
  proportions. So one fresh observer still ranks its subjects (the guide's
  4.1 picks worker-001), but fifty fresh identities together say no more
  than one, and can never lift an agent above one vouched for by an
  established observer.
- ConservativeScore is the lower end of the equal-tailed credible interval
  (95% by default) of that aggregate posterior.

Roots must sign their observations; the first signed observation of any
observer id binds that id to its key, and from then on its observations must
be signed with it (``TrustStore`` enforces the binding inside the write, so it
is atomic).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
import sqlite3
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import special

from services.common import crypto, signing
from services.common.errors import DomainError, InvalidArgument, OutOfRange, Unauthenticated
from services.common.storage import Database
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    optional_id,
    require_capability,
    require_finite,
    require_id,
    require_int_range,
)

DAY_S = 86_400.0
MAX_DEPTH = 16
MAX_TOP_K = 1000
MAX_BATCH = 1000
MAX_DURATION_MS = 86_400_000.0
# One success scores exactly 0.8 with base rate 0.5: (0.8 + W/2) / (0.8 + W) = 0.8.
ONE_SUCCESS_PRIOR_WEIGHT = 8.0 / 15.0


class OutcomeKind(enum.IntEnum):
    """Values match agent2028.common.v1.OutcomeKind."""

    SUCCESS = 1
    TIMEOUT = 2
    PARTIAL_FAILURE = 3
    COMPLETE_FAILURE = 4


def outcome_delta(kind: OutcomeKind, error_rate: float = 0.0) -> float:
    """The guide's trust delta of one outcome."""
    if kind is OutcomeKind.SUCCESS:
        return 0.8
    if kind is OutcomeKind.TIMEOUT:
        return -0.3
    if kind is OutcomeKind.PARTIAL_FAILURE:
        return -0.5 * error_rate
    return -1.0


def evidence_of(kind: OutcomeKind, error_rate: float = 0.0) -> tuple[float, float]:
    """(positive, negative) evidence of one outcome."""
    delta = outcome_delta(kind, error_rate)
    return (delta, 0.0) if delta >= 0 else (0.0, -delta)


@dataclass(frozen=True)
class TrustSettings:
    base_rate: float = 0.5
    prior_weight: float = ONE_SUCCESS_PRIOR_WEIGHT
    # Evidence mass at which confidence is 0.5.
    confidence_evidence: float = 2.0
    # Continuous half-life of evidence; 0 turns it off.
    half_life_days: float = 0.0
    # What DecayOldScores leaves of old evidence.
    decay_factor: float = 0.5
    # Observers with standing 1 (they must sign), and keys pinned for some.
    roots: tuple[str, ...] = ("broker",)
    pinned_keys: Mapping[str, bytes] = field(default_factory=dict)
    # Total evidence all observers without standing may contribute to one subject.
    unvouched_cap: float = 0.5
    # Levels of vouching that confer standing (1: only roots vouch).
    standing_depth: int = 2
    credible_level: float = 0.95
    # How far in the future an observe_time may be (clock skew), seconds.
    max_future_skew_s: float = 60.0
    watch_history: int = 10_000

    @property
    def half_life_s(self) -> float:
        return self.half_life_days * DAY_S


# --- the math -------------------------------------------------------------------


class Edge:
    """The evidence on one directed edge. ``r``/``s`` are the evidence as of
    ``t_ref`` (with the half-life applied up to then); the per-observation
    arrays are kept so DecayOldScores can discount exactly the old part."""

    __slots__ = ("count", "last_at", "neg", "pos", "r", "s", "t_ref", "times")

    def __init__(self) -> None:
        self.r = 0.0
        self.s = 0.0
        self.t_ref = 0.0
        self.count = 0
        self.last_at = 0.0
        self.times = array("d")
        self.pos = array("d")
        self.neg = array("d")

    def add(self, at: float, pos: float, neg: float, half_life_s: float) -> None:
        self.times.append(at)
        self.pos.append(pos)
        self.neg.append(neg)
        self.count += 1
        self.last_at = max(self.last_at, at)
        if not half_life_s:
            self.r += pos
            self.s += neg
        elif self.count == 1:
            self.r, self.s, self.t_ref = pos, neg, at
        elif at >= self.t_ref:
            k = math.exp2(-(at - self.t_ref) / half_life_s)
            self.r = self.r * k + pos
            self.s = self.s * k + neg
            self.t_ref = at
        else:
            k = math.exp2(-(self.t_ref - at) / half_life_s)
            self.r += pos * k
            self.s += neg * k

    def evidence(self, now: float, half_life_s: float) -> tuple[float, float]:
        if not half_life_s or now <= self.t_ref:
            return self.r, self.s
        k = math.exp2(-(now - self.t_ref) / half_life_s)
        return self.r * k, self.s * k

    def rebuild(self, half_life_s: float) -> None:
        times = np.array(self.times, dtype=float)
        pos = np.array(self.pos, dtype=float)
        neg = np.array(self.neg, dtype=float)
        if not half_life_s or not len(times):
            self.r, self.s = float(pos.sum()), float(neg.sum())
            return
        self.t_ref = float(times.max())
        k = np.exp2(-(self.t_ref - times) / half_life_s)
        self.r, self.s = float((pos * k).sum()), float((neg * k).sum())

    def discount_before(self, cutoff: float, factor: float, half_life_s: float) -> bool:
        """Multiplies the evidence observed before ``cutoff`` by ``factor``;
        True when anything changed."""
        changed = False
        times, pos, neg = self.times, self.pos, self.neg
        for i in range(len(times)):
            if times[i] < cutoff and (pos[i] or neg[i]):
                pos[i] *= factor
                neg[i] *= factor
                changed = True
        if changed:
            self.rebuild(half_life_s)
        return changed


@dataclass(slots=True)
class Score:
    observer_id: str
    subject_id: str
    score: float
    confidence: float
    positive: float
    negative: float
    observations: int
    last_at: float  # 0 when never observed


@dataclass(slots=True)
class Conservative:
    subject_id: str
    lower_bound: float
    mean: float
    confidence: float
    observers: int
    vouched_evidence: float
    unvouched_evidence: float


@dataclass(slots=True)
class Observation:
    """One recorded observation (a row of the ledger)."""

    sequence: int
    observer_id: str
    subject_id: str
    capability: str
    kind: OutcomeKind
    error_rate: float
    duration_ms: float
    observed_at: float
    recorded_at: float
    weight: float = 1.0
    signed: bool = False
    request_id: str = ""


@dataclass(slots=True)
class TrustEvent:
    index: int
    score: Score
    capability: str
    observation: Observation | None  # None for a decay


class TrustGraph:
    """The in-memory trust graph and every computation over it. Not
    thread-safe; one event loop drives it."""

    def __init__(self, settings: TrustSettings | None = None) -> None:
        self.settings = settings or TrustSettings()
        s = self.settings
        self._a = s.base_rate
        self._w = s.prior_weight
        self._k = s.confidence_evidence
        self._h = s.half_life_s
        self.roots = frozenset(s.roots)
        # observer, subject -> edge over every capability
        self.pairs: dict[tuple[str, str], Edge] = {}
        # observer, subject, capability -> edge for that capability only
        self.cap_edges: dict[tuple[str, str, str], Edge] = {}
        self.incoming: dict[str, dict[str, Edge]] = {}
        self.incoming_cap: dict[tuple[str, str], dict[str, Edge]] = {}
        self.outgoing: dict[str, dict[str, Edge]] = {}
        self.cap_subjects: dict[str, set[str]] = {}
        self.observations = 0

    # --- updates -----------------------------------------------------------------

    def add(self, obs: Observation) -> Edge:
        """Folds one observation in; returns the pair edge it changed."""
        pos, neg = evidence_of(obs.kind, obs.error_rate)
        pos *= obs.weight
        neg *= obs.weight
        o, s, c = obs.observer_id, obs.subject_id, obs.capability
        edge = self.pairs.get((o, s))
        if edge is None:
            edge = self.pairs[(o, s)] = Edge()
            self.incoming.setdefault(s, {})[o] = edge
            self.outgoing.setdefault(o, {})[s] = edge
        edge.add(obs.observed_at, pos, neg, self._h)
        if c:
            cap_edge = self.cap_edges.get((o, s, c))
            if cap_edge is None:
                cap_edge = self.cap_edges[(o, s, c)] = Edge()
                self.incoming_cap.setdefault((s, c), {})[o] = cap_edge
                self.cap_subjects.setdefault(c, set()).add(s)
            cap_edge.add(obs.observed_at, pos, neg, self._h)
        self.observations += 1
        return edge

    def decay_before(self, cutoff: float, factor: float) -> list[tuple[str, str]]:
        """Discounts evidence observed before ``cutoff``; returns the
        (observer, subject) pairs whose evidence changed."""
        changed = [
            pair
            for pair, edge in self.pairs.items()
            if edge.discount_before(cutoff, factor, self._h)
        ]
        for edge in self.cap_edges.values():
            edge.discount_before(cutoff, factor, self._h)
        return changed

    # --- scores -----------------------------------------------------------------

    def mean(self, r: float, s: float) -> float:
        return (r + self._a * self._w) / (r + s + self._w)

    def confidence(self, r: float, s: float) -> float:
        n = r + s
        return n / (n + self._k)

    def edge_score(self, edge: Edge, now: float) -> float:
        r, s = edge.evidence(now, self._h)
        return self.mean(r, s)

    def score(self, observer: str, subject: str, now: float, capability: str = "") -> Score:
        edge = (
            self.cap_edges.get((observer, subject, capability))
            if capability
            else self.pairs.get((observer, subject))
        )
        if edge is None:
            return Score(observer, subject, self._a, 0.0, 0.0, 0.0, 0, 0.0)
        r, s = edge.evidence(now, self._h)
        return Score(
            observer,
            subject,
            self.mean(r, s),
            self.confidence(r, s),
            r,
            s,
            edge.count,
            edge.last_at,
        )

    def standing(
        self, observer: str, now: float, memo: dict[str, float], depth: int | None = None
    ) -> float:
        """How much an observer's word counts, in [0, 1] (see the module doc)."""
        if observer in self.roots:
            return 1.0
        depth = self.settings.standing_depth if depth is None else depth
        key = observer if depth == self.settings.standing_depth else f"{observer}\x00{depth}"
        cached = memo.get(key)
        if cached is not None:
            return cached
        memo[key] = 0.0  # breaks cycles: A vouching for B vouching for A
        best = 0.0
        if depth >= 1:
            for voucher, edge in self.incoming.get(observer, {}).items():
                if voucher in self.roots:
                    weight = 1.0
                elif depth > 1:
                    weight = self.standing(voucher, now, memo, depth - 1)
                else:
                    continue
                if weight <= best:
                    continue
                lift = 2.0 * self.edge_score(edge, now) - 1.0
                if lift > 0:
                    best = max(best, weight * lift)
        memo[key] = best
        return best

    def _aggregate(
        self, subject: str, capability: str, now: float, memo: dict[str, float]
    ) -> tuple[float, float, int, float, float]:
        """(r, s, observers, vouched mass, unvouched mass) of a subject's
        standing-weighted aggregate evidence."""
        edges = (
            self.incoming_cap.get((subject, capability), {})
            if capability
            else self.incoming.get(subject, {})
        )
        r_v = s_v = r_u = s_u = 0.0
        observers = 0
        for observer, edge in edges.items():
            r, s = edge.evidence(now, self._h)
            if r + s <= 0.0:
                continue
            observers += 1
            weight = self.standing(observer, now, memo)
            if weight > 0.0:
                r_v += weight * r
                s_v += weight * s
            else:
                r_u += r
                s_u += s
        unvouched = r_u + s_u
        cap = self.settings.unvouched_cap
        if unvouched > cap:
            scale = cap / unvouched
            r_u *= scale
            s_u *= scale
            unvouched = cap
        return r_v + r_u, s_v + s_u, observers, r_v + s_v, unvouched

    def conservative(
        self, subject: str, now: float, *, capability: str = "", level: float | None = None
    ) -> Conservative:
        level = self.settings.credible_level if level is None else level
        r, s, observers, vouched, unvouched = self._aggregate(subject, capability, now, {})
        alpha = r + self._a * self._w
        beta = s + (1.0 - self._a) * self._w
        lower = float(special.betaincinv(alpha, beta, (1.0 - level) / 2.0))
        return Conservative(
            subject,
            lower,
            alpha / (alpha + beta),
            self.confidence(r, s),
            observers,
            vouched,
            unvouched,
        )

    def top_trusted(
        self, now: float, *, capability: str = "", k: int = 10, level: float | None = None
    ) -> list[Conservative]:
        """The k subjects with the highest conservative score (ties: higher
        mean, then id)."""
        level = self.settings.credible_level if level is None else level
        subjects = (
            sorted(self.cap_subjects.get(capability, ())) if capability else sorted(self.incoming)
        )
        if not subjects:
            return []
        memo: dict[str, float] = {}
        rows = [self._aggregate(subject, capability, now, memo) for subject in subjects]
        r = np.array([row[0] for row in rows])
        s = np.array([row[1] for row in rows])
        alpha = r + self._a * self._w
        beta = s + (1.0 - self._a) * self._w
        lower = special.betaincinv(alpha, beta, (1.0 - level) / 2.0)
        mean = alpha / (alpha + beta)
        best = heapq.nsmallest(
            k, range(len(subjects)), key=lambda i: (-lower[i], -mean[i], subjects[i])
        )
        return [
            Conservative(
                subjects[i],
                float(lower[i]),
                float(mean[i]),
                self.confidence(float(r[i]), float(s[i])),
                rows[i][2],
                rows[i][3],
                rows[i][4],
            )
            for i in best
        ]

    def transitive(
        self, source: str, target: str, max_depth: int, now: float
    ) -> tuple[float, list[str]]:
        """The best path (maximum product of edge scores) of at most
        ``max_depth`` hops. Edge scores lie strictly inside (0, 1), so a cycle
        never helps and layer-by-layer relaxation finds the best simple path."""
        if source == target:
            return 1.0, [source]
        best: dict[str, float] = {source: 1.0}
        paths: dict[str, tuple[str, ...]] = {source: (source,)}
        frontier = {source}
        for _ in range(max_depth):
            improved: dict[str, tuple[float, tuple[str, ...]]] = {}
            for node in frontier:
                base = best[node]
                for nxt, edge in self.outgoing.get(node, {}).items():
                    if nxt == source:
                        continue
                    product = base * self.edge_score(edge, now)
                    if product > best.get(nxt, 0.0) and product > improved.get(nxt, (0.0,))[0]:
                        improved[nxt] = (product, (*paths[node], nxt))
            if not improved:
                break
            for node, (product, path) in improved.items():
                best[node] = product
                paths[node] = path
            frontier = set(improved)
        if target not in best:
            return 0.0, []
        return best[target], list(paths[target])


# --- durable ledger ---------------------------------------------------------------

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS observations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT UNIQUE,
        observer_id TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        capability TEXT NOT NULL,
        kind INTEGER NOT NULL,
        error_rate REAL NOT NULL,
        duration_ms REAL NOT NULL,
        observed_at REAL NOT NULL,
        recorded_at REAL NOT NULL,
        weight REAL NOT NULL DEFAULT 1.0,
        signed INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS observations_subject ON observations(subject_id, seq)",
    "CREATE INDEX IF NOT EXISTS observations_observer ON observations(observer_id, seq)",
    "CREATE INDEX IF NOT EXISTS observations_time ON observations(observed_at)",
    """CREATE TABLE IF NOT EXISTS observer_keys (
        observer_id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        bound_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS decays (
        request_id TEXT PRIMARY KEY,
        cutoff REAL NOT NULL,
        factor REAL NOT NULL,
        applied_at REAL NOT NULL,
        edges INTEGER NOT NULL
    )""",
]

_COLUMNS = (
    "seq, observer_id, subject_id, capability, kind, error_rate, duration_ms, "
    "observed_at, recorded_at, weight, signed, request_id"
)


def _row_to_observation(row: tuple[Any, ...]) -> Observation:
    return Observation(
        sequence=row[0],
        observer_id=row[1],
        subject_id=row[2],
        capability=row[3],
        kind=OutcomeKind(row[4]),
        error_rate=row[5],
        duration_ms=row[6],
        observed_at=row[7],
        recorded_at=row[8],
        weight=row[9],
        signed=bool(row[10]),
        request_id=row[11] or "",
    )


class KeyMismatch(Exception):
    """Raised inside a write when an observer's bound key differs; ``index``
    is the observation's position in its batch."""

    def __init__(self, observer_id: str, index: int = 0) -> None:
        super().__init__(observer_id)
        self.observer_id = observer_id
        self.index = index


def _insert_one(
    conn: sqlite3.Connection, index: int, obs: Observation, public_key: bytes | None
) -> Observation | None:
    if obs.request_id:
        seen = conn.execute(
            "SELECT 1 FROM observations WHERE request_id = ?", (obs.request_id,)
        ).fetchone()
        if seen:
            return None
    bound = conn.execute(
        "SELECT public_key FROM observer_keys WHERE observer_id = ?", (obs.observer_id,)
    ).fetchone()
    if bound is not None and (public_key is None or bytes(bound[0]) != public_key):
        raise KeyMismatch(obs.observer_id, index)
    if bound is None and public_key is not None:
        conn.execute(
            "INSERT INTO observer_keys (observer_id, public_key, bound_at) VALUES (?, ?, ?)",
            (obs.observer_id, public_key, obs.recorded_at),
        )
    cursor = conn.execute(
        "INSERT INTO observations (request_id, observer_id, subject_id, capability, kind, "
        "error_rate, duration_ms, observed_at, recorded_at, weight, signed) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            obs.request_id or None,
            obs.observer_id,
            obs.subject_id,
            obs.capability,
            int(obs.kind),
            obs.error_rate,
            obs.duration_ms,
            obs.observed_at,
            obs.recorded_at,
            obs.weight,
            int(obs.signed),
        ),
    )
    return replace(obs, sequence=cursor.lastrowid or 0)


class TrustStore:
    """The observation ledger in SQLite: every acknowledged observation is
    committed (it survives kill -9), and so are key bindings and decays."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.db = Database(path, schema=SCHEMA, synchronous=synchronous)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def load(self) -> tuple[list[Observation], dict[str, bytes]]:
        def read(conn: sqlite3.Connection) -> tuple[list[Observation], dict[str, bytes]]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM observations ORDER BY seq").fetchall()
            keys = dict(conn.execute("SELECT observer_id, public_key FROM observer_keys"))
            return [_row_to_observation(r) for r in rows], {k: bytes(v) for k, v in keys.items()}

        return await self.db.read(read)

    async def insert(self, obs: Observation, public_key: bytes | None) -> Observation | None:
        """Records an observation (binding the observer's key on its first
        signed one); None when its request_id was already recorded. Raises
        KeyMismatch when the observer is bound to another key, or is bound
        and this observation is unsigned."""
        return (await self.insert_many([(obs, public_key)]))[0]

    async def insert_many(
        self, batch: list[tuple[Observation, bytes | None]]
    ) -> list[Observation | None]:
        """Records observations in one transaction, all or none (KeyMismatch
        names the position of the first offender)."""

        def write(conn: sqlite3.Connection) -> list[Observation | None]:
            return [_insert_one(conn, i, obs, key) for i, (obs, key) in enumerate(batch)]

        return await self.db.write(write)

    async def decay(self, request_id: str, cutoff: float, factor: float, applied_at: float) -> bool:
        """Discounts old evidence in the ledger; False when request_id was
        already applied."""

        def write(conn: sqlite3.Connection) -> bool:
            seen = conn.execute("SELECT 1 FROM decays WHERE request_id = ?", (request_id,))
            if seen.fetchone():
                return False
            conn.execute(
                "UPDATE observations SET weight = weight * ? WHERE observed_at < ?",
                (factor, cutoff),
            )
            conn.execute(
                "INSERT INTO decays (request_id, cutoff, factor, applied_at, edges) VALUES (?, ?, ?, ?, 0)",
                (request_id, cutoff, factor, applied_at),
            )
            return True

        return await self.db.write(write)

    async def decay_result(self, request_id: str) -> int | None:
        row = await self.db.fetchone("SELECT edges FROM decays WHERE request_id = ?", (request_id,))
        return None if row is None else int(row[0])

    async def set_decay_edges(self, request_id: str, edges: int) -> None:
        await self.db.execute(
            "UPDATE decays SET edges = ? WHERE request_id = ?", (edges, request_id)
        )

    async def page(
        self,
        *,
        after: int,
        size: int,
        observer_id: str = "",
        subject_id: str = "",
        capability: str = "",
    ) -> list[Observation]:
        clauses, params = ["seq > ?"], [after]
        for column, value in (
            ("observer_id", observer_id),
            ("subject_id", subject_id),
            ("capability", capability),
        ):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM observations WHERE {' AND '.join(clauses)} "
            "ORDER BY seq LIMIT ?",
            (*params, size),
        )
        return [_row_to_observation(r) for r in rows]


# --- the service's logic ------------------------------------------------------------


class _Gate:
    """Observations share it; a decay takes it alone, so no observation is
    committed on one side of a decay and applied in memory on the other."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._inflight = 0
        self._exclusive = False

    async def enter_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._inflight += 1

    async def exit_shared(self) -> None:
        async with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    async def enter_exclusive(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            await self._cond.wait_for(lambda: self._inflight == 0)

    async def exit_exclusive(self) -> None:
        async with self._cond:
            self._exclusive = False
            self._cond.notify_all()


class Trust:
    """The trust service's logic over the graph and the ledger: validation,
    signatures and key binding, idempotency, decay and the change history."""

    def __init__(
        self,
        settings: TrustSettings,
        store: TrustStore,
        *,
        clock: Callable[[], float] = time.time,
        index_start: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.graph = TrustGraph(settings)
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self._gate = _Gate()
        self.index = index_start if index_start is not None else int(clock() * 1_000_000)
        self._history: deque[TrustEvent] = deque(maxlen=settings.watch_history)
        self._listeners: list[Callable[[TrustEvent], None]] = []

    async def open(self) -> None:
        await self.store.open()
        observations, keys = await self.store.load()
        for obs in observations:
            self.graph.add(obs)
        self._keys = keys

    async def close(self) -> None:
        await self.store.close()

    def now(self) -> float:
        return self._clock()

    # --- events -------------------------------------------------------------------

    def add_listener(self, listener: Callable[[TrustEvent], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[TrustEvent], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, score: Score, capability: str, observation: Observation | None) -> None:
        self.index += 1
        event = TrustEvent(self.index, score, capability, observation)
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)

    def events_since(self, from_index: int) -> list[TrustEvent]:
        """Retained events after ``from_index``; OUT_OF_RANGE when some are
        no longer retained or the index is from the future."""
        if from_index > self.index:
            raise OutOfRange(
                f"from_index {from_index} is ahead of the trust service's index {self.index}",
                field="from_index",
                reason="INDEX_IN_FUTURE",
                metadata={"current_index": str(self.index)},
            )
        oldest = self._history[0].index if self._history else self.index + 1
        if from_index < oldest - 1 and from_index < self.index:
            raise OutOfRange(
                f"changes after index {from_index} are no longer retained (oldest is {oldest}); "
                "watch again from 0",
                field="from_index",
                reason="INDEX_COMPACTED",
                metadata={"oldest_index": str(oldest), "current_index": str(self.index)},
            )
        return [e for e in self._history if e.index > from_index]

    # --- observe ------------------------------------------------------------------

    def validate_observation(
        self,
        *,
        observer_id: str,
        subject_id: str,
        kind: int,
        error_rate: float,
        duration_ms: float,
        capability: str,
        observed_at: float | None,
        request_id: str,
    ) -> tuple[OutcomeKind, float]:
        """Checks every field; returns the outcome kind and the observation time."""
        require_id(observer_id, "observer_id")
        require_id(subject_id, "subject_id")
        if observer_id == subject_id:
            raise InvalidArgument(
                "an observer cannot observe itself: subject_id equals observer_id",
                field="subject_id",
                reason="SELF_OBSERVATION",
            )
        if capability:
            require_capability(capability, "capability")
        optional_id(request_id, "request_id")
        if kind == 0:
            raise InvalidArgument(
                "outcome.kind is required (SUCCESS, TIMEOUT, PARTIAL_FAILURE or COMPLETE_FAILURE)",
                field="outcome.kind",
                reason="EMPTY_FIELD",
            )
        try:
            outcome_kind = OutcomeKind(kind)
        except ValueError:
            raise InvalidArgument(
                f"outcome.kind has no value {kind}",
                field="outcome.kind",
                reason="UNKNOWN_ENUM_VALUE",
            ) from None
        require_finite(error_rate, "outcome.error_rate", lo=0.0, hi=1.0)
        require_finite(duration_ms, "outcome.duration_ms", lo=0.0, hi=MAX_DURATION_MS)
        now = self._clock()
        if observed_at is None:
            return outcome_kind, now
        require_finite(observed_at, "observe_time", lo=0.0)
        if observed_at > now + self.settings.max_future_skew_s:
            raise InvalidArgument(
                f"observe_time is {observed_at - now:.0f}s in the future; observations may be "
                "backdated, not postdated",
                field="observe_time",
                reason="TIME_IN_FUTURE",
            )
        return outcome_kind, min(observed_at, now)

    def _check_signature(
        self,
        observer_id: str,
        statement: tuple[Any, ...],
        public_key: bytes,
        signature: bytes,
        request_id: str,
    ) -> bytes | None:
        """The verified observer key, or None for an unsigned observation."""
        is_root = observer_id in self.graph.roots
        if not public_key and not signature:
            if is_root:
                raise Unauthenticated(
                    f"observer {observer_id!r} is a trusted root: its observations must be signed",
                    field="observer_signature",
                    reason="SIGNATURE_REQUIRED",
                )
            if observer_id in self._keys:
                raise Unauthenticated(
                    f"observer {observer_id!r} has a bound key: its observations must be signed",
                    field="observer_signature",
                    reason="SIGNATURE_REQUIRED",
                )
            return None
        if not crypto.valid_public_key(public_key):
            raise InvalidArgument(
                "observer_public_key must be a 32-byte Ed25519 public key",
                field="observer_public_key",
                reason="MALFORMED_PUBLIC_KEY",
            )
        if not request_id:
            raise InvalidArgument(
                "a signed observation needs a request_id, so a replay counts once",
                field="request_id",
                reason="EMPTY_FIELD",
            )
        if not crypto.verify(public_key, signature, *statement):
            raise Unauthenticated(
                "observer_signature does not verify with observer_public_key",
                field="observer_signature",
                reason="BAD_SIGNATURE",
            )
        pinned = self.settings.pinned_keys.get(observer_id)
        bound = pinned or self._keys.get(observer_id)
        if bound is not None and bound != bytes(public_key):
            raise Unauthenticated(
                f"observer {observer_id!r} is bound to another key",
                field="observer_public_key",
                reason="KEY_MISMATCH",
            )
        return bytes(public_key)

    def prepare(
        self,
        *,
        observer_id: str,
        subject_id: str,
        kind: int,
        error_rate: float = 0.0,
        duration_ms: float = 0.0,
        capability: str = "",
        observed_at: float | None = None,
        observe_ns: int = 0,
        request_id: str = "",
        public_key: bytes = b"",
        signature: bytes = b"",
    ) -> tuple[Observation, bytes | None]:
        """Validates one observation and its signature; returns it ready to
        store, with the observer's verified key (None when unsigned)."""
        outcome_kind, at = self.validate_observation(
            observer_id=observer_id,
            subject_id=subject_id,
            kind=kind,
            error_rate=error_rate,
            duration_ms=duration_ms,
            capability=capability,
            observed_at=observed_at,
            request_id=request_id,
        )
        statement = signing.trust_observation(
            observer_id,
            subject_id,
            capability,
            int(outcome_kind),
            error_rate,
            duration_ms,
            observe_ns,
            request_id,
        )
        key = self._check_signature(observer_id, statement, public_key, signature, request_id)
        obs = Observation(
            sequence=0,
            observer_id=observer_id,
            subject_id=subject_id,
            capability=capability,
            kind=outcome_kind,
            error_rate=error_rate,
            duration_ms=duration_ms,
            observed_at=at,
            recorded_at=self._clock(),
            signed=key is not None,
            request_id=request_id,
        )
        return obs, key

    async def observe(self, **fields: Any) -> tuple[Score, bool]:
        """Records one observation (the keyword arguments of ``prepare``);
        returns the edge's new score and whether request_id had already been
        recorded (then nothing changed)."""
        return (await self.record([self.prepare(**fields)]))[0]

    async def observe_many(self, batch: list[dict[str, Any]]) -> list[tuple[Score, bool]]:
        """Records several observations in one commit, all or none; a bad
        one is reported as observations[i]."""
        prepared = []
        for i, fields in enumerate(batch):
            try:
                prepared.append(self.prepare(**fields))
            except DomainError as exc:
                raise in_batch(exc, i) from None
        return await self.record(prepared)

    async def record(
        self, prepared: list[tuple[Observation, bytes | None]]
    ) -> list[tuple[Score, bool]]:
        """Stores prepared observations, then applies them to the graph."""
        await self._gate.enter_shared()
        try:
            try:
                stored = await self.store.insert_many(prepared)
            except KeyMismatch as exc:
                error = Unauthenticated(
                    f"observer {exc.observer_id!r} is bound to another key; sign with it",
                    field="observer_signature",
                    reason="KEY_MISMATCH",
                )
                raise (in_batch(error, exc.index) if len(prepared) > 1 else error) from None
            for (obs, key), row in zip(prepared, stored, strict=True):
                if row is not None:
                    if key is not None:
                        self._keys.setdefault(obs.observer_id, key)
                    self.graph.add(row)
        finally:
            await self._gate.exit_shared()
        now = self._clock()
        results = []
        for (obs, _), row in zip(prepared, stored, strict=True):
            score = self.graph.score(obs.observer_id, obs.subject_id, now)
            if row is not None:
                self._emit(score, obs.capability, row)
            results.append((score, row is None))
        return results

    # --- queries ------------------------------------------------------------------

    def score(self, observer_id: str, subject_id: str, capability: str = "") -> Score:
        require_id(observer_id, "observer_id")
        require_id(subject_id, "subject_id")
        if observer_id == subject_id:
            raise InvalidArgument(
                "trust in oneself is not tracked: subject_id equals observer_id",
                field="subject_id",
                reason="SELF_OBSERVATION",
            )
        if capability:
            require_capability(capability, "capability")
        return self.graph.score(observer_id, subject_id, self._clock(), capability)

    def _level(self, credible_level: float) -> float:
        if credible_level == 0:
            return self.settings.credible_level
        require_finite(credible_level, "credible_level", lo=0.0, hi=1.0, lo_open=True)
        if credible_level >= 1.0:
            raise InvalidArgument(
                "credible_level must be below 1", field="credible_level", reason="OUT_OF_RANGE"
            )
        return credible_level

    def conservative(
        self, subject_id: str, *, capability: str = "", credible_level: float = 0.0
    ) -> Conservative:
        require_id(subject_id, "subject_id")
        if capability:
            require_capability(capability, "capability")
        level = self._level(credible_level)
        return self.graph.conservative(
            subject_id, self._clock(), capability=capability, level=level
        )

    def transitive(self, from_id: str, to_id: str, max_depth: int) -> tuple[float, list[str]]:
        require_id(from_id, "from_id")
        require_id(to_id, "to_id")
        require_int_range(max_depth, "max_depth", 1, MAX_DEPTH)
        return self.graph.transitive(from_id, to_id, max_depth, self._clock())

    def top_trusted(self, *, capability: str = "", k: int = 10) -> list[Conservative]:
        if capability:
            require_capability(capability, "capability")
        if k == 0:
            k = 10
        require_int_range(k, "k", 1, MAX_TOP_K)
        return self.graph.top_trusted(self._clock(), capability=capability, k=k)

    async def decay_old_scores(self, max_age_days: float, request_id: str = "") -> int:
        """Discounts evidence older than ``max_age_days``; returns how many
        (observer, subject) edges changed. A repeated request_id is applied once."""
        require_finite(max_age_days, "max_age_days", lo=0.0, hi=36_500.0, lo_open=True)
        optional_id(request_id, "request_id")
        if request_id:
            done = await self.store.decay_result(request_id)
            if done is not None:
                return done
        now = self._clock()
        cutoff = now - max_age_days * DAY_S
        factor = self.settings.decay_factor
        key = request_id or f"decay-{time.time_ns()}"
        await self._gate.enter_exclusive()
        try:
            if not await self.store.decay(key, cutoff, factor, now):
                done = await self.store.decay_result(key)
                return done or 0
            changed = self.graph.decay_before(cutoff, factor)
        finally:
            await self._gate.exit_exclusive()
        await self.store.set_decay_edges(key, len(changed))
        for observer, subject in changed:
            self._emit(self.graph.score(observer, subject, now), "", None)
        return len(changed)

    async def list_observations(
        self,
        *,
        page_size: int,
        page_token: str = "",
        observer_id: str = "",
        subject_id: str = "",
        capability: str = "",
    ) -> tuple[list[Observation], str]:
        optional_id(observer_id, "observer_id")
        optional_id(subject_id, "subject_id")
        if capability:
            require_capability(capability, "capability")
        position = decode_page_token(page_token)
        after = position.get("after", 0)
        if not isinstance(after, int) or after < 0:
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        rows = await self.store.page(
            after=after,
            size=page_size + 1,
            observer_id=observer_id,
            subject_id=subject_id,
            capability=capability,
        )
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, encode_page_token({"after": rows[-1].sequence})
        return rows, ""


def in_batch(error: DomainError, index: int) -> DomainError:
    """The same error, naming the observation's position in its batch."""
    prefix = f"observations[{index}]"
    return type(error)(
        f"{prefix}: {error.message}",
        reason=error.reason,
        field=f"{prefix}.{error.field}" if error.field else prefix,
        metadata={k: v for k, v in error.metadata.items() if k != "field"},
    )


def parse_roots(entries: Iterable[str]) -> tuple[tuple[str, ...], dict[str, bytes]]:
    """``id`` or ``id=HEXKEY`` entries: root ids and the keys pinned for some."""
    roots: list[str] = []
    pinned: dict[str, bytes] = {}
    for entry in entries:
        name, _, key = entry.partition("=")
        name = name.strip()
        require_id(name, "root")
        roots.append(name)
        if key:
            raw = bytes.fromhex(key.strip())
            if not crypto.valid_public_key(raw):
                raise ValueError(f"root {name}: not a 32-byte Ed25519 public key")
            pinned[name] = raw
    return tuple(roots), pinned


__all__ = [
    "Conservative",
    "Edge",
    "Observation",
    "OutcomeKind",
    "Score",
    "Trust",
    "TrustEvent",
    "TrustGraph",
    "TrustSettings",
    "TrustStore",
    "evidence_of",
    "in_batch",
    "outcome_delta",
    "parse_roots",
]
