"""Swarm domain logic: voting pools and the hive mind. No grpc here (flocks are
in flock.py).

Voting pools (the guide's VotingProtocol)
- A pool has a topic, a threshold, a voting window (duration) and a minimum
  number of votes. Each registered agent has one vote per pool; a later vote by
  the same agent replaces its earlier one; an open pool takes votes until its
  close time, a closed one refuses them.
- Tally: every vote scores confidence * weight for its decision. The leading
  decision's confidence is its share of the total score (the guide's example:
  0.9 + 0.8 approve against 0.6 reject is ("approve", 1.7 / 2.3 = 0.739)).
- Status: DECIDED when at least min_votes were cast and the leader's share meets
  the threshold (SIMPLE_MAJORITY: more than 1/2; SUPER_MAJORITY: at least 2/3;
  UNANIMOUS: every vote chose the leader). While the pool is open that result
  stands but can still change with more votes; at the close time it becomes
  final. A pool that closes without meeting its threshold is NO_CONSENSUS;
  before that it is PENDING.
- Replays: votes are signed over (pool, agent, decision, confidence, weight,
  issue time). The same signed vote again is a harmless duplicate; a vote
  issued before the agent's current one in that pool is refused (ABORTED), so
  a replayed old vote can never overwrite a newer one.

The hive mind (the guide's HiveMind)
- Beliefs (name -> confidence in [0, 1], with who set them), intentions
  (deduplicated text) and decisions adopted from pools (topic -> decision).
- A generation counter goes up by one with every change, and only with a
  change: writing a belief with the confidence it already has, an intention
  already held, or adopting the same pool result twice changes nothing.
- Writes may carry the generation the writer last saw (compare-and-set): when
  the hive has moved on since, the write is ABORTED and nothing changes.
- UpdateFromVote(pool) adopts a DECIDED pool's result: the belief
  "<topic>:<decision>" takes the pool's confidence, replacing the belief an
  earlier vote on the same topic wrote, and the decision is recorded.
- Agents sign their writes; per agent, a write issued before its latest
  accepted one is refused (ABORTED) and the same signed write again is a
  duplicate, so replays change nothing.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from sortedcontainers import SortedDict

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    require_finite,
    require_id,
    require_text,
    require_unit_interval,
)

MAX_TOPIC_LEN = 64
MAX_DECISION_LEN = 64
MAX_BELIEF_NAME_LEN = MAX_TOPIC_LEN + 1 + MAX_DECISION_LEN
MAX_INTENTION_LEN = 256
MAX_WEIGHT = 1e6
MAX_DURATION_S = 366 * 86400.0
# Relative slack for the >= 2/3 comparison, so 2 of 3 equal votes meet it
# whatever the rounding of their sum.
_SUPER_MAJORITY_SLACK = 1e-12


class Threshold(enum.IntEnum):
    """Values match agent2028.swarm.v1.Threshold."""

    SIMPLE_MAJORITY = 1
    SUPER_MAJORITY = 2
    UNANIMOUS = 3


class PoolStatus(enum.IntEnum):
    """Values match agent2028.swarm.v1.PoolStatus."""

    PENDING = 1
    DECIDED = 2
    NO_CONSENSUS = 3


class HiveEventKind(enum.IntEnum):
    """Values match agent2028.swarm.v1.HiveEventKind."""

    BELIEF_SET = 1
    INTENTION_ADDED = 2
    DECISION_ADOPTED = 3


@dataclass(frozen=True)
class SwarmSettings:
    clock_skew_s: float = 300.0
    max_open_pools: int = 10_000
    max_votes_per_pool: int = 100_000
    # Closed pools are forgotten this long after they close.
    pool_retention_s: float = 7 * 86400.0
    # Bounded so the whole hive fits one GetHive answer (4 MiB) with room to spare.
    max_beliefs: int = 5_000
    max_intentions: int = 1_000
    hive_history: int = 10_000


# --- validation shared by the servicer and the core -------------------------------------


def require_topic(value: str, field: str = "topic") -> str:
    return require_id(value, field, max_len=MAX_TOPIC_LEN)


def require_decision(value: str, field: str = "decision") -> str:
    return require_id(value, field, max_len=MAX_DECISION_LEN)


def require_belief_name(value: str, field: str = "name") -> str:
    return require_id(value, field, max_len=MAX_BELIEF_NAME_LEN)


def require_intention(value: str, field: str = "intention") -> str:
    text = value.strip() if isinstance(value, str) else value
    require_text(text, field, max_len=MAX_INTENTION_LEN)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidArgument(
            f"{field} must not contain control characters",
            field=field,
            reason="MALFORMED_TEXT",
        )
    return text


def require_weight(value: float, field: str = "weight") -> float:
    return require_finite(value, field, lo=0.0, hi=MAX_WEIGHT)


def require_duration(seconds: float, field: str = "duration") -> float:
    require_finite(seconds, field)
    if seconds <= 0:
        raise InvalidArgument(
            f"{field} must be positive, got {seconds}s", field=field, reason="OUT_OF_RANGE"
        )
    if seconds > MAX_DURATION_S:
        raise InvalidArgument(
            f"{field} must be at most {MAX_DURATION_S:.0f}s, got {seconds}s",
            field=field,
            reason="OUT_OF_RANGE",
        )
    return seconds


def require_threshold(value: int, field: str = "threshold") -> Threshold:
    try:
        return Threshold(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} must be SIMPLE_MAJORITY, SUPER_MAJORITY or UNANIMOUS, got {value}",
            field=field,
            reason="UNKNOWN_ENUM_VALUE",
        ) from None


def check_skew(issue_ns: int, now_wall: float, skew_s: float, field: str = "issue_time") -> None:
    """Signed statements carry their issue time; one too far from our clock is
    refused, which bounds how long a captured statement can be replayed."""
    drift = abs(issue_ns / 1e9 - now_wall)
    if drift > skew_s:
        raise InvalidArgument(
            f"{field} is {drift:.0f}s away from the service's clock; at most {skew_s:.0f}s allowed",
            field=field,
            reason="CLOCK_SKEW",
        )


# --- voting pools ------------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    agent_id: str
    decision: str
    confidence: float
    weight: float
    issue_ns: int
    signature: bytes
    wall: float


@dataclass(frozen=True)
class Tally:
    decision: str
    score: float
    votes: int


@dataclass(frozen=True)
class Consensus:
    """A pool's result at one moment."""

    decision: str
    confidence: float
    status: PoolStatus
    closed: bool
    votes: int
    total_score: float
    tallies: tuple[Tally, ...]


@dataclass
class Pool:
    pool_id: str
    topic: str
    threshold: Threshold
    duration_s: float
    min_votes: int
    create_wall: float
    request_id: str = ""
    votes: dict[str, Vote] = field(default_factory=dict)

    @property
    def close_wall(self) -> float:
        return self.create_wall + self.duration_s

    def is_open(self, now_wall: float) -> bool:
        return now_wall < self.close_wall

    def consensus(self, now_wall: float) -> Consensus:
        scores: dict[str, float] = {}
        counts: dict[str, int] = {}
        for vote in self.votes.values():
            scores[vote.decision] = scores.get(vote.decision, 0.0) + vote.confidence * vote.weight
            counts[vote.decision] = counts.get(vote.decision, 0) + 1
        total = sum(scores.values())
        # Highest score first; equal scores by more votes, then by name, so the
        # order is deterministic.
        ranked = sorted(scores, key=lambda d: (-scores[d], -counts[d], d))
        tallies = tuple(Tally(d, scores[d], counts[d]) for d in ranked)
        closed = not self.is_open(now_wall)
        leader, share = "", 0.0
        if ranked and total > 0:
            top = scores[ranked[0]]
            tied = len(ranked) > 1 and scores[ranked[1]] == top
            share = top / total
            leader = "" if tied else ranked[0]
        met = False
        if leader:
            top = scores[leader]
            if self.threshold is Threshold.SIMPLE_MAJORITY:
                met = 2 * top > total
            elif self.threshold is Threshold.SUPER_MAJORITY:
                met = 3 * top >= 2 * total * (1 - _SUPER_MAJORITY_SLACK)
            else:
                met = counts[leader] == len(self.votes)
        if met and len(self.votes) >= self.min_votes:
            status = PoolStatus.DECIDED
        elif closed:
            status = PoolStatus.NO_CONSENSUS
        else:
            status = PoolStatus.PENDING
        return Consensus(
            decision=leader,
            confidence=share,
            status=status,
            closed=closed,
            votes=len(self.votes),
            total_score=total,
            tallies=tallies,
        )


@dataclass(frozen=True)
class VoteOutcome:
    pool: Pool
    vote: Vote
    replaced: Vote | None
    duplicate: bool


class Pools:
    """Every pool, by id (ids sort by creation time)."""

    def __init__(
        self,
        settings: SwarmSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or SwarmSettings()
        self._wall = wall_clock
        self.pools: SortedDict[str, Pool] = SortedDict()
        self._by_request: dict[str, str] = {}

    def now(self) -> float:
        return self._wall()

    def _new_id(self, wall: float) -> str:
        while True:
            pool_id = f"pool-{int(wall * 1e6):013x}-{secrets.token_hex(3)}"
            if pool_id not in self.pools:
                return pool_id

    def create(
        self,
        *,
        topic: str,
        threshold: int,
        duration_s: float,
        min_votes: int,
        request_id: str = "",
    ) -> tuple[Pool, bool]:
        """A new pool, or (for a repeated request_id) the pool it created;
        the flag is True when the pool is new."""
        require_topic(topic)
        threshold = require_threshold(threshold)
        require_duration(duration_s)
        if min_votes < 0:
            raise InvalidArgument(
                f"min_votes must not be negative, got {min_votes}",
                field="min_votes",
                reason="OUT_OF_RANGE",
            )
        if min_votes > self.settings.max_votes_per_pool:
            raise InvalidArgument(
                f"min_votes must be at most {self.settings.max_votes_per_pool}, got {min_votes}",
                field="min_votes",
                reason="OUT_OF_RANGE",
            )
        if request_id:
            require_id(request_id, "request_id")
            existing = self._by_request.get(request_id)
            if existing is not None and existing in self.pools:
                pool = self.pools[existing]
                if (pool.topic, pool.threshold, pool.duration_s, pool.min_votes) != (
                    topic,
                    threshold,
                    duration_s,
                    max(min_votes, 1),
                ):
                    raise AlreadyExists(
                        f"request_id {request_id!r} already created pool {pool.pool_id} "
                        "with other parameters",
                        field="request_id",
                        reason="REQUEST_ID_REUSED",
                    )
                return pool, False
        now = self.now()
        open_pools = sum(1 for p in self.pools.values() if p.is_open(now))
        if open_pools >= self.settings.max_open_pools:
            raise ResourceExhausted(
                f"{open_pools} pools are open; at most {self.settings.max_open_pools} allowed",
                reason="TOO_MANY_OPEN_POOLS",
            )
        pool = Pool(
            pool_id=self._new_id(now),
            topic=topic,
            threshold=threshold,
            duration_s=duration_s,
            min_votes=max(min_votes, 1),
            create_wall=now,
            request_id=request_id,
        )
        self.add(pool)
        return pool, True

    def add(self, pool: Pool) -> None:
        """Adds a pool as it is (creation, or loading from storage)."""
        self.pools[pool.pool_id] = pool
        if pool.request_id:
            self._by_request[pool.request_id] = pool.pool_id

    def get(self, pool_id: str, field: str = "pool_id") -> Pool:
        require_id(pool_id, field)
        pool = self.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"no pool {pool_id!r}", field=field, reason="POOL_NOT_FOUND")
        return pool

    def check_vote(
        self,
        pool_id: str,
        agent_id: str,
        decision: str,
        confidence: float,
        weight: float,
        issue_ns: int,
    ) -> Pool:
        """Validates a vote before its signature is checked (cheap checks first)."""
        require_id(agent_id, "agent_id")
        require_decision(decision)
        require_unit_interval(confidence, "confidence")
        require_weight(weight)
        check_skew(issue_ns, self.now(), self.settings.clock_skew_s)
        pool = self.get(pool_id)
        if not pool.is_open(self.now()):
            raise FailedPrecondition(
                f"pool {pool_id} closed at its deadline; it takes no more votes",
                field="pool_id",
                reason="POOL_CLOSED",
            )
        return pool

    def vote(
        self,
        pool_id: str,
        agent_id: str,
        decision: str,
        confidence: float,
        weight: float,
        issue_ns: int,
        signature: bytes,
    ) -> VoteOutcome:
        """Records a vote whose signature the caller has verified."""
        pool = self.check_vote(pool_id, agent_id, decision, confidence, weight, issue_ns)
        previous = pool.votes.get(agent_id)
        if previous is not None:
            if previous.signature == signature:
                return VoteOutcome(pool, previous, None, True)
            if issue_ns <= previous.issue_ns:
                raise Aborted(
                    f"agent {agent_id} already voted in {pool_id} with a vote issued later; "
                    "an older vote cannot replace it",
                    field="issue_time",
                    reason="SUPERSEDED_VOTE",
                )
        elif len(pool.votes) >= self.settings.max_votes_per_pool:
            raise ResourceExhausted(
                f"pool {pool_id} holds {len(pool.votes)} votes, its maximum",
                reason="TOO_MANY_VOTES",
            )
        vote = Vote(agent_id, decision, confidence, weight, issue_ns, bytes(signature), self.now())
        pool.votes[agent_id] = vote
        return VoteOutcome(pool, vote, previous, False)

    def list(
        self, *, page_size: int, page_token: str = "", open_only: bool = False
    ) -> tuple[list[Pool], str, int]:
        position = decode_page_token(page_token)
        after = position.get("after", "")
        if not isinstance(after, str):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        now = self.now()
        selected = [p for p in self.pools.values() if not open_only or p.is_open(now)]
        start = self.pools.bisect_right(after) if after else 0
        page: list[Pool] = []
        token = ""
        for pool_id in self.pools.islice(start):
            pool = self.pools[pool_id]
            if open_only and not pool.is_open(now):
                continue
            if len(page) == page_size:
                token = encode_page_token({"after": page[-1].pool_id})
                break
            page.append(pool)
        return page, token, len(selected)

    def list_votes(
        self, pool_id: str, *, page_size: int, page_token: str = ""
    ) -> tuple[list[Vote], str, int]:
        """A pool's votes ordered by agent id."""
        pool = self.get(pool_id)
        after = decode_page_token(page_token).get("after", "")
        if not isinstance(after, str):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        ordered = sorted(a for a in pool.votes if a > after)
        chunk = ordered[:page_size]
        token = encode_page_token({"after": chunk[-1]}) if len(ordered) > page_size else ""
        return [pool.votes[a] for a in chunk], token, len(pool.votes)

    def open_pools(self) -> list[Pool]:
        now = self.now()
        return [p for p in self.pools.values() if p.is_open(now)]

    def expired(self) -> list[Pool]:
        """Closed pools past their retention."""
        cutoff = self.now() - self.settings.pool_retention_s
        return [p for p in self.pools.values() if p.close_wall < cutoff]

    def forget(self, pool_ids: Iterable[str]) -> None:
        for pool_id in pool_ids:
            pool = self.pools.pop(pool_id, None)
            if pool is not None and pool.request_id:
                self._by_request.pop(pool.request_id, None)


# --- the hive mind ------------------------------------------------------------------------


@dataclass(frozen=True)
class Belief:
    name: str
    confidence: float
    # An agent id, or "pool:<pool id>" for a belief adopted from a vote.
    source: str
    generation: int
    wall: float


@dataclass(frozen=True)
class Intention:
    text: str
    source: str
    generation: int
    wall: float


@dataclass(frozen=True)
class Decision:
    topic: str
    decision: str
    confidence: float
    pool_id: str
    # False while the pool was still open when adopted (the result could change).
    final: bool
    generation: int
    wall: float

    @property
    def belief_name(self) -> str:
        return f"{self.topic}:{self.decision}"


@dataclass(frozen=True)
class HiveEvent:
    generation: int
    kind: HiveEventKind
    wall: float
    belief: Belief | None = None
    intention: Intention | None = None
    decision: Decision | None = None
    # A belief the change removed (an earlier vote's result on the same topic).
    removed_belief: str = ""


@dataclass(frozen=True)
class HiveWrite:
    """The outcome of one write: the event when something changed."""

    generation: int
    event: HiveEvent | None
    duplicate: bool = False
    # Replay guard state to persist with the change: (agent, issue_ns, signature).
    writer: tuple[str, int, bytes] | None = None


@dataclass
class HiveState:
    generation: int = 0
    beliefs: dict[str, Belief] = field(default_factory=dict)
    intentions: dict[str, Intention] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)


class Hive:
    """The collective state. Not thread-safe; one event loop drives it."""

    def __init__(
        self,
        settings: SwarmSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or SwarmSettings()
        self._wall = wall_clock
        self.state = HiveState()
        self.writers: dict[str, tuple[int, bytes]] = {}
        self.history: deque[HiveEvent] = deque(maxlen=self.settings.hive_history)
        self.listeners: list[Callable[[HiveEvent], None]] = []

    @property
    def generation(self) -> int:
        return self.state.generation

    # --- loading ----------------------------------------------------------------

    def load(
        self,
        generation: int,
        beliefs: Iterable[Belief],
        intentions: Iterable[Intention],
        decisions: Iterable[Decision],
        writers: Iterable[tuple[str, int, bytes]],
    ) -> None:
        self.state = HiveState(
            generation=generation,
            beliefs={b.name: b for b in beliefs},
            intentions={i.text: i for i in sorted(intentions, key=lambda i: i.generation)},
            decisions={d.topic: d for d in decisions},
        )
        self.writers = {agent: (ns, sig) for agent, ns, sig in writers}
        self.history.clear()

    # --- checks ------------------------------------------------------------------

    def _check_expected(self, expected_generation: int | None) -> None:
        if expected_generation is None:
            return
        if expected_generation < 0:
            raise InvalidArgument(
                f"expected_generation must not be negative, got {expected_generation}",
                field="expected_generation",
                reason="OUT_OF_RANGE",
            )
        if expected_generation != self.state.generation:
            raise Aborted(
                f"the hive is at generation {self.state.generation}, not {expected_generation}; "
                "read it again and retry",
                field="expected_generation",
                reason="GENERATION_MISMATCH",
                metadata={"current_generation": str(self.state.generation)},
            )

    def check_write(self, agent_id: str, issue_ns: int) -> None:
        """Cheap checks of a signed write before its signature is verified."""
        require_id(agent_id, "agent_id")
        check_skew(issue_ns, self._wall(), self.settings.clock_skew_s)

    def _replay(self, agent_id: str, issue_ns: int, signature: bytes) -> bool:
        """True for the same signed write again; raises for an older one."""
        last = self.writers.get(agent_id)
        if last is None:
            return False
        if last[1] == signature:
            return True
        if issue_ns <= last[0]:
            raise Aborted(
                f"agent {agent_id} already made a hive write issued later; "
                "an older one cannot be applied after it",
                field="issue_time",
                reason="SUPERSEDED_WRITE",
            )
        return False

    def _commit(self, event: HiveEvent) -> None:
        self.history.append(event)
        for listener in list(self.listeners):
            listener(event)

    # --- writes ------------------------------------------------------------------

    def propose_belief(
        self,
        agent_id: str,
        name: str,
        confidence: float,
        *,
        issue_ns: int,
        signature: bytes,
        expected_generation: int | None = None,
    ) -> HiveWrite:
        self.check_write(agent_id, issue_ns)
        require_belief_name(name)
        require_unit_interval(confidence, "confidence")
        if self._replay(agent_id, issue_ns, signature):
            return HiveWrite(self.state.generation, None, duplicate=True)
        self._check_expected(expected_generation)
        current = self.state.beliefs.get(name)
        if current is None and len(self.state.beliefs) >= self.settings.max_beliefs:
            raise ResourceExhausted(
                f"the hive holds {len(self.state.beliefs)} beliefs, its maximum",
                reason="TOO_MANY_BELIEFS",
            )
        writer = (agent_id, issue_ns, bytes(signature))
        self.writers[agent_id] = (issue_ns, bytes(signature))
        if current is not None and current.confidence == confidence:
            return HiveWrite(self.state.generation, None, writer=writer)
        generation = self.state.generation + 1
        wall = self._wall()
        belief = Belief(name, confidence, agent_id, generation, wall)
        self.state.beliefs[name] = belief
        self.state.generation = generation
        event = HiveEvent(generation, HiveEventKind.BELIEF_SET, wall, belief=belief)
        self._commit(event)
        return HiveWrite(generation, event, writer=writer)

    def propose_intention(
        self,
        agent_id: str,
        intention: str,
        *,
        issue_ns: int,
        signature: bytes,
        expected_generation: int | None = None,
    ) -> HiveWrite:
        self.check_write(agent_id, issue_ns)
        text = require_intention(intention)
        if self._replay(agent_id, issue_ns, signature):
            return HiveWrite(self.state.generation, None, duplicate=True)
        self._check_expected(expected_generation)
        held = text in self.state.intentions
        if not held and len(self.state.intentions) >= self.settings.max_intentions:
            raise ResourceExhausted(
                f"the hive holds {len(self.state.intentions)} intentions, its maximum",
                reason="TOO_MANY_INTENTIONS",
            )
        writer = (agent_id, issue_ns, bytes(signature))
        self.writers[agent_id] = (issue_ns, bytes(signature))
        if held:
            return HiveWrite(self.state.generation, None, writer=writer)
        generation = self.state.generation + 1
        wall = self._wall()
        item = Intention(text, agent_id, generation, wall)
        self.state.intentions[text] = item
        self.state.generation = generation
        event = HiveEvent(generation, HiveEventKind.INTENTION_ADDED, wall, intention=item)
        self._commit(event)
        return HiveWrite(generation, event, writer=writer)

    def update_from_vote(
        self, pool: Pool, *, now_wall: float, expected_generation: int | None = None
    ) -> HiveWrite:
        """Adopts a decided pool's result (see the module docstring)."""
        result = pool.consensus(now_wall)
        if result.status is not PoolStatus.DECIDED:
            raise FailedPrecondition(
                f"pool {pool.pool_id} is {result.status.name}, not DECIDED; nothing to adopt",
                field="pool_id",
                reason="POOL_NOT_DECIDED",
                metadata={"status": result.status.name},
            )
        self._check_expected(expected_generation)
        current = self.state.decisions.get(pool.topic)
        adopted = Decision(
            topic=pool.topic,
            decision=result.decision,
            confidence=result.confidence,
            pool_id=pool.pool_id,
            final=result.closed,
            generation=0,
            wall=0.0,
        )
        if current is not None and replace(current, generation=0, wall=0.0) == adopted:
            return HiveWrite(self.state.generation, None)
        generation = self.state.generation + 1
        wall = self._wall()
        adopted = replace(adopted, generation=generation, wall=wall)
        removed = ""
        if current is not None and current.belief_name != adopted.belief_name:
            removed = current.belief_name
            self.state.beliefs.pop(removed, None)
        belief = Belief(
            adopted.belief_name, adopted.confidence, f"pool:{pool.pool_id}", generation, wall
        )
        self.state.beliefs[belief.name] = belief
        self.state.decisions[pool.topic] = adopted
        self.state.generation = generation
        event = HiveEvent(
            generation,
            HiveEventKind.DECISION_ADOPTED,
            wall,
            belief=belief,
            decision=adopted,
            removed_belief=removed,
        )
        self._commit(event)
        return HiveWrite(generation, event)

    # --- reads --------------------------------------------------------------------

    def events_since(self, generation: int) -> list[HiveEvent]:
        """Events after ``generation``; OUT_OF_RANGE when some are no longer kept."""
        if generation >= self.state.generation:
            return []
        oldest = self.history[0].generation if self.history else self.state.generation + 1
        if generation + 1 < oldest:
            raise OutOfRange(
                f"changes after generation {generation} are no longer retained; "
                "watch again from 0 for a snapshot",
                field="from_generation",
                reason="GENERATION_COMPACTED",
                metadata={"oldest_generation": str(oldest)},
            )
        return [e for e in self.history if e.generation > generation]
