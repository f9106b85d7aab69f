"""Orchestrator domain logic: operation kinds and the tier and services each
is routed to, the health of every service as the orchestrator sees it, and
the durable record of finished operations. No grpc here.

Design notes
- Routing is explicit: each operation kind names its tier and the services
  it goes through, in order. Before an operation starts, every one of them
  must be SERVING; otherwise it fails fast with UNAVAILABLE naming the first
  service that is not (a half-done operation is worse than none).
- A finished operation is kept by request_id with a fingerprint of what was
  asked: a retry with the same request gets the stored outcome, the same id
  for another request is ALREADY_EXISTS. Only outcomes are stored (succeeded,
  failed, rejected, ...); an operation that ended with an error status may be
  retried, and since every call it makes downstream carries a request id
  derived from its own, a retry finishes the work instead of repeating it.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.errors import AlreadyExists, InvalidArgument, Unavailable
from services.common.storage import Database
from services.common.validation import optional_id

MAX_REQUEST_ID_LEN = 80
DEFAULT_TIMEOUT_S = 30.0


class Tier(enum.IntEnum):
    """Values match agent2028.orchestrator.v1.Tier."""

    INDIVIDUAL = 1
    SWARM = 2


class Kind(enum.IntEnum):
    """Values match agent2028.orchestrator.v1.OperationKind."""

    EXECUTE = 1
    EXECUTE_WITH_CONSENSUS = 2
    COLLECTIVE_DECISION = 3
    ALLOCATE = 4
    SIGNAL = 5


class Status(enum.IntEnum):
    """Values match agent2028.orchestrator.v1.OperationStatus."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    REJECTED = 4
    EXPIRED = 5
    NO_CONSENSUS = 6


class Serving(enum.IntEnum):
    """Values match agent2028.orchestrator.v1.ServingStatus."""

    UNKNOWN = 1
    SERVING = 2
    NOT_SERVING = 3
    UNREACHABLE = 4


SERVICE_TIERS: dict[str, Tier] = {
    "registry": Tier.INDIVIDUAL,
    "broker": Tier.INDIVIDUAL,
    "consensus": Tier.INDIVIDUAL,
    "trust": Tier.INDIVIDUAL,
    "market": Tier.SWARM,
    "stigmergy": Tier.SWARM,
    "swarm": Tier.SWARM,
}


@dataclass(frozen=True, slots=True)
class Route:
    tier: Tier
    # Every service the kind needs, in the order it uses them.
    services: tuple[str, ...]


ROUTES: dict[Kind, Route] = {
    Kind.EXECUTE: Route(Tier.INDIVIDUAL, ("registry", "broker")),
    Kind.EXECUTE_WITH_CONSENSUS: Route(
        Tier.INDIVIDUAL, ("registry", "consensus", "broker", "trust")
    ),
    Kind.COLLECTIVE_DECISION: Route(Tier.SWARM, ("registry", "swarm")),
    Kind.ALLOCATE: Route(Tier.SWARM, ("registry", "market", "broker")),
    Kind.SIGNAL: Route(Tier.SWARM, ("registry", "stigmergy")),
}
# The field of SubmitRequest's oneof that carries each kind.
KIND_FIELDS: dict[str, Kind] = {
    "execute": Kind.EXECUTE,
    "execute_with_consensus": Kind.EXECUTE_WITH_CONSENSUS,
    "collective_decision": Kind.COLLECTIVE_DECISION,
    "allocate": Kind.ALLOCATE,
    "signal": Kind.SIGNAL,
}
STATUS_EVENTS: dict[Status, str] = {
    Status.SUCCEEDED: "operation.succeeded",
    Status.FAILED: "operation.failed",
    Status.REJECTED: "operation.rejected",
    Status.EXPIRED: "operation.expired",
    Status.NO_CONSENSUS: "operation.no_consensus",
}


def kind_of(field_name: str | None) -> Kind:
    """The kind a SubmitRequest carries; INVALID_ARGUMENT when none (an
    unset oneof, or a kind this orchestrator does not know)."""
    if field_name is None or field_name not in KIND_FIELDS:
        raise InvalidArgument(
            "operation must be one of: " + ", ".join(KIND_FIELDS),
            field="operation",
            reason="UNKNOWN_OPERATION_KIND",
        )
    return KIND_FIELDS[field_name]


def check_request_id(request_id: str) -> str:
    return optional_id(request_id, "request_id", max_len=MAX_REQUEST_ID_LEN)


@dataclass(slots=True)
class ServiceHealth:
    name: str
    address: str
    status: Serving = Serving.UNKNOWN
    since: float = 0.0
    detail: str = ""


class HealthTable:
    """The last known status of every service, fed by the health monitor."""

    def __init__(self, addresses: dict[str, str], clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.services = {
            name: ServiceHealth(name, address, since=clock()) for name, address in addresses.items()
        }

    def set(self, name: str, status: Serving, detail: str = "") -> bool:
        """Records a status; True when it changed."""
        health = self.services[name]
        health.detail = detail
        if health.status is status:
            return False
        health.status = status
        health.since = self._clock()
        return True

    def first_down(self, names: Iterable[str]) -> ServiceHealth | None:
        for name in names:
            health = self.services[name]
            if health.status is not Serving.SERVING:
                return health
        return None

    def require(self, kind: Kind) -> None:
        """UNAVAILABLE naming the first service ``kind`` needs that is not serving."""
        route = ROUTES[kind]
        down = self.first_down(route.services)
        if down is None:
            return
        raise Unavailable(
            f"{kind.name.lower()} needs {down.name} ({down.address}), which is "
            f"{down.status.name.lower().replace('_', ' ')}"
            + (f": {down.detail}" if down.detail else ""),
            reason="TIER_UNAVAILABLE",
            metadata={
                "service": down.name,
                "address": down.address,
                "status": down.status.name,
                "tier": route.tier.name,
                "operation": kind.name,
            },
        )


# --- finished operations --------------------------------------------------------------

OPERATIONS_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS operations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL UNIQUE,
        kind INTEGER NOT NULL,
        fingerprint BLOB NOT NULL,
        status INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS operations_kind ON operations(kind, seq)",
]


@dataclass(frozen=True, slots=True)
class StoredOperation:
    seq: int
    request_id: str
    kind: Kind
    fingerprint: bytes
    status: Status
    # The serialized agent2028.orchestrator.v1.Operation.
    payload: bytes


class OperationStore:
    """Finished operations by request_id, newest kept up to ``retention``."""

    def __init__(self, db: Database, *, retention: int = 100_000) -> None:
        self.db = db
        self.retention = retention

    async def save(
        self, request_id: str, kind: Kind, fingerprint: bytes, status: Status, payload: bytes
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO operations (request_id, kind, fingerprint, status, payload) "
                "VALUES (?,?,?,?,?)",
                (request_id, int(kind), fingerprint, int(status), payload),
            )
            conn.execute(
                "DELETE FROM operations WHERE seq <= (SELECT MAX(seq) FROM operations) - ?",
                (self.retention,),
            )

        await self.db.write(write)

    async def get(self, request_id: str) -> StoredOperation | None:
        row = await self.db.fetchone(
            "SELECT seq, request_id, kind, fingerprint, status, payload FROM operations "
            "WHERE request_id = ?",
            (request_id,),
        )
        return _stored(row) if row else None

    async def page(self, *, before: int, size: int, kind: Kind | None) -> list[StoredOperation]:
        """Newest first, with seq < before (0: from the newest)."""
        bound = before if before > 0 else 2**62
        if kind is None:
            rows = await self.db.fetchall(
                "SELECT seq, request_id, kind, fingerprint, status, payload FROM operations "
                "WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (bound, size),
            )
        else:
            rows = await self.db.fetchall(
                "SELECT seq, request_id, kind, fingerprint, status, payload FROM operations "
                "WHERE seq < ? AND kind = ? ORDER BY seq DESC LIMIT ?",
                (bound, int(kind), size),
            )
        return [_stored(r) for r in rows]


def _stored(row: tuple) -> StoredOperation:  # type: ignore[type-arg]
    return StoredOperation(
        seq=row[0],
        request_id=row[1],
        kind=Kind(row[2]),
        fingerprint=bytes(row[3]),
        status=Status(row[4]),
        payload=bytes(row[5]),
    )


def same_request(stored_fingerprint: bytes, fingerprint: bytes, request_id: str) -> None:
    """ALREADY_EXISTS when a request_id comes back with another request."""
    if stored_fingerprint != fingerprint:
        raise AlreadyExists(
            f"request_id {request_id!r} was already used for another operation",
            field="request_id",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )
