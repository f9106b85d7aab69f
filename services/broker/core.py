"""Broker domain logic: routing strategies, execution with failover, signed
receipts, their durable store and the outbox that reports every outcome. No grpc.

The broker reaches the registry, the agents and the trust service through
three small ports (``Directory``, ``AgentCaller``, ``Reporter``); the servicer
plugs in the gRPC clients, the unit tests plug in fakes.

Design notes
- Routing: the registry serves candidates in the order a strategy needs
  (latency, reliability, fitness) from its index; LEAST_LOADED and
  ROUND_ROBIN take every passing agent. Candidate lists are cached for a
  fraction of a second (the registry's numbers move by heartbeats and
  receipts, both slower than that), and a stale list is used for a while when
  the registry is unreachable. An agent that just answered UNAVAILABLE is a
  suspect for a few seconds and goes to the back of every ranking, so a dead
  agent the registry has not yet noticed costs one failover, not one per call.
- LEAST_LOADED counts the broker's own in-flight commands per agent over its
  max_concurrency (ties: the agent's reported load, then id). ROUND_ROBIN
  keeps, per capability, the last agent chosen and takes the next id after it,
  so agents joining or leaving never skip or repeat a turn.
- Execution: a request_id is the command id; a retried call waits for the
  first one or returns its stored receipt. Attempts fail over on UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, NOT_FOUND and FAILED_PRECONDITION
  (the agent cannot run it now), each attempt getting an even share of the
  time left. A receipt whose agent signature does not verify, or that
  attests to another command, is a failure. INVALID_ARGUMENT (the agent
  refused the caller's arguments before running anything) ends the command
  without failover and is reported neither to trust nor to the registry.
- Durability: the receipt and the reports it owes (one trust observation and
  one registry outcome per attempt) are committed in one transaction before
  the call returns. The outbox drains in the background with backoff, so a
  trust or registry outage never fails or slows a client's call, and nothing
  is lost across a broker crash: undelivered reports are reloaded at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import heapq
import json
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import crypto, signing
from services.common.crypto import Identity
from services.common.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
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

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_ARGS_BYTES = 1024 * 1024
MAX_ATTEMPTS_LIMIT = 10
# Client request ids leave room for the per-attempt suffix of report ids.
MAX_REQUEST_ID_LEN = 100
MAX_ERROR_LEN = 2000
RANKING_SHOWN = 10
# Time kept back from the deadline to sign and persist the receipt.
PERSIST_RESERVE_S = 0.005

FAILOVER_RESULTS = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION"}
)

# Trust outcome kinds (agent2028.common.v1.OutcomeKind).
SUCCESS, TIMEOUT, COMPLETE_FAILURE = 1, 2, 4
# agent2028.common.v1.HealthStatus
PASSING = 1


class Strategy(enum.IntEnum):
    """Values match agent2028.broker.v1.Strategy."""

    MIN_LATENCY = 1
    MAX_RELIABILITY = 2
    BEST_FIT = 3
    LEAST_LOADED = 4
    ROUND_ROBIN = 5


# The registry order each strategy's candidates come in, and how many.
_ORDER = {
    Strategy.MIN_LATENCY: "latency",
    Strategy.MAX_RELIABILITY: "reliability",
    Strategy.BEST_FIT: "fitness",
    Strategy.LEAST_LOADED: "load",
    Strategy.ROUND_ROBIN: "load",
}
ALL_PASSING = 1000


@dataclass(frozen=True)
class BrokerSettings:
    broker_id: str = "broker"
    max_attempts: int = 3
    default_deadline_s: float = 30.0
    min_deadline_s: float = 0.01
    max_deadline_s: float = 3600.0
    # Candidates fetched for the ranked strategies.
    candidates: int = 16
    candidate_ttl_s: float = 0.25
    # How long a cached list may stand in for an unreachable registry.
    stale_candidates_s: float = 10.0
    # How long an agent that answered UNAVAILABLE goes to the back.
    suspect_s: float = 5.0


@dataclass(slots=True)
class Candidate:
    agent_id: str
    address: str
    public_key: bytes
    latency_ms: float
    reliability: float
    fitness: float
    health: float
    load: int
    max_concurrency: int


@dataclass(slots=True)
class Ranked:
    candidate: Candidate
    score: float
    inflight: int


@dataclass(slots=True)
class RouteDecision:
    strategy: Strategy
    chosen: Ranked
    reason: str
    ranking: list[Ranked]


@dataclass(slots=True)
class AgentAnswer:
    """What an agent answered, with whether its signature verified against
    the key it registered. The receipt fields are the agent's, verbatim."""

    command_id: str
    session_id: str
    agent_id: str
    capability: str
    start_ns: int
    finish_ns: int
    duration_ms: float
    success: bool
    error: str
    output_digest: bytes
    output: str
    signature: bytes
    signature_valid: bool


class AttemptFailed(Exception):
    """An attempt got no receipt: ``result`` is the status code name."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(f"{result}: {message}")
        self.result = result
        self.message = message


class DirectoryUnavailable(Exception):
    """The registry could not be asked."""


class Directory(Protocol):
    async def candidates(
        self, capability: str, order: str, limit: int, *, patient: bool = False
    ) -> tuple[list[Candidate], int]:
        """Passing holders of ``capability`` in ``order``, and how many agents
        hold it in any status. ``patient``: wait (within the call's deadline)
        for a connection that is being re-established. Raises
        DirectoryUnavailable."""
        ...

    async def agent(self, agent_id: str) -> tuple[Candidate, int, list[str]] | None:
        """One registered agent (in any status): its candidate, health status
        (agent2028.common.v1.HealthStatus) and capabilities; None when it is
        not registered. Raises DirectoryUnavailable."""
        ...


class AgentCaller(Protocol):
    async def execute(
        self,
        candidate: Candidate,
        *,
        command_id: str,
        session_id: str,
        capability: str,
        args: Sequence[str],
        timeout_s: float,
    ) -> AgentAnswer:
        """Runs the command on the agent. Raises AttemptFailed."""
        ...


class ReportRetry(Exception):
    """Delivery failed for now; try again later (at most ``limit`` more times
    when set, e.g. an agent the registry does not know yet)."""

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class ReportRejected(Exception):
    """The receiver refused the report for good; it is dropped."""


class Reporter(Protocol):
    async def send(self, target: str, payload: dict[str, Any]) -> None:
        """Delivers one report to ``target`` ("trust" or "registry")."""
        ...

    def batches(self, target: str) -> bool:
        """Whether ``send_many`` can deliver several reports to ``target``."""
        ...

    async def send_many(self, target: str, payloads: list[dict[str, Any]]) -> None:
        """Delivers several reports at once, all or none."""
        ...


@dataclass(slots=True)
class AttemptRecord:
    agent_id: str
    address: str
    result: str
    error: str
    duration_ms: float


@dataclass
class Receipt:
    """An execution receipt as the broker keeps and signs it."""

    command_id: str
    session_id: str
    agent_id: str
    capability: str
    start_ns: int
    finish_ns: int
    duration_ms: float
    success: bool
    error: str
    attempts: int
    output_digest: bytes
    args_digest: bytes
    strategy: int
    attempt_log: list[AttemptRecord]
    # The agent's own statement (None when no agent answered).
    agent: AgentAnswer | None
    agent_public_key: bytes
    broker_id: str
    broker_public_key: bytes
    broker_signature: bytes = b""
    output: str = ""
    sequence: int = 0

    def statement(self) -> tuple[Any, ...]:
        return signing.broker_receipt(
            self.broker_id,
            self.command_id,
            self.session_id,
            self.agent_id,
            self.capability,
            self.start_ns,
            self.finish_ns,
            self.duration_ms,
            self.success,
            self.error,
            self.attempts,
            self.output_digest,
            self.args_digest,
            self.strategy,
            [(a.agent_id, a.result) for a in self.attempt_log],
            self.agent_public_key,
            self.agent.signature if self.agent else b"",
        )

    def verify(self) -> bool:
        return crypto.verify(self.broker_public_key, self.broker_signature, *self.statement())

    def to_json(self) -> str:
        # Built by hand: dataclasses.asdict deep-copies every field, which
        # costs more than the rest of the hot path's bookkeeping together.
        a = self.agent
        return json.dumps(
            {
                "command_id": self.command_id,
                "session_id": self.session_id,
                "agent_id": self.agent_id,
                "capability": self.capability,
                "start_ns": self.start_ns,
                "finish_ns": self.finish_ns,
                "duration_ms": self.duration_ms,
                "success": self.success,
                "error": self.error,
                "attempts": self.attempts,
                "output_digest": self.output_digest.hex(),
                "args_digest": self.args_digest.hex(),
                "strategy": self.strategy,
                "attempt_log": [
                    {
                        "agent_id": r.agent_id,
                        "address": r.address,
                        "result": r.result,
                        "error": r.error,
                        "duration_ms": r.duration_ms,
                    }
                    for r in self.attempt_log
                ],
                "agent": None
                if a is None
                else {
                    "command_id": a.command_id,
                    "session_id": a.session_id,
                    "agent_id": a.agent_id,
                    "capability": a.capability,
                    "start_ns": a.start_ns,
                    "finish_ns": a.finish_ns,
                    "duration_ms": a.duration_ms,
                    "success": a.success,
                    "error": a.error,
                    "output_digest": a.output_digest.hex(),
                    # Stored once: in the output column when it is the receipt's.
                    "output": None if a.output == self.output else a.output,
                    "signature": a.signature.hex(),
                    "signature_valid": a.signature_valid,
                },
                "agent_public_key": self.agent_public_key.hex(),
                "broker_id": self.broker_id,
                "broker_public_key": self.broker_public_key.hex(),
                "broker_signature": self.broker_signature.hex(),
            }
        )

    @classmethod
    def from_json(cls, text: str, output: str, sequence: int) -> Receipt:
        body = json.loads(text)
        for name in ("output_digest", "args_digest", "agent_public_key", "broker_public_key"):
            body[name] = bytes.fromhex(body[name])
        body["broker_signature"] = bytes.fromhex(body["broker_signature"])
        body["attempt_log"] = [AttemptRecord(**a) for a in body["attempt_log"]]
        agent = body.get("agent")
        if agent is not None:
            if agent["output"] is None:
                agent["output"] = output
            agent["output_digest"] = bytes.fromhex(agent["output_digest"])
            agent["signature"] = bytes.fromhex(agent["signature"])
            body["agent"] = AgentAnswer(**agent)
        return cls(**body, output=output, sequence=sequence)


def args_digest(args: Sequence[str]) -> bytes:
    return hashlib.sha256(crypto.canonical("args", list(args))).digest()


def validate_args(args: Sequence[str]) -> list[str]:
    if len(args) > MAX_ARGS:
        raise InvalidArgument(
            f"args has {len(args)} values; at most {MAX_ARGS} allowed",
            field="args",
            reason="TOO_MANY_VALUES",
        )
    if sum(len(a) for a in args) > MAX_ARGS_BYTES:
        raise InvalidArgument(
            f"args exceed {MAX_ARGS_BYTES} bytes", field="args", reason="FIELD_TOO_LONG"
        )
    return list(args)


# --- routing ------------------------------------------------------------------------


def _fmt_ms(value: float) -> str:
    return f"{value:.1f} ms"


class Router:
    """The strategies: ranks candidates and explains the choice."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.inflight: dict[str, int] = {}
        self.last_turn: dict[str, str] = {}
        self.suspects: dict[str, float] = {}

    def suspect(self, agent_id: str, seconds: float) -> None:
        self.suspects[agent_id] = self._clock() + seconds

    def is_suspect(self, agent_id: str) -> bool:
        until = self.suspects.get(agent_id)
        if until is None:
            return False
        if until <= self._clock():
            del self.suspects[agent_id]
            return False
        return True

    def rank(
        self,
        strategy: Strategy,
        capability: str,
        candidates: Iterable[Candidate],
        exclude: Iterable[str] = (),
    ) -> list[Ranked]:
        """Candidates best first (suspects last, excluded ones left out)."""
        excluded = set(exclude)
        pool = [c for c in candidates if c.agent_id not in excluded]
        inflight = self.inflight

        def ranked(c: Candidate, score: float) -> Ranked:
            return Ranked(c, score, inflight.get(c.agent_id, 0))

        if strategy is Strategy.MIN_LATENCY:
            out = [
                ranked(c, c.latency_ms)
                for c in sorted(pool, key=lambda c: (c.latency_ms, c.agent_id))
            ]
        elif strategy is Strategy.MAX_RELIABILITY:
            out = [
                ranked(c, c.reliability)
                for c in sorted(pool, key=lambda c: (-c.reliability, -c.fitness, c.agent_id))
            ]
        elif strategy is Strategy.BEST_FIT:
            out = [
                ranked(c, c.fitness) for c in sorted(pool, key=lambda c: (-c.fitness, c.agent_id))
            ]
        elif strategy is Strategy.LEAST_LOADED:

            def load_key(c: Candidate) -> tuple[float, float, str]:
                return (
                    inflight.get(c.agent_id, 0) / c.max_concurrency,
                    c.load / c.max_concurrency,
                    c.agent_id,
                )

            out = [ranked(c, load_key(c)[0]) for c in sorted(pool, key=load_key)]
        else:
            ring = sorted(pool, key=lambda c: c.agent_id)
            last = self.last_turn.get(capability)
            start = 0
            if last is not None:
                start = next((i for i, c in enumerate(ring) if c.agent_id > last), 0)
            turned = ring[start:] + ring[:start]
            out = [ranked(c, float(i)) for i, c in enumerate(turned)]
        healthy = [r for r in out if not self.is_suspect(r.candidate.agent_id)]
        if len(healthy) == len(out):
            return out
        return healthy + [r for r in out if self.is_suspect(r.candidate.agent_id)]

    def explain(self, strategy: Strategy, capability: str, ranking: list[Ranked]) -> str:
        chosen = ranking[0]
        c = chosen.candidate
        runner = ranking[1] if len(ranking) > 1 else None
        n = len(ranking)
        among = f"among {n} passing agent{'s' if n != 1 else ''}"
        suspect = (
            " (every agent is a suspect after answering UNAVAILABLE; trying the best anyway)"
            if self.is_suspect(c.agent_id)
            else ""
        )
        if strategy is Strategy.MIN_LATENCY:
            nxt = (
                f"; next {runner.candidate.agent_id} at {_fmt_ms(runner.candidate.latency_ms)}"
                if runner
                else ""
            )
            return f"lowest latency {_fmt_ms(c.latency_ms)} {among}{nxt}{suspect}"
        if strategy is Strategy.MAX_RELIABILITY:
            nxt = (
                f"; next {runner.candidate.agent_id} at {runner.candidate.reliability:.3f}"
                if runner
                else ""
            )
            return f"highest measured reliability {c.reliability:.3f} {among}{nxt}{suspect}"
        if strategy is Strategy.BEST_FIT:
            nxt = (
                f"; next {runner.candidate.agent_id} at {runner.candidate.fitness:.3f}"
                if runner
                else ""
            )
            return (
                f"highest fitness {c.fitness:.3f} (health {c.health:.2f}, latency "
                f"{_fmt_ms(c.latency_ms)}, reliability {c.reliability:.3f}, load "
                f"{c.load}/{c.max_concurrency}) {among}{nxt}{suspect}"
            )
        if strategy is Strategy.LEAST_LOADED:
            nxt = (
                f"; next {runner.candidate.agent_id} with {runner.inflight}/{runner.candidate.max_concurrency}"
                if runner
                else ""
            )
            return (
                f"fewest commands in flight through this broker: {chosen.inflight}/"
                f"{c.max_concurrency} {among}{nxt}{suspect}"
            )
        last = self.last_turn.get(capability)
        after = f"after {last}" if last else "first turn"
        return f"next in turn for {capability} ({after}) {among}{suspect}"

    def took_turn(self, capability: str, agent_id: str) -> None:
        self.last_turn[capability] = agent_id


# --- durable receipts and outbox ---------------------------------------------------

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS receipts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        command_id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        body TEXT NOT NULL,
        output TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS receipts_session ON receipts(session_id, seq)",
    "CREATE INDEX IF NOT EXISTS receipts_agent ON receipts(agent_id, seq)",
    """CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        target TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
]


@dataclass
class OutboxItem:
    id: int
    target: str
    payload: dict[str, Any]
    tries: int = 0
    limit: int | None = None


class ReceiptStore:
    """Receipts and the outbox in SQLite. A receipt and the reports it owes
    are one transaction: both are there after kill -9, or neither."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.db = Database(path, schema=SCHEMA, synchronous=synchronous)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def save(
        self, receipt: Receipt, reports: list[tuple[str, dict[str, Any]]]
    ) -> tuple[Receipt, list[OutboxItem]]:
        """Stores the receipt and its reports; when the command id is already
        stored (a duplicate that raced us), returns the stored receipt and no
        reports."""
        body = receipt.to_json()
        now = time.time()

        def write(conn: sqlite3.Connection) -> tuple[int, list[OutboxItem]] | None:
            try:
                cursor = conn.execute(
                    "INSERT INTO receipts (command_id, session_id, agent_id, body, output) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        receipt.command_id,
                        receipt.session_id,
                        receipt.agent_id,
                        body,
                        receipt.output,
                    ),
                )
            except sqlite3.IntegrityError:
                return None
            items = []
            for target, payload in reports:
                row = conn.execute(
                    "INSERT INTO outbox (target, payload, created_at) VALUES (?, ?, ?)",
                    (target, json.dumps(payload), now),
                )
                items.append(OutboxItem(row.lastrowid or 0, target, payload))
            return cursor.lastrowid or 0, items

        result = await self.db.write(write)
        if result is None:
            stored = await self.get(receipt.command_id)
            assert stored is not None
            return stored, []
        receipt.sequence = result[0]
        return receipt, result[1]

    async def get(self, command_id: str) -> Receipt | None:
        row = await self.db.fetchone(
            "SELECT seq, body, output FROM receipts WHERE command_id = ?", (command_id,)
        )
        return None if row is None else Receipt.from_json(row[1], row[2], row[0])

    async def page(self, *, session_id: str, agent_id: str, after: int, size: int) -> list[Receipt]:
        clauses, params = ["seq > ?"], [after]
        if session_id:
            clauses.append("session_id = ?")
            params.append(session_id)
        if agent_id:
            clauses.append("agent_id = ?")
            params.append(agent_id)
        rows = await self.db.fetchall(
            f"SELECT seq, body, output FROM receipts WHERE {' AND '.join(clauses)} "
            "ORDER BY seq LIMIT ?",
            (*params, size),
        )
        return [Receipt.from_json(body, output, seq) for seq, body, output in rows]

    async def pending_reports(self) -> list[OutboxItem]:
        rows = await self.db.fetchall("SELECT id, target, payload FROM outbox ORDER BY id")
        return [OutboxItem(i, t, json.loads(p)) for i, t, p in rows]

    async def delete_reports(self, ids: Sequence[int]) -> None:
        if ids:
            marks = ",".join("?" * len(ids))
            await self.db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", list(ids))


class Outbox:
    """Delivers stored reports in the background. One lane per target sends a
    bounded batch at a time. A report that fails is retried on its own
    exponential backoff, so one report the receiver keeps refusing for now
    never holds up the others; a batch that fails entirely means the receiver
    is away, and the lane pauses with its own backoff instead of hammering it.
    A report leaves the database only once delivered (or refused for good)."""

    def __init__(
        self,
        store: ReceiptStore,
        reporter: Reporter,
        *,
        batch: int = 32,
        base_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        linger_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.reporter = reporter
        self.batch = batch
        # After a quiet spell, wait this long for more reports to share a batch.
        self.linger_s = linger_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self.queues: dict[str, deque[OutboxItem]] = {"trust": deque(), "registry": deque()}
        # Reports waiting out their backoff: (due, id, item) heaps per lane.
        self.delayed: dict[str, list[tuple[float, int, OutboxItem]]] = {
            target: [] for target in self.queues
        }
        self._wake = {target: asyncio.Event() for target in self.queues}
        self._tasks: list[asyncio.Task[None]] = []
        self._empty = asyncio.Event()
        self._empty.set()
        self._sending = 0
        self.delivered = 0
        self.dropped = 0
        self.retries = 0

    def pending(self) -> int:
        """Reports not yet delivered: queued, waiting to retry or being sent."""
        return (
            sum(len(q) for q in self.queues.values())
            + sum(len(d) for d in self.delayed.values())
            + self._sending
        )

    def add(self, items: Iterable[OutboxItem]) -> None:
        for item in items:
            self.queues[item.target].append(item)
            self._wake[item.target].set()
            self._empty.clear()

    async def start(self) -> None:
        self.add(await self.store.pending_reports())
        for target in self.queues:
            self._tasks.append(asyncio.create_task(self._lane(target), name=f"outbox-{target}"))

    async def stop(self, *, flush_s: float = 1.0) -> None:
        """Gives pending reports ``flush_s`` to go out; the rest stay stored."""
        if self.pending():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), flush_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _backoff(self, tries: int) -> float:
        return min(self.base_backoff_s * 2 ** max(tries - 1, 0), self.max_backoff_s)

    def _next_batch(self, target: str) -> list[OutboxItem]:
        """Retries that are due first, then fresh reports, up to a batch."""
        delayed, queue = self.delayed[target], self.queues[target]
        now = self._clock()
        batch: list[OutboxItem] = []
        while delayed and delayed[0][0] <= now and len(batch) < self.batch:
            batch.append(heapq.heappop(delayed)[2])
        while queue and len(batch) < self.batch:
            batch.append(queue.popleft())
        return batch

    async def _lane(self, target: str) -> None:
        wake = self._wake[target]
        pause = self.base_backoff_s
        while True:
            batch = self._next_batch(target)
            if not batch:
                if not self.pending():
                    self._empty.set()
                delayed = self.delayed[target]
                wake.clear()
                timeout = max(delayed[0][0] - self._clock(), 0.0) if delayed else None
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    continue
                if self.linger_s:
                    await asyncio.sleep(self.linger_s)
                continue
            self._sending += len(batch)
            try:
                retry, away = await self._send_batch(batch)
            finally:
                self._sending -= len(batch)
            now = self._clock()
            for item in retry:
                heapq.heappush(
                    self.delayed[target], (now + self._backoff(item.tries), item.id, item)
                )
            self.retries += len(retry)
            if away and len(retry) == len(batch):
                # Nothing got through and the receiver itself is unreachable:
                # wait before trying again rather than spin through fresh
                # reports. (A report refused for now on its own merits, such
                # as an agent the registry does not know yet, waits alone.)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.max_backoff_s)
            else:
                pause = self.base_backoff_s

    async def _send_batch(self, batch: list[OutboxItem]) -> tuple[list[OutboxItem], bool]:
        """Sends one batch and clears what is finished; returns what to retry
        and whether the receiver looked unreachable."""
        results: list[Any] | None = None
        if len(batch) > 1 and self.reporter.batches(batch[0].target):
            results = await self._deliver_together(batch)
        if results is None:
            results = await asyncio.gather(
                *(self._deliver(item) for item in batch), return_exceptions=True
            )
        done: list[int] = []
        retry: list[OutboxItem] = []
        away = False
        for item, result in zip(batch, results, strict=True):
            if result is True:
                done.append(item.id)
            elif isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            else:
                retry.append(item)
                away = away or result == "away"
        if done:
            try:
                await self.store.delete_reports(done)
            except Exception:
                # Delivered but still stored: they may go out again after a
                # restart, which the receivers' request_id makes harmless.
                log.exception("could not clear %d delivered reports", len(done))
        return retry, away

    async def _deliver_together(self, batch: list[OutboxItem]) -> list[Any] | None:
        """Delivers a batch in one call; None when the receiver refused it,
        so each report goes on its own and a bad one cannot sink the rest."""
        for item in batch:
            item.tries += 1
        try:
            await self.reporter.send_many(batch[0].target, [item.payload for item in batch])
        except ReportRejected as exc:
            log.info("batch of %d refused (%s); delivering one by one", len(batch), exc)
            for item in batch:
                item.tries -= 1
            return None
        except ReportRetry as exc:
            return ["away" if exc.limit is None else "later"] * len(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch of %d to %s failed unexpectedly", len(batch), batch[0].target)
            return ["later"] * len(batch)
        self.delivered += len(batch)
        return [True] * len(batch)

    async def _deliver(self, item: OutboxItem) -> bool | str:
        """True when the item is finished with (delivered or dropped);
        otherwise "away" (the receiver is unreachable) or "later" (this
        report is refused for now)."""
        item.tries += 1
        try:
            await self.reporter.send(item.target, item.payload)
        except ReportRejected as exc:
            self.dropped += 1
            log.warning("report %d to %s refused; dropped: %s", item.id, item.target, exc)
            return True
        except ReportRetry as exc:
            if exc.limit is None:
                log.debug("report %d to %s deferred: %s", item.id, item.target, exc)
                return "away"
            item.limit = exc.limit if item.limit is None else item.limit
            if item.tries >= item.limit:
                self.dropped += 1
                log.warning(
                    "report %d to %s failed %d times; dropped: %s",
                    item.id,
                    item.target,
                    item.tries,
                    exc,
                )
                return True
            return "later"
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("report %d to %s failed unexpectedly; will retry", item.id, item.target)
            return "later"
        self.delivered += 1
        return True


# --- the broker ----------------------------------------------------------------------


# Answers that are not the agent's fault: it only pushed back (busy), or it
# refused the caller's malformed arguments before running anything.
NOT_THE_AGENTS_FAULT = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"})


def _outcome_of(record: AttemptRecord, answer: AgentAnswer | None) -> tuple[int, float] | None:
    """The trust outcome (kind, duration_ms) of one attempt; None for an
    answer that is not the agent's fault (NOT_THE_AGENTS_FAULT)."""
    if record.result == "OK":
        if answer is not None and answer.success:
            return SUCCESS, answer.duration_ms
        return COMPLETE_FAILURE, 0.0
    if record.result in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return TIMEOUT, 0.0
    if record.result in NOT_THE_AGENTS_FAULT:
        return None
    return COMPLETE_FAILURE, 0.0


class Broker:
    def __init__(
        self,
        settings: BrokerSettings,
        identity: Identity,
        directory: Directory,
        caller: AgentCaller,
        store: ReceiptStore,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if identity.signer_id != settings.broker_id:
            raise ValueError("the broker's identity must be named by its broker_id")
        self.settings = settings
        self.identity = identity
        self.directory = directory
        self.caller = caller
        self.store = store
        self.outbox = outbox
        self.router = Router(clock)
        self._clock = clock
        self._cache: dict[tuple[str, str, int], tuple[float, list[Candidate], int]] = {}
        self._pending: dict[str, asyncio.Task[tuple[Receipt, bool]]] = {}
        self.executions = 0

    # --- candidates ---------------------------------------------------------------

    async def _candidates(self, capability: str, strategy: Strategy) -> list[Candidate]:
        order = _ORDER[strategy]
        limit = (
            self.settings.candidates
            if strategy in (Strategy.MIN_LATENCY, Strategy.MAX_RELIABILITY, Strategy.BEST_FIT)
            else ALL_PASSING
        )
        key = (capability, order, limit)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.settings.candidate_ttl_s:
            candidates, total = cached[1], cached[2]
        else:
            usable = cached is not None and now - cached[0] <= self.settings.stale_candidates_s
            try:
                candidates, total = await self.directory.candidates(
                    capability, order, limit, patient=not usable
                )
                self._cache[key] = (now, candidates, total)
            except DirectoryUnavailable as exc:
                if cached is None or now - cached[0] > self.settings.stale_candidates_s:
                    raise Unavailable(
                        f"the registry is unreachable and no recent list of {capability!r} "
                        f"agents is cached: {exc}",
                        reason="REGISTRY_UNAVAILABLE",
                    ) from None
                log.warning(
                    "registry unreachable; routing %s from a %.1fs old list",
                    capability,
                    now - cached[0],
                )
                candidates, total = cached[1], cached[2]
        if total == 0:
            raise NotFound(
                f"no agent holds capability {capability!r}",
                field="capability",
                reason="UNKNOWN_CAPABILITY",
                metadata={"capability": capability},
            )
        if not candidates:
            raise Unavailable(
                f"no passing agent for capability {capability!r}: {total} registered, none passing",
                reason="NO_PASSING_AGENT",
                metadata={"capability": capability, "registered": str(total)},
            )
        return candidates

    async def _pinned(self, capability: str, agent_id: str) -> list[Candidate]:
        """The one agent a pinned command must run on, if it can run it now."""
        try:
            found = await self.directory.agent(agent_id)
        except DirectoryUnavailable as exc:
            raise Unavailable(
                f"the registry is unreachable, so agent {agent_id!r} cannot be looked up: {exc}",
                reason="REGISTRY_UNAVAILABLE",
            ) from None
        if found is None:
            raise NotFound(
                f"agent {agent_id!r} is not registered",
                field="agent_id",
                reason="UNKNOWN_AGENT",
                metadata={"agent_id": agent_id},
            )
        candidate, status, capabilities = found
        if capability not in capabilities:
            raise FailedPrecondition(
                f"agent {agent_id!r} does not hold capability {capability!r}",
                field="agent_id",
                reason="AGENT_LACKS_CAPABILITY",
                metadata={"agent_id": agent_id, "capability": capability},
            )
        if status != PASSING:
            raise FailedPrecondition(
                f"agent {agent_id!r} is not passing its health checks; it cannot run commands now",
                field="agent_id",
                reason="AGENT_NOT_PASSING",
                metadata={"agent_id": agent_id, "status": str(status)},
            )
        return [candidate]

    # --- route ---------------------------------------------------------------------

    async def route(
        self, capability: str, strategy: Strategy, exclude: Iterable[str] = ()
    ) -> RouteDecision:
        require_capability(capability, "capability")
        excluded = [require_id(e, f"exclude_agent_ids[{i}]") for i, e in enumerate(exclude)]
        candidates = await self._candidates(capability, strategy)
        ranking = self.router.rank(strategy, capability, candidates, excluded)
        if not ranking:
            raise Unavailable(
                f"no passing agent for capability {capability!r} outside the excluded ones",
                reason="NO_PASSING_AGENT",
                metadata={"capability": capability},
            )
        return RouteDecision(
            strategy,
            ranking[0],
            self.router.explain(strategy, capability, ranking),
            ranking[:RANKING_SHOWN],
        )

    # --- execute -------------------------------------------------------------------

    def validate_deadline(self, deadline_s: float | None, call_remaining_s: float | None) -> float:
        s = self.settings
        if deadline_s is None:
            budget = s.default_deadline_s
        else:
            require_finite(deadline_s, "deadline")
            if deadline_s < 0:
                raise InvalidArgument(
                    f"deadline must not be negative, got {deadline_s}s",
                    field="deadline",
                    reason="OUT_OF_RANGE",
                )
            if deadline_s < s.min_deadline_s:
                raise InvalidArgument(
                    f"deadline {deadline_s * 1000:.1f} ms is too short; at least "
                    f"{s.min_deadline_s * 1000:.0f} ms",
                    field="deadline",
                    reason="DEADLINE_TOO_SHORT",
                )
            if deadline_s > s.max_deadline_s:
                raise InvalidArgument(
                    f"deadline {deadline_s:.0f}s is longer than the {s.max_deadline_s:.0f}s allowed",
                    field="deadline",
                    reason="OUT_OF_RANGE",
                )
            budget = deadline_s
        if call_remaining_s is not None:
            budget = min(budget, call_remaining_s)
        return budget

    async def execute(
        self,
        *,
        capability: str,
        args: Sequence[str],
        session_id: str = "",
        strategy: Strategy = Strategy.BEST_FIT,
        deadline_s: float | None = None,
        call_remaining_s: float | None = None,
        request_id: str = "",
        max_attempts: int = 0,
        attempt_timeout_s: float | None = None,
        agent_id: str = "",
    ) -> tuple[Receipt, bool]:
        """Runs one command; returns (receipt, duplicate). ``agent_id`` pins
        it to that agent (one attempt, no failover)."""
        require_capability(capability, "capability")
        if agent_id:
            require_id(agent_id, "agent_id")
        args = validate_args(args)
        optional_id(session_id, "session_id")
        if request_id:
            require_id(request_id, "request_id", max_len=MAX_REQUEST_ID_LEN)
        if max_attempts:
            require_int_range(max_attempts, "max_attempts", 1, MAX_ATTEMPTS_LIMIT)
        attempts = max_attempts or self.settings.max_attempts
        if attempt_timeout_s is not None:
            require_finite(attempt_timeout_s, "attempt_timeout", lo=0.0, lo_open=True)
        budget = self.validate_deadline(deadline_s, call_remaining_s)
        if request_id:
            pending = self._pending.get(request_id)
            if pending is None:
                stored = await self.store.get(request_id)
                if stored is not None:
                    return stored, True
                pending = self._pending.get(request_id)  # it may have started meanwhile
            if pending is not None:
                receipt, _ = await asyncio.shield(pending)
                return receipt, True
        command_id = request_id or f"cmd-{uuid.uuid4().hex}"
        # The execution runs in its own task: a client that hangs up does not
        # cancel a command an agent is already running, and its receipt is
        # still recorded (a retry with the same request_id then finds it).
        task = asyncio.create_task(
            self._execute(
                command_id=command_id,
                capability=capability,
                args=args,
                session_id=session_id,
                strategy=strategy,
                budget_s=budget,
                attempts=attempts,
                attempt_timeout_s=attempt_timeout_s,
                pinned=agent_id,
            ),
            name=f"execute-{command_id}",
        )
        self._pending[command_id] = task
        task.add_done_callback(lambda t: self._finished(command_id, t))
        return await asyncio.shield(task)

    def _finished(self, command_id: str, task: asyncio.Task[tuple[Receipt, bool]]) -> None:
        self._pending.pop(command_id, None)
        if task.cancelled():
            return
        # Retrieved here, so a command whose caller hung up does not warn;
        # callers still get it through their own await. A non-domain error
        # is a bug: say so even when nobody is waiting.
        exc = task.exception()
        if exc is not None and not isinstance(exc, DomainError):
            log.error("command %s failed unexpectedly", command_id, exc_info=exc)

    async def drain(self, timeout_s: float) -> int:
        """Waits up to ``timeout_s`` for commands still running (e.g. whose
        caller hung up) so their receipts are stored; returns how many were
        still running after that."""
        pending = list(self._pending.values())
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        return len(still)

    async def _execute(
        self,
        *,
        command_id: str,
        capability: str,
        args: list[str],
        session_id: str,
        strategy: Strategy,
        budget_s: float,
        attempts: int,
        attempt_timeout_s: float | None,
        pinned: str = "",
    ) -> tuple[Receipt, bool]:
        deadline = self._clock() + budget_s
        if pinned:
            candidates = await self._pinned(capability, pinned)
            attempts = 1
        else:
            candidates = await self._candidates(capability, strategy)
        start_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        log_: list[AttemptRecord] = []
        tried: list[str] = []
        answer: AgentAnswer | None = None
        answered_by: Candidate | None = None
        for attempt in range(attempts):
            remaining = deadline - self._clock() - PERSIST_RESERVE_S
            if remaining <= 0:
                break
            ranking = self.router.rank(strategy, capability, candidates, tried)
            if not ranking:
                break
            candidate = ranking[0].candidate
            tried.append(candidate.agent_id)
            if strategy is Strategy.ROUND_ROBIN and not pinned:
                self.router.took_turn(capability, candidate.agent_id)
            timeout = attempt_timeout_s or remaining / (attempts - attempt)
            timeout = min(timeout, remaining)
            record, got = await self._attempt(
                candidate, command_id, session_id, capability, args, timeout
            )
            log_.append(record)
            if record.result in FAILOVER_RESULTS:
                if record.result == "UNAVAILABLE":
                    self.router.suspect(candidate.agent_id, self.settings.suspect_s)
                continue
            answer, answered_by = got, candidate
            break
        if not log_:
            raise DeadlineExceeded(
                f"the deadline ({budget_s * 1000:.0f} ms) passed before any agent could be tried",
                reason="DEADLINE_EXCEEDED",
            )
        finish_ns = start_ns + max(time.perf_counter_ns() - t0, 1)
        receipt = self._receipt(
            command_id,
            session_id,
            capability,
            args,
            strategy,
            start_ns,
            finish_ns,
            log_,
            answer,
            answered_by,
        )
        receipt.broker_signature = self.identity.sign(*receipt.statement())
        stored, items = await self.store.save(receipt, self._reports(receipt, candidates))
        self.outbox.add(items)
        self.executions += 1
        return stored, stored is not receipt

    async def _attempt(
        self,
        candidate: Candidate,
        command_id: str,
        session_id: str,
        capability: str,
        args: list[str],
        timeout_s: float,
    ) -> tuple[AttemptRecord, AgentAnswer | None]:
        router = self.router
        router.inflight[candidate.agent_id] = router.inflight.get(candidate.agent_id, 0) + 1
        t0 = time.perf_counter()
        try:
            answer = await self.caller.execute(
                candidate,
                command_id=command_id,
                session_id=session_id,
                capability=capability,
                args=args,
                timeout_s=timeout_s,
            )
        except AttemptFailed as exc:
            elapsed = (time.perf_counter() - t0) * 1000
            return (
                AttemptRecord(
                    candidate.agent_id,
                    candidate.address,
                    exc.result,
                    exc.message[:MAX_ERROR_LEN],
                    elapsed,
                ),
                None,
            )
        finally:
            left = router.inflight.get(candidate.agent_id, 1) - 1
            if left > 0:
                router.inflight[candidate.agent_id] = left
            else:
                router.inflight.pop(candidate.agent_id, None)
        elapsed = (time.perf_counter() - t0) * 1000
        if not answer.signature_valid:
            return (
                AttemptRecord(
                    candidate.agent_id,
                    candidate.address,
                    "BAD_SIGNATURE",
                    "the agent's receipt signature does not verify with the key it registered",
                    elapsed,
                ),
                answer,
            )
        expected = (command_id, session_id, candidate.agent_id, capability)
        got = (answer.command_id, answer.session_id, answer.agent_id, answer.capability)
        if got != expected:
            return (
                AttemptRecord(
                    candidate.agent_id,
                    candidate.address,
                    "MISMATCHED_RECEIPT",
                    f"the agent's receipt is for {got}, not {expected}",
                    elapsed,
                ),
                answer,
            )
        return AttemptRecord(
            candidate.agent_id, candidate.address, "OK", answer.error, elapsed
        ), answer

    def _receipt(
        self,
        command_id: str,
        session_id: str,
        capability: str,
        args: list[str],
        strategy: Strategy,
        start_ns: int,
        finish_ns: int,
        attempt_log: list[AttemptRecord],
        answer: AgentAnswer | None,
        answered_by: Candidate | None,
    ) -> Receipt:
        last = attempt_log[-1]
        verified = last.result == "OK" and answer is not None
        if verified:
            assert answer is not None
            success, error = answer.success, answer.error
        elif answer is not None:
            success, error = False, f"{last.result}: {last.error}"
        elif last.result == "INVALID_ARGUMENT":
            success, error = False, f"{last.agent_id} refused the arguments: {last.error}"
        else:
            success = False
            error = "no agent answered: " + "; ".join(
                f"{a.agent_id} {a.result} ({a.error})" for a in attempt_log
            )
        return Receipt(
            command_id=command_id,
            session_id=session_id,
            agent_id=last.agent_id,
            capability=capability,
            start_ns=start_ns,
            finish_ns=finish_ns,
            duration_ms=(finish_ns - start_ns) / 1e6,
            success=success,
            error=error[:MAX_ERROR_LEN],
            attempts=len(attempt_log),
            output_digest=answer.output_digest if verified and answer else b"",
            args_digest=args_digest(args),
            strategy=int(strategy),
            attempt_log=attempt_log,
            agent=answer,
            agent_public_key=answered_by.public_key if answered_by else b"",
            broker_id=self.identity.signer_id,
            broker_public_key=self.identity.public_key,
            output=answer.output if verified and answer and answer.success else "",
        )

    def _reports(
        self, receipt: Receipt, candidates: list[Candidate]
    ) -> list[tuple[str, dict[str, Any]]]:
        """One trust observation and one registry outcome per attempt."""
        reports: list[tuple[str, dict[str, Any]]] = []
        for n, record in enumerate(receipt.attempt_log, start=1):
            answer = receipt.agent if n == len(receipt.attempt_log) else None
            outcome = _outcome_of(record, answer)
            if outcome is None:
                continue
            kind, duration_ms = outcome
            request_id = f"{receipt.command_id}.a{n}"
            observe_ns = receipt.finish_ns
            reports.append(
                (
                    "trust",
                    {
                        "observer_id": receipt.broker_id,
                        "subject_id": record.agent_id,
                        "capability": receipt.capability,
                        "kind": kind,
                        "duration_ms": duration_ms,
                        "observe_ns": observe_ns,
                        "request_id": request_id,
                    },
                )
            )
            reports.append(
                (
                    "registry",
                    {
                        "agent_id": record.agent_id,
                        "success": kind == SUCCESS,
                        "latency_ms": record.duration_ms,
                        "request_id": request_id,
                    },
                )
            )
        return reports

    # --- receipts ------------------------------------------------------------------

    async def get_receipt(self, command_id: str) -> Receipt:
        require_id(command_id, "command_id")
        receipt = await self.store.get(command_id)
        if receipt is None:
            raise NotFound(
                f"no receipt for command {command_id!r}",
                field="command_id",
                reason="RECEIPT_NOT_FOUND",
            )
        return receipt

    async def list_receipts(
        self, *, session_id: str = "", agent_id: str = "", page_size: int, page_token: str = ""
    ) -> tuple[list[Receipt], str]:
        optional_id(session_id, "session_id")
        optional_id(agent_id, "agent_id")
        position = decode_page_token(page_token)
        after = position.get("after", 0)
        if (
            not isinstance(after, int)
            or after < 0
            or position.get("session", session_id) != session_id
            or position.get("agent", agent_id) != agent_id
        ):
            raise InvalidArgument(
                "page_token is not a token this service issued for these filters",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        rows = await self.store.page(
            session_id=session_id, agent_id=agent_id, after=after, size=page_size + 1
        )
        if len(rows) > page_size:
            rows = rows[:page_size]
            token = encode_page_token(
                {"after": rows[-1].sequence, "session": session_id, "agent": agent_id}
            )
            return rows, token
        return rows, ""


__all__ = [
    "AgentAnswer",
    "AgentCaller",
    "AttemptFailed",
    "AttemptRecord",
    "Broker",
    "BrokerSettings",
    "Candidate",
    "Directory",
    "DirectoryUnavailable",
    "Outbox",
    "OutboxItem",
    "Ranked",
    "Receipt",
    "ReceiptStore",
    "ReportRejected",
    "ReportRetry",
    "Reporter",
    "RouteDecision",
    "Router",
    "Strategy",
    "args_digest",
]
