"""Registry domain logic: membership, leases, health with hysteresis, the
capability index, fitness and the watch history. No grpc here.

Design notes
- Health (Consul-style checks): every heartbeat is a check, passed when its
  self-reported health is at least ``health_threshold``; every heartbeat
  interval that passes without one is a failed check. A passing agent turns
  WARNING at its first failed check and CRITICAL after
  ``failures_before_critical`` consecutive ones; it needs
  ``successes_before_passing`` consecutive passed checks to come back. No
  heartbeat for the lease TTL makes it CRITICAL at once. CRITICAL for
  ``deregister_critical_after_s`` removes it (an EXPIRED event).
- Index: per capability and per order (fitness, latency, reliability, load) a
  sorted list of (key, agent_id). Heartbeats only mark an agent dirty; a query
  first re-keys the dirty agents, so a flood of heartbeats costs O(1) each and
  a query costs O(dirty * log n + k), never a sort of all agents.
- Late agents are found from an LRU of last heartbeats (oldest first), and
  critical ones from an insertion-ordered map, so a sweep touches only the
  agents that are late or critical, not all of them.
- Watch index: a counter that starts at the wall clock in microseconds when the
  registry boots, so an index from a previous incarnation is always older than
  anything retained and the watcher is told to resync (OUT_OF_RANGE).
"""

from __future__ import annotations

import enum
import heapq
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedDict, SortedList, SortedSet

from services.common import crypto, signing
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    require_address,
    require_capabilities,
    require_capability,
    require_finite,
    require_id,
    require_int_range,
    require_metadata,
    require_unit_interval,
)

MAX_CONCURRENCY_LIMIT = 100_000
MAX_LOAD = 10_000_000
MAX_LATENCY_MS = 3_600_000.0


class Status(enum.IntEnum):
    """Values match agent2028.common.v1.HealthStatus."""

    PASSING = 1
    WARNING = 2
    CRITICAL = 3


class Order(enum.IntEnum):
    """Values match agent2028.registry.v1.Order."""

    FITNESS = 1
    LATENCY = 2
    RELIABILITY = 3
    LOAD = 4


class EventType(enum.IntEnum):
    """Values match agent2028.registry.v1.EventType."""

    REGISTERED = 1
    UPDATED = 2
    HEALTH_CHANGED = 3
    DEREGISTERED = 4
    EXPIRED = 5


def fitness(
    health: float,
    latency_ms: float,
    reliability: float,
    load: int,
    max_concurrency: int,
    *,
    latency_weight: float = 0.5,
    reliability_weight: float = 0.5,
    holds_capability: bool = True,
) -> float:
    """The guide's fitness score, with its bugs fixed: 0 for an agent without the
    capability, latency can never divide by zero or go negative, and spare
    capacity is clamped to [0, 1] (load above max_concurrency is no capacity,
    not negative capacity)."""
    if not holds_capability:
        return 0.0
    if max_concurrency < 1:
        raise InvalidArgument("max_concurrency must be >= 1", field="max_concurrency")
    latency_ms = max(latency_ms, 0.0)
    spare = min(max(1.0 - load / max_concurrency, 0.0), 1.0)
    return (
        0.3 * health
        + 0.3 * latency_weight / (1.0 + latency_ms / 100.0)
        + 0.2 * reliability_weight * reliability
        + 0.2 * spare
    )


@dataclass(frozen=True)
class RegistrySettings:
    lease_ttl_s: float = 10.0
    min_lease_ttl_s: float = 1.0
    max_lease_ttl_s: float = 3600.0
    heartbeat_interval_s: float = 2.0
    failures_before_critical: int = 3
    successes_before_passing: int = 2
    health_threshold: float = 0.5
    deregister_critical_after_s: float = 30.0
    clock_skew_s: float = 300.0
    reliability_prior: float = 0.9
    reliability_alpha: float = 0.2
    latency_alpha: float = 0.3
    watch_history: int = 10_000
    outcome_dedup: int = 100_000


class AgentRecord:
    """One registered agent. Mutable; ``snapshot()`` copies it for events."""

    __slots__ = (
        "address",
        "agent_id",
        "capabilities",
        "card_cache",
        "consecutive_failures",
        "consecutive_successes",
        "create_index",
        "health",
        "issue_ns",
        "keys",
        "last_heartbeat",
        "last_heartbeat_wall",
        "lease_id",
        "lease_ttl_s",
        "load",
        "max_concurrency",
        "measured_latency_ms",
        "metadata",
        "missed_counted",
        "modify_index",
        "outcomes",
        "public_key",
        "register_wall",
        "reliability",
        "reported_latency_ms",
        "status",
        "status_change_wall",
    )

    def __init__(self) -> None:
        self.keys: dict[str, dict[Order, tuple[Any, ...]]] = {}
        # Opaque to the core: the servicer keeps the wire form of the card
        # here. The core clears it whenever the card changes.
        self.card_cache: Any = None

    @property
    def latency_ms(self) -> float:
        return (
            self.measured_latency_ms
            if self.measured_latency_ms is not None
            else self.reported_latency_ms
        )

    @property
    def fitness(self) -> float:
        return fitness(
            self.health, self.latency_ms, self.reliability, self.load, self.max_concurrency
        )

    @property
    def load_ratio(self) -> float:
        return self.load / self.max_concurrency

    def score(self, order: Order) -> float:
        if order is Order.FITNESS:
            return self.fitness
        if order is Order.LATENCY:
            return self.latency_ms
        if order is Order.RELIABILITY:
            return self.reliability
        return self.load_ratio

    def index_key(self, order: Order) -> tuple[Any, ...]:
        if order is Order.FITNESS:
            return (-self.fitness, self.agent_id)
        if order is Order.LATENCY:
            return (self.latency_ms, self.agent_id)
        if order is Order.RELIABILITY:
            return (-self.reliability, self.agent_id)
        return (self.load_ratio, self.agent_id)

    def snapshot(self) -> AgentRecord:
        copy = AgentRecord()
        for name in AgentRecord.__slots__:
            if name != "keys":
                setattr(copy, name, getattr(self, name))
        return copy


@dataclass(frozen=True)
class Event:
    index: int
    type: EventType
    agent: AgentRecord
    previous_status: Status | None
    wall: float


class RegistryCore:
    """The registry's state machine. Not thread-safe; one event loop drives it."""

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        index_start: int | None = None,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self._clock = clock
        self._wall = wall_clock
        self.agents: SortedDict[str, AgentRecord] = SortedDict()
        self._members: dict[str, SortedSet[str]] = {}
        self._ordered: dict[str, dict[Order, SortedList[tuple[Any, ...]]]] = {}
        # Agents whose index keys may be stale: marked by heartbeats and
        # outcomes (O(1)), re-keyed lazily per list by _flush_dirty.
        self._dirty: set[str] = set()
        self._pending: dict[tuple[str, Order], set[str]] = {}
        self._by_last_seen: OrderedDict[str, None] = OrderedDict()
        self._critical_since: dict[str, float] = {}
        self.index = index_start if index_start is not None else int(self._wall() * 1_000_000)
        self._history: deque[Event] = deque(maxlen=self.settings.watch_history)
        self._listeners: list[Callable[[Event], None]] = []
        self._seen_requests: OrderedDict[str, AgentRecord | None] = OrderedDict()
        self._status_counts: dict[Status, int] = dict.fromkeys(Status, 0)
        self.heartbeats = 0

    # --- events -------------------------------------------------------------

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, type_: EventType, record: AgentRecord, previous: Status | None = None) -> Event:
        self.index += 1
        record.modify_index = self.index
        event = Event(self.index, type_, record.snapshot(), previous, self._wall())
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)
        return event

    def retained_events(self) -> list[Event]:
        """Every event still in the history, oldest first."""
        return list(self._history)

    def events_since(self, from_index: int) -> list[Event]:
        """Every retained event after ``from_index``; OUT_OF_RANGE when some
        were already dropped (watch again from 0)."""
        if from_index > self.index:
            raise OutOfRange(
                f"from_index {from_index} is ahead of the registry's index {self.index}",
                field="from_index",
                reason="INDEX_IN_FUTURE",
                metadata={"current_index": str(self.index)},
            )
        oldest_retained = self._history[0].index if self._history else self.index + 1
        if from_index < oldest_retained - 1 and from_index < self.index:
            raise OutOfRange(
                f"events after index {from_index} are no longer retained (oldest is {oldest_retained}); "
                "watch again from 0 for a fresh snapshot",
                field="from_index",
                reason="INDEX_COMPACTED",
                metadata={"oldest_index": str(oldest_retained), "current_index": str(self.index)},
            )
        return [e for e in self._history if e.index > from_index]

    # --- index --------------------------------------------------------------

    def _index_add(self, record: AgentRecord) -> None:
        for cap in record.capabilities:
            self._members.setdefault(cap, SortedSet()).add(record.agent_id)
            lists = self._ordered.setdefault(cap, {order: SortedList() for order in Order})
            keys = {}
            for order in Order:
                key = record.index_key(order)
                lists[order].add(key)
                keys[order] = key
            record.keys[cap] = keys

    def _index_remove(self, record: AgentRecord) -> None:
        for cap in record.capabilities:
            members = self._members.get(cap)
            if members is not None:
                members.discard(record.agent_id)
                if not members:
                    del self._members[cap]
            lists = self._ordered.get(cap)
            keys = record.keys.pop(cap, None)
            if lists is not None and keys is not None:
                for order, key in keys.items():
                    lists[order].discard(key)
                if cap not in self._members:
                    del self._ordered[cap]
            for order in Order:
                pending = self._pending.get((cap, order))
                if pending is not None:
                    pending.discard(record.agent_id)
        self._dirty.discard(record.agent_id)

    def _flush_dirty(self, capability: str, order: Order) -> None:
        """Re-keys, in the one list a query is about to read, the agents whose
        values changed. Changes are spread to per-(capability, order) pending
        sets first, so a list nobody reads is never maintained (lookups by
        fitness pay nothing for the latency, reliability and load lists)."""
        if self._dirty:
            for agent_id in self._dirty:
                record = self.agents.get(agent_id)
                if record is None:
                    continue
                for cap in record.capabilities:
                    for each in Order:
                        self._pending.setdefault((cap, each), set()).add(agent_id)
            self._dirty.clear()
        pending = self._pending.get((capability, order))
        if not pending:
            return
        ordered = self._ordered[capability][order]
        for agent_id in pending:
            record = self.agents.get(agent_id)
            keys = record.keys.get(capability) if record is not None else None
            if keys is None:  # removed, or no longer holds the capability
                continue
            new_key = record.index_key(order)  # type: ignore[union-attr]
            old_key = keys[order]
            if new_key != old_key:
                ordered.remove(old_key)
                ordered.add(new_key)
                keys[order] = new_key
        pending.clear()

    # --- registration -------------------------------------------------------

    def register(
        self,
        *,
        agent_id: str,
        address: str,
        capabilities: Iterable[str],
        max_concurrency: int,
        metadata: Mapping[str, str],
        public_key: bytes,
        issue_ns: int,
        proof: bytes,
        lease_ttl_s: float = 0.0,
    ) -> tuple[AgentRecord, bool]:
        """Registers a new agent or refreshes the caller's own registration.
        Returns (record, refreshed)."""
        s = self.settings
        require_id(agent_id, "card.agent_id")
        require_address(address, "card.address")
        caps = require_capabilities(capabilities, "card.capabilities")
        require_int_range(max_concurrency, "card.max_concurrency", 1, MAX_CONCURRENCY_LIMIT)
        meta = require_metadata(metadata, "card.metadata")
        if not crypto.valid_public_key(public_key):
            raise InvalidArgument(
                "card.public_key must be a 32-byte Ed25519 public key",
                field="card.public_key",
                reason="MALFORMED_PUBLIC_KEY",
            )
        if lease_ttl_s < 0:
            raise InvalidArgument("lease_ttl must not be negative", field="lease_ttl")
        ttl = min(max(lease_ttl_s or s.lease_ttl_s, s.min_lease_ttl_s), s.max_lease_ttl_s)
        self._check_fresh(issue_ns, "issue_time")
        if not proof:
            raise Unauthenticated(
                "proof_of_possession is required",
                field="proof_of_possession",
                reason="MISSING_SIGNATURE",
            )
        statement = signing.registration(
            agent_id, address, caps, max_concurrency, meta, public_key, issue_ns
        )
        if not crypto.verify(public_key, proof, *statement):
            raise Unauthenticated(
                "proof_of_possession does not verify with card.public_key",
                field="proof_of_possession",
                reason="BAD_SIGNATURE",
            )
        now, wall = self._clock(), self._wall()
        existing = self.agents.get(agent_id)
        if existing is not None:
            if existing.public_key != bytes(public_key):
                raise AlreadyExists(
                    f"agent {agent_id!r} is registered under another key",
                    field="card.agent_id",
                    reason="AGENT_ID_TAKEN",
                    metadata={"agent_id": agent_id},
                )
            if issue_ns <= existing.issue_ns:
                raise PermissionDenied(
                    "issue_time is not later than the current registration's; a replayed registration?",
                    field="issue_time",
                    reason="STALE_REGISTRATION",
                )
            return self._refresh(
                existing, address, caps, max_concurrency, meta, issue_ns, ttl, now, wall
            ), True
        record = AgentRecord()
        record.agent_id = agent_id
        record.address = address
        record.capabilities = tuple(caps)
        record.max_concurrency = max_concurrency
        record.metadata = meta
        record.public_key = bytes(public_key)
        record.issue_ns = issue_ns
        record.lease_id = secrets.token_hex(8)
        record.lease_ttl_s = ttl
        record.register_wall = wall
        record.last_heartbeat = now
        record.last_heartbeat_wall = wall
        record.status = Status.PASSING
        record.status_change_wall = wall
        record.health = 1.0
        record.reported_latency_ms = 0.0
        record.measured_latency_ms = None
        record.reliability = s.reliability_prior
        record.outcomes = 0
        record.load = 0
        record.consecutive_failures = 0
        record.consecutive_successes = 0
        record.missed_counted = 0
        self.agents[agent_id] = record
        self._status_counts[Status.PASSING] += 1
        self._by_last_seen[agent_id] = None
        self._index_add(record)
        record.create_index = self.index + 1
        self._emit(EventType.REGISTERED, record)
        return record, False

    def _refresh(
        self,
        record: AgentRecord,
        address: str,
        caps: list[str],
        max_concurrency: int,
        meta: dict[str, str],
        issue_ns: int,
        ttl: float,
        now: float,
        wall: float,
    ) -> AgentRecord:
        changed = (
            record.address != address
            or list(record.capabilities) != caps
            or record.max_concurrency != max_concurrency
            or record.metadata != meta
        )
        if changed:
            self._index_remove(record)
            record.card_cache = None
            record.address = address
            record.capabilities = tuple(caps)
            record.max_concurrency = max_concurrency
            record.metadata = meta
            self._index_add(record)
        record.issue_ns = issue_ns
        record.lease_id = secrets.token_hex(8)
        record.lease_ttl_s = ttl
        self._touch(record, now, wall)
        if changed:
            self._emit(EventType.UPDATED, record)
        self._check(record, passed=True)
        return record

    def deregister(self, agent_id: str, issue_ns: int, signature: bytes) -> int:
        """Removes an agent at its own signed request; returns the event index."""
        require_id(agent_id, "agent_id")
        record = self._get(agent_id)
        self._check_fresh(issue_ns, "issue_time")
        if not signature:
            raise Unauthenticated(
                "signature is required", field="signature", reason="MISSING_SIGNATURE"
            )
        if not crypto.verify(
            record.public_key, signature, *signing.deregistration(agent_id, issue_ns)
        ):
            raise Unauthenticated(
                "signature does not verify with the agent's registered key",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        if issue_ns <= record.issue_ns:
            raise PermissionDenied(
                "issue_time is older than the agent's registration; a replayed deregistration?",
                field="issue_time",
                reason="STALE_DEREGISTRATION",
            )
        self._remove(record, EventType.DEREGISTERED)
        return self.index

    def _remove(self, record: AgentRecord, type_: EventType) -> None:
        self._index_remove(record)
        self.agents.pop(record.agent_id, None)
        self._status_counts[record.status] -= 1
        self._by_last_seen.pop(record.agent_id, None)
        self._critical_since.pop(record.agent_id, None)
        self._emit(type_, record, record.status)

    def _check_fresh(self, issue_ns: int, field: str) -> None:
        skew = abs(self._wall() - issue_ns / 1e9)
        if skew > self.settings.clock_skew_s:
            raise InvalidArgument(
                f"{field} is {skew:.0f}s away from the registry's clock; at most "
                f"{self.settings.clock_skew_s:.0f}s allowed",
                field=field,
                reason="CLOCK_SKEW",
            )

    # --- heartbeats ---------------------------------------------------------

    def open_heartbeat(
        self, agent_id: str, lease_id: str, send_ns: int, signature: bytes
    ) -> AgentRecord:
        """Authenticates the first message of a heartbeat stream."""
        require_id(agent_id, "agent_id")
        record = self._lease(agent_id, lease_id)
        self._check_fresh(send_ns, "send_time")
        if not signature:
            raise Unauthenticated(
                "the first heartbeat of a stream must be signed",
                field="signature",
                reason="MISSING_SIGNATURE",
            )
        if not crypto.verify(
            record.public_key, signature, *signing.heartbeat_open(agent_id, lease_id, send_ns)
        ):
            raise Unauthenticated(
                "signature does not verify with the agent's registered key",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        return record

    def heartbeat(
        self, agent_id: str, lease_id: str, *, load: int, health: float, latency_ms: float
    ) -> AgentRecord:
        """One heartbeat on an authenticated stream. The hottest call of the
        registry: the common case (values in range, a passing agent) takes one
        comparison chain and no helper calls; anything else goes through the
        full validation, which names the bad field."""
        record = self.agents.get(agent_id)
        if record is None or record.lease_id != lease_id:
            record = self._lease(agent_id, lease_id)  # raises NOT_FOUND naming the field
        self.heartbeats += 1
        # NaN fails every comparison, so it takes the slow path too.
        if not (
            0 <= load <= MAX_LOAD and 0.0 <= health <= 1.0 and 0.0 <= latency_ms <= MAX_LATENCY_MS
        ):
            require_int_range(load, "load", 0, MAX_LOAD)
            require_unit_interval(health, "health")
            require_finite(latency_ms, "observed_latency_ms", lo=0.0, hi=MAX_LATENCY_MS)
        if (
            record.load != load
            or record.health != health
            or record.reported_latency_ms != latency_ms
        ):
            record.load = load
            record.health = health
            record.reported_latency_ms = latency_ms
            self._dirty.add(agent_id)
        record.last_heartbeat = self._clock()
        record.last_heartbeat_wall = self._wall()
        record.missed_counted = 0
        self._by_last_seen.move_to_end(agent_id)
        if health >= self.settings.health_threshold and record.status is Status.PASSING:
            record.consecutive_successes += 1
            record.consecutive_failures = 0
        else:
            self._check(record, passed=health >= self.settings.health_threshold)
        return record

    def _lease(self, agent_id: str, lease_id: str) -> AgentRecord:
        record = self.agents.get(agent_id)
        if record is None:
            raise NotFound(
                f"agent {agent_id!r} is not registered; register again",
                field="agent_id",
                reason="AGENT_NOT_FOUND",
            )
        if record.lease_id != lease_id:
            raise NotFound(
                f"lease {lease_id!r} is not agent {agent_id!r}'s current lease; register again",
                field="lease_id",
                reason="LEASE_NOT_FOUND",
            )
        return record

    def _touch(self, record: AgentRecord, now: float, wall: float) -> None:
        record.last_heartbeat = now
        record.last_heartbeat_wall = wall
        record.missed_counted = 0
        self._by_last_seen.move_to_end(record.agent_id)

    def _check(self, record: AgentRecord, *, passed: bool) -> bool:
        """Applies one check result; returns True when the status changed."""
        s = self.settings
        if passed:
            record.consecutive_successes += 1
            record.consecutive_failures = 0
            if (
                record.status is not Status.PASSING
                and record.consecutive_successes >= s.successes_before_passing
            ):
                return self._set_status(record, Status.PASSING)
            return False
        record.consecutive_failures += 1
        record.consecutive_successes = 0
        if record.consecutive_failures >= s.failures_before_critical:
            return self._set_status(record, Status.CRITICAL)
        if record.status is Status.PASSING:
            return self._set_status(record, Status.WARNING)
        return False

    def _set_status(self, record: AgentRecord, status: Status) -> bool:
        previous = record.status
        if previous is status:
            return False
        record.status = status
        self._status_counts[previous] -= 1
        self._status_counts[status] += 1
        record.status_change_wall = self._wall()
        if status is Status.CRITICAL:
            self._critical_since[record.agent_id] = self._clock()
        else:
            self._critical_since.pop(record.agent_id, None)
        self._dirty.add(record.agent_id)
        self._emit(EventType.HEALTH_CHANGED, record, previous)
        return True

    def sweep(self) -> None:
        """Counts missed heartbeats, expires leases and removes agents critical
        past the grace period. Touches only late and critical agents."""
        s = self.settings
        now = self._clock()
        interval = s.heartbeat_interval_s
        late_after = 1.5 * interval
        for agent_id in list(self._by_last_seen):
            record = self.agents[agent_id]
            elapsed = now - record.last_heartbeat
            if elapsed <= late_after:
                break  # everyone after this one heartbeated more recently
            if elapsed > record.lease_ttl_s:
                record.consecutive_successes = 0
                self._set_status(record, Status.CRITICAL)
                continue
            missed = int((elapsed - 0.5 * interval) / interval)
            while record.missed_counted < missed:
                record.missed_counted += 1
                self._check(record, passed=False)
        grace = s.deregister_critical_after_s
        for agent_id, since in list(self._critical_since.items()):
            if now - since < grace:
                break  # insertion order: later entries became critical later
            record = self.agents.get(agent_id)
            if record is not None:
                self._remove(record, EventType.EXPIRED)

    # --- measured outcomes --------------------------------------------------

    def report_outcome(
        self, agent_id: str, *, success: bool, latency_ms: float, request_id: str = ""
    ) -> AgentRecord:
        """Folds one measured execution into latency and reliability (EWMA).
        A repeated request_id is counted once."""
        require_id(agent_id, "agent_id")
        require_finite(latency_ms, "latency_ms", lo=0.0, hi=MAX_LATENCY_MS)
        if request_id:
            require_id(request_id, "request_id")
            if request_id in self._seen_requests:
                return self._get(agent_id)
        record = self._get(agent_id)
        s = self.settings
        record.reliability += s.reliability_alpha * ((1.0 if success else 0.0) - record.reliability)
        if record.measured_latency_ms is None:
            record.measured_latency_ms = latency_ms
        else:
            record.measured_latency_ms += s.latency_alpha * (
                latency_ms - record.measured_latency_ms
            )
        record.outcomes += 1
        self._dirty.add(agent_id)
        if request_id:
            self._seen_requests[request_id] = None
            if len(self._seen_requests) > s.outcome_dedup:
                self._seen_requests.popitem(last=False)
        return record

    # --- queries ------------------------------------------------------------

    def _get(self, agent_id: str) -> AgentRecord:
        record = self.agents.get(agent_id)
        if record is None:
            raise NotFound(
                f"agent {agent_id!r} is not registered",
                field="agent_id",
                reason="AGENT_NOT_FOUND",
                metadata={"agent_id": agent_id},
            )
        return record

    def get(self, agent_id: str) -> AgentRecord:
        require_id(agent_id, "agent_id")
        return self._get(agent_id)

    def find_by_capability(
        self,
        capability: str,
        *,
        order: Order = Order.FITNESS,
        top_k: int = 10,
        include_unhealthy: bool = False,
        latency_weight: float | None = None,
        reliability_weight: float | None = None,
    ) -> tuple[list[tuple[AgentRecord, float]], int]:
        """The top_k agents holding ``capability`` in ``order`` with their
        scores, and how many agents hold it."""
        require_capability(capability, "capability")
        require_int_range(top_k, "top_k", 1, 1000)
        custom = latency_weight is not None or reliability_weight is not None
        lw = require_finite(
            0.5 if latency_weight is None else latency_weight, "latency_weight", lo=0.0, hi=1.0
        )
        rw = require_finite(
            0.5 if reliability_weight is None else reliability_weight,
            "reliability_weight",
            lo=0.0,
            hi=1.0,
        )
        members = self._members.get(capability)
        if not members:
            return [], 0
        if custom and order is Order.FITNESS:
            candidates = (
                self.agents[a]
                for a in members
                if include_unhealthy or self.agents[a].status is Status.PASSING
            )
            scored = (
                (
                    fitness(
                        r.health,
                        r.latency_ms,
                        r.reliability,
                        r.load,
                        r.max_concurrency,
                        latency_weight=lw,
                        reliability_weight=rw,
                    ),
                    r,
                )
                for r in candidates
            )
            best = heapq.nsmallest(top_k, scored, key=lambda pair: (-pair[0], pair[1].agent_id))
            return [(r, score) for score, r in best], len(members)
        self._flush_dirty(capability, order)
        out: list[tuple[AgentRecord, float]] = []
        for key in self._ordered[capability][order]:
            record = self.agents[key[-1]]
            if not include_unhealthy and record.status is not Status.PASSING:
                continue
            out.append((record, record.score(order)))
            if len(out) >= top_k:
                break
        return out, len(members)

    def list_agents(
        self,
        *,
        page_size: int,
        page_token: str = "",
        capability: str = "",
        statuses: Iterable[Status] = (),
    ) -> tuple[list[AgentRecord], str, int]:
        """A page of agents ordered by id; returns (page, next_token, total)."""
        wanted = set(statuses)
        if capability:
            require_capability(capability, "capability")
            ids: Any = self._members.get(capability, SortedSet())
        else:
            ids = self.agents
        position = decode_page_token(page_token)
        after = position.get("after")
        if after is not None and not isinstance(after, str):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        iterator: Iterator[str] = (
            ids.irange(minimum=after, inclusive=(False, True)) if after else iter(ids)
        )
        page: list[AgentRecord] = []
        for agent_id in iterator:
            record = self.agents[agent_id]
            if wanted and record.status not in wanted:
                continue
            if len(page) == page_size:
                return (
                    page,
                    encode_page_token({"after": page[-1].agent_id}),
                    self._total(ids, wanted),
                )
            page.append(record)
        return page, "", self._total(ids, wanted)

    def _total(self, ids: Any, wanted: set[Status]) -> int:
        if not wanted:
            return len(ids)
        return sum(1 for a in ids if self.agents[a].status in wanted)

    def snapshot(self, capability: str = "") -> list[AgentRecord]:
        if capability:
            return [self.agents[a].snapshot() for a in self._members.get(capability, ())]
        return [r.snapshot() for r in self.agents.values()]

    def counts(self) -> dict[Status, int]:
        """Agents per health status (kept incrementally)."""
        return dict(self._status_counts)


__all__ = [
    "AgentRecord",
    "Event",
    "EventType",
    "Order",
    "RegistryCore",
    "RegistrySettings",
    "Status",
    "fitness",
]
