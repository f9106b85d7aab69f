"""The event bus's vocabulary: event types, type filters and the validation of
what publishers and subscribers send. Pure logic (no grpc, no I/O).

Types are dotted lowercase names, ``<namespace>.<name>``. The namespaces in
``RESERVED`` belong to the orchestrator: it publishes the types listed in
``CATALOG`` there, aggregated from the services' watch streams and from its
own work. Every other namespace is open to publishers (``app.deployed``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, PermissionDenied
from services.common.validation import optional_id, require_metadata, require_text

TYPE_RE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
NAMESPACE_RE = re.compile(r"[a-z][a-z0-9_]*")
MAX_TYPE_LEN = 64
MAX_FILTERS = 64
MAX_SUMMARY_LEN = 1000
MAX_SUBJECT_LEN = 256
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_LEN = 2048

# type -> (source, description)
CATALOG: dict[str, tuple[str, str]] = {
    "agent.joined": ("registry", "an agent registered"),
    "agent.updated": ("registry", "an agent registered again with a changed card"),
    "agent.degraded": ("registry", "an agent's health turned warning"),
    "agent.failed": ("registry", "an agent's health turned critical"),
    "agent.recovered": ("registry", "an agent's health is passing again"),
    "agent.left": ("registry", "an agent deregistered"),
    "agent.expired": ("registry", "an agent critical for too long was removed"),
    "trust.changed": ("trust", "an observation or a decay moved a trust edge"),
    "consensus.proposed": ("consensus", "an operation was proposed to an electorate"),
    "consensus.vote": ("consensus", "a signed vote was recorded"),
    "consensus.equivocation": ("consensus", "a voter signed both choices; its votes are out"),
    "consensus.reached": ("consensus", "a proposal was approved (with a quorum certificate)"),
    "consensus.rejected": ("consensus", "a proposal's quorum became unreachable"),
    "consensus.expired": ("consensus", "a proposal's deadline passed undecided"),
    "market.task_listed": ("market", "a task was listed for bids"),
    "market.bid_placed": ("market", "an agent bid on a task"),
    "market.auction_won": ("market", "an auction assigned a task to its winner"),
    "market.task_completed": ("market", "a task was completed"),
    "market.task_failed": ("market", "an attempt of a task failed"),
    "market.task_expired": ("market", "a task's deadline passed before it was done"),
    "market.task_relisted": ("market", "a failed task opened for another attempt"),
    "swarm.pool_opened": ("swarm", "a voting pool opened"),
    "swarm.pool_decided": ("swarm", "a voting pool closed with a decision"),
    "swarm.pool_no_consensus": ("swarm", "a voting pool closed without reaching its threshold"),
    "hive.belief_set": ("swarm", "the hive mind's beliefs changed"),
    "hive.intention_added": ("swarm", "the hive mind gained an intention"),
    "hive.decision_adopted": ("swarm", "the hive mind adopted a pool's decision"),
    "stigmergy.layer_active": ("stigmergy", "a pheromone type appeared on the field"),
    "stigmergy.layer_updated": ("stigmergy", "a pheromone layer's total moved markedly"),
    "stigmergy.layer_faded": ("stigmergy", "a pheromone layer decayed to nothing"),
    "stigmergy.signal": ("orchestrator", "a signed deposit made through the orchestrator"),
    "operation.succeeded": ("orchestrator", "an operation did what it was asked"),
    "operation.failed": ("orchestrator", "an operation ran and failed"),
    "operation.rejected": ("orchestrator", "consensus rejected an operation; nothing ran"),
    "operation.expired": ("orchestrator", "an operation's proposal or task expired"),
    "operation.no_consensus": ("orchestrator", "a collective decision reached no threshold"),
    "operation.error": ("orchestrator", "an operation ended with an error status"),
    "tier.down": ("orchestrator", "a service stopped serving"),
    "tier.up": ("orchestrator", "a service is serving again"),
    "bridge.dispatched": ("orchestrator", "an auction's winner was sent its task via the broker"),
    "bridge.settled": ("orchestrator", "a signed receipt settled a market task"),
    "bridge.unsettled": ("orchestrator", "a dispatched task got no receipt that can settle it"),
    "bridge.adopted": ("orchestrator", "a decided pool became a hive-mind belief"),
}
RESERVED = frozenset(t.split(".", 1)[0] for t in CATALOG)


@dataclass(frozen=True, slots=True)
class Draft:
    """An event before the bus gives it a cursor."""

    type: str
    source: str
    subject: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    # Makes a replay (a restarted watch, a retried publish) count once.
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    cursor: int
    type: str
    source: str
    subject: str
    wall: float
    attributes: Mapping[str, str]
    summary: str
    request_id: str


def _check_type(value: str, field_name: str) -> str:
    require_text(value, field_name, max_len=MAX_TYPE_LEN)
    if not TYPE_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field_name} {value!r} must be a dotted lowercase name such as 'app.deployed'",
            field=field_name,
            reason="MALFORMED_EVENT_TYPE",
        )
    return value


def validate_publish(draft: Draft) -> Draft:
    """A publisher's event: a well-formed type outside the system namespaces
    and a payload (attributes, summary or both)."""
    _check_type(draft.type, "type")
    namespace = draft.type.split(".", 1)[0]
    if draft.type in CATALOG:
        raise PermissionDenied(
            f"type {draft.type!r} is published by the orchestrator only",
            field="type",
            reason="RESERVED_EVENT_TYPE",
        )
    if namespace in RESERVED:
        raise InvalidArgument(
            f"type {draft.type!r} is not an event type; namespace {namespace!r} is the "
            "orchestrator's (see ListEventTypes)",
            field="type",
            reason="UNKNOWN_EVENT_TYPE",
        )
    optional_id(draft.source, "source")
    require_text(draft.subject, "subject", max_len=MAX_SUBJECT_LEN, allow_empty=True)
    require_text(draft.summary, "summary", max_len=MAX_SUMMARY_LEN, allow_empty=True)
    require_metadata(
        draft.attributes,
        "attributes",
        max_entries=MAX_ATTRIBUTES,
        max_value_len=MAX_ATTRIBUTE_LEN,
    )
    optional_id(draft.request_id, "request_id")
    if not draft.attributes and not draft.summary:
        raise InvalidArgument(
            "an event needs a payload: attributes, a summary, or both",
            field="attributes",
            reason="EMPTY_PAYLOAD",
        )
    return draft


class TypeFilter:
    """Which event types a subscriber asked for: exact types, namespaces
    ("market.*") or everything ("*", or no filter at all)."""

    __slots__ = ("everything", "exact", "namespaces")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.namespaces: set[str] = set()
        patterns = list(patterns)
        self.everything = not patterns
        if len(patterns) > MAX_FILTERS:
            raise InvalidArgument(
                f"types holds {len(patterns)} filters; at most {MAX_FILTERS} allowed",
                field="types",
                reason="TOO_MANY_VALUES",
            )
        for i, pattern in enumerate(patterns):
            name = f"types[{i}]"
            if pattern == "*":
                self.everything = True
            elif pattern.endswith(".*"):
                namespace = pattern[:-2]
                if not NAMESPACE_RE.fullmatch(namespace) or len(pattern) > MAX_TYPE_LEN:
                    raise InvalidArgument(
                        f"{name} {pattern!r} must be a namespace such as 'market.*'",
                        field=name,
                        reason="MALFORMED_EVENT_TYPE",
                    )
                self.namespaces.add(namespace)
            else:
                _check_type(pattern, name)
                if pattern.split(".", 1)[0] in RESERVED and pattern not in CATALOG:
                    raise InvalidArgument(
                        f"{name} {pattern!r} is not an event type (see ListEventTypes)",
                        field=name,
                        reason="UNKNOWN_EVENT_TYPE",
                        metadata={"type": pattern},
                    )
                self.exact.add(pattern)

    def __call__(self, event_type: str) -> bool:
        if self.everything or event_type in self.exact:
            return True
        return bool(self.namespaces) and event_type.split(".", 1)[0] in self.namespaces
