"""Market domain logic: tasks, signed bids, once-only auctions, outcomes,
expiry and the market's own per-agent load. No grpc and no I/O here.

Design notes
- Score (DESIGN §3.5): ``max(0.01, price * (1 + 0.1*load) * (ect_s/1000) /
  (confidence + 0.1))``, lowest wins, ties to the earliest accepted bid (the
  market's acceptance sequence). ``load`` is the market's count of the
  bidder's ASSIGNED tasks, never what the bidder claims. The trust-adjusted
  mode divides that score by the bidder's conservative trust (floored at 0.01),
  which the caller fetches and passes in.
- Load can only change with a task's state: +1 when an auction assigns it,
  -1 when that assignment leaves ASSIGNED (completed, failed, expired or
  abandoned). Each assignment leaves ASSIGNED once, so load is never counted
  twice and never goes negative; a repeated outcome report is a no-op.
- Every mutation appends what changed (immutable snapshots) to a journal and
  the events it caused to a pending list. The service persists the journal,
  and only after the commit publishes the events, so a watcher never learns
  of something a crash could take back. Decisions are made here, in memory,
  in one order; the journal is written in that same order.
- Timers (deadlines and bidding windows) live in a heap keyed by wall time;
  ``next_timer()`` says when the service should next call ``due()``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
import secrets
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import crypto, signing
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    optional_id,
    require_capabilities,
    require_capability,
    require_finite,
    require_id,
    require_int_range,
    require_text,
    require_unit_interval,
)

SCORE_FLOOR = 0.01
TRUST_FLOOR = 0.01
MAX_PRICE = 1e12
MAX_COMPLETION_S = 10 * 365 * 86400.0
MAX_PRIORITY = 100
MAX_ATTEMPTS = 100
MAX_TASK_TYPE_LEN = 64


class TaskState(enum.IntEnum):
    """Values match agent2028.market.v1.TaskState."""

    OPEN = 1
    ASSIGNED = 2
    COMPLETED = 3
    FAILED = 4
    EXPIRED = 5


CLOSED = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.EXPIRED})


class Scoring(enum.IntEnum):
    """Values match agent2028.market.v1.Scoring."""

    PLAIN = 1
    TRUST_ADJUSTED = 2


class Dispatch(enum.IntEnum):
    """Values match agent2028.market.v1.Dispatch: who runs an assigned task."""

    WINNER = 1
    BROKER = 2


class EventType(enum.IntEnum):
    """Values match agent2028.market.v1.EventType."""

    TASK_LISTED = 1
    BID_PLACED = 2
    AUCTION_WON = 3
    TASK_COMPLETED = 4
    TASK_FAILED = 5
    TASK_EXPIRED = 6
    TASK_RELISTED = 7


def auction_score(
    price: float, load: int, estimated_completion_s: float, confidence: float
) -> float:
    """The guide's score: lower is better."""
    return max(
        SCORE_FLOOR,
        price * (1.0 + 0.1 * load) * (estimated_completion_s / 1000.0) / (confidence + 0.1),
    )


@dataclass(frozen=True)
class MarketSettings:
    clock_skew_s: float = 300.0
    max_bids_per_task: int = 1000
    max_open_tasks: int = 100_000
    max_args: int = 256
    max_args_bytes: int = 64 * 1024
    max_output_bytes: int = 256 * 1024
    max_error_len: int = 2000
    max_deadline_s: float = 366 * 86400.0
    max_bidding_window_s: float = 3600.0
    watch_history: int = 10_000


@dataclass(frozen=True)
class Bidder:
    """What the registry says about a bidder."""

    agent_id: str
    public_key: bytes
    capabilities: frozenset[str]
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class Bid:
    task_id: str
    attempt: int
    agent_id: str
    price: float
    estimated_completion_s: float
    confidence: float
    issue_ns: int
    signature: bytes
    public_key: bytes
    sequence: int
    place_wall: float
    # The attempt the bidder signed (0: whichever was open).
    signed_attempt: int


@dataclass(frozen=True, slots=True)
class ScoredBid:
    bid: Bid
    load: int
    score: float
    trust: float = 0.0


@dataclass(frozen=True, slots=True)
class Assignment:
    attempt: int
    agent_id: str
    won: ScoredBid
    scoring: Scoring
    assign_wall: float
    request_id: str = ""
    outcome: TaskState = TaskState.ASSIGNED
    close_wall: float | None = None
    error: str = ""
    outcome_request_id: str = ""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What the lister asked for; never changes."""

    task_id: str
    task_type: str
    requirements: tuple[str, ...]
    capability: str
    args: tuple[str, ...]
    priority: int
    reward: float
    bidding_window_s: float
    max_attempts: int
    scoring: Scoring
    request_id: str
    sequence: int
    list_wall: float
    dispatch: Dispatch = Dispatch.WINNER

    def same_request(
        self, other: TaskSpec, deadline: float | None, other_deadline: float | None
    ) -> bool:
        return (
            self.task_type == other.task_type
            and self.requirements == other.requirements
            and self.capability == other.capability
            and self.args == other.args
            and self.priority == other.priority
            and self.reward == other.reward
            and self.bidding_window_s == other.bidding_window_s
            and self.max_attempts == other.max_attempts
            and self.scoring == other.scoring
            and self.dispatch == other.dispatch
            and deadline == other_deadline
        )


@dataclass(frozen=True, slots=True)
class TaskView:
    """An immutable snapshot of a task: what responses, events and the journal carry."""

    spec: TaskSpec
    state: TaskState
    attempt: int
    deadline: float | None
    excluded: tuple[str, ...]
    bid_count: int
    assignments: tuple[Assignment, ...]
    open_wall: float
    close_wall: float | None
    output: str
    error: str
    relist_request_ids: tuple[str, ...]

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def current(self) -> Assignment | None:
        """The assignment of the current attempt, if it was auctioned."""
        if self.assignments and self.assignments[-1].attempt == self.attempt:
            return self.assignments[-1]
        return None


class Task:
    """A task's mutable state (the core's own; everything outside sees TaskViews)."""

    __slots__ = (
        "_view",
        "assignments",
        "attempt",
        "bids",
        "close_wall",
        "closed_bid_count",
        "deadline",
        "error",
        "excluded",
        "open_wall",
        "output",
        "relist_request_ids",
        "spec",
        "state",
        "window_close",
        "window_elapsed",
    )

    def __init__(self, spec: TaskSpec, deadline: float | None, open_wall: float) -> None:
        self.spec = spec
        self.state = TaskState.OPEN
        self.attempt = 1
        self.deadline = deadline
        self.excluded: list[str] = []
        self.bids: dict[str, Bid] = {}
        self.assignments: list[Assignment] = []
        self.open_wall = open_wall
        self.close_wall: float | None = None
        self.output = ""
        self.error = ""
        self.relist_request_ids: list[str] = []
        # How many bids the current attempt had once they left memory (when
        # it closed, or after a restart for a task no longer open); storage
        # keeps the bids themselves.
        self.closed_bid_count = 0
        self.window_close: float | None = None
        self.window_elapsed = False
        self._view: TaskView | None = None

    def changed(self) -> None:
        self._view = None

    def view(self) -> TaskView:
        if self._view is None:
            self._view = TaskView(
                spec=self.spec,
                state=self.state,
                attempt=self.attempt,
                deadline=self.deadline,
                excluded=tuple(self.excluded),
                bid_count=len(self.bids) or (self.closed_bid_count if self.state in CLOSED else 0),
                assignments=tuple(self.assignments),
                open_wall=self.open_wall,
                close_wall=self.close_wall,
                output=self.output,
                error=self.error,
                relist_request_ids=tuple(self.relist_request_ids),
            )
        return self._view

    @property
    def current(self) -> Assignment | None:
        if self.assignments and self.assignments[-1].attempt == self.attempt:
            return self.assignments[-1]
        return None


@dataclass
class AgentStats:
    load: int = 0
    won: int = 0
    completed: int = 0
    failed: int = 0
    expired: int = 0


@dataclass(frozen=True)
class Event:
    index: int
    type: EventType
    task: TaskView
    agent_id: str
    wall: float
    # The placed bid, or the winning bid with its score.
    bid: Bid | None = None
    scored: ScoredBid | None = None
    # The service keeps the wire form here (converted once for every watcher).
    cache: list[Any] = field(default_factory=list, compare=False, repr=False)


@dataclass(frozen=True)
class AuctionResult:
    winner: ScoredBid
    task: TaskView
    considered: int
    duplicate: bool = False


# Journal records: what the service persists after each mutation.
@dataclass(frozen=True, slots=True)
class SaveTask:
    task: TaskView


@dataclass(frozen=True, slots=True)
class SaveBid:
    bid: Bid


@dataclass(frozen=True, slots=True)
class SaveAssignment:
    task_id: str
    assignment: Assignment


Record = SaveTask | SaveBid | SaveAssignment


class EventLog:
    """Published (committed) events: a bounded history and live listeners.
    The index starts at the wall clock in microseconds when the market boots,
    so an index from an earlier incarnation is always older than anything
    retained and its watcher is told to resync."""

    def __init__(self, history: int, index_start: int) -> None:
        self.index = index_start
        self.published = index_start
        self._history: deque[Event] = deque(maxlen=history)
        self._listeners: list[Callable[[Event], None]] = []

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            self._history.append(event)
            self.published = max(self.published, event.index)
            for listener in list(self._listeners):
                listener(event)

    def since(self, from_index: int) -> list[Event]:
        """Every retained event after ``from_index``; OUT_OF_RANGE when some
        were already dropped or belong to another incarnation."""
        if from_index > self.published:
            raise OutOfRange(
                f"from_index {from_index} is ahead of the market's index {self.published}; "
                "watch again from 0",
                field="from_index",
                reason="INDEX_IN_FUTURE",
                metadata={"current_index": str(self.published)},
            )
        oldest = self._history[0].index if self._history else self.published + 1
        if from_index < oldest - 1 and from_index < self.published:
            raise OutOfRange(
                f"events after index {from_index} are no longer retained (oldest is {oldest}); "
                "resync with ListTasks and watch again from 0",
                field="from_index",
                reason="INDEX_COMPACTED",
                metadata={"oldest_index": str(oldest), "current_index": str(self.published)},
            )
        return [e for e in self._history if e.index > from_index]


class MarketCore:
    """The market's state machine. Not thread-safe; one event loop drives it."""

    def __init__(
        self,
        settings: MarketSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        index_start: int | None = None,
        verify: Callable[..., bool] = crypto.verify,
    ) -> None:
        self.settings = settings or MarketSettings()
        self._wall = wall_clock
        self._verify = verify
        self.tasks: dict[str, Task] = {}
        self._order: list[Task] = []
        self._order_seq: list[int] = []
        self._list_requests: dict[str, str] = {}
        self.stats: dict[str, AgentStats] = {}
        self._open = 0
        self._sequence = 0
        self._timers: list[tuple[float, int, str, str, int]] = []
        self._timer_tie = 0
        self.journal: list[Record] = []
        self.pending: list[Event] = []
        self.events = EventLog(
            self.settings.watch_history,
            index_start if index_start is not None else int(self._wall() * 1_000_000),
        )
        # Called with the wall time of a newly scheduled timer, so the
        # service's timer loop can wake up early.
        self.on_schedule: Callable[[float], None] | None = None
        self.counters = {
            "bids": 0,
            "auctions": 0,
            "completed": 0,
            "failed": 0,
            "expired": 0,
            "relisted": 0,
        }

    # --- journal and events ----------------------------------------------------

    def drain(self) -> tuple[list[Record], list[Event]]:
        """What the last mutations changed and the events they caused; the
        service persists the first and then publishes the second."""
        records, events = self.journal, self.pending
        self.journal, self.pending = [], []
        return records, events

    def _save(self, task: Task) -> TaskView:
        task.changed()
        view = task.view()
        self.journal.append(SaveTask(view))
        return view

    def _emit(
        self,
        type_: EventType,
        view: TaskView,
        agent_id: str = "",
        *,
        bid: Bid | None = None,
        scored: ScoredBid | None = None,
    ) -> None:
        self.pending.append(
            Event(self.events.next_index(), type_, view, agent_id, self._wall(), bid, scored)
        )

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _schedule(self, when: float, kind: str, task: Task) -> None:
        self._timer_tie += 1
        heapq.heappush(self._timers, (when, self._timer_tie, kind, task.spec.task_id, task.attempt))
        if self.on_schedule is not None:
            self.on_schedule(when)

    def _stats(self, agent_id: str) -> AgentStats:
        stats = self.stats.get(agent_id)
        if stats is None:
            stats = self.stats[agent_id] = AgentStats()
        return stats

    def load_of(self, agent_id: str) -> int:
        stats = self.stats.get(agent_id)
        return stats.load if stats else 0

    # --- reads -----------------------------------------------------------------

    def get(self, task_id: str) -> TaskView:
        return self._task(task_id).view()

    def _task(self, task_id: str, field_name: str = "task_id") -> Task:
        require_id(task_id, field_name)
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(
                f"no task {task_id!r}",
                field=field_name,
                reason="TASK_NOT_FOUND",
                metadata={"task_id": task_id},
            )
        return task

    def list_tasks(
        self,
        *,
        page_size: int,
        page_token: str = "",
        states: Iterable[TaskState] = (),
        agent_id: str = "",
        task_type: str = "",
    ) -> tuple[list[TaskView], str, int]:
        position = decode_page_token(page_token)
        after = position.get("seq", 0)
        if not isinstance(after, int):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        optional_id(agent_id, "agent_id")
        wanted = set(states)

        def matches(task: Task) -> bool:
            if wanted and task.state not in wanted:
                return False
            if task_type and task.spec.task_type != task_type:
                return False
            if agent_id:
                current = task.assignments[-1] if task.assignments else None
                if current is None or current.agent_id != agent_id:
                    return False
            return True

        total = 0
        page: list[TaskView] = []
        last = after
        more = False
        start = bisect_right(self._order_seq, after)
        if not wanted and not task_type and not agent_id:
            total = len(self._order)
            chunk = self._order[start : start + page_size + 1]
            page = [t.view() for t in chunk[:page_size]]
            more = len(chunk) > page_size
            last = chunk[min(len(chunk), page_size) - 1].spec.sequence if page else after
        else:
            for i, task in enumerate(self._order):
                if not matches(task):
                    continue
                total += 1
                if i < start:
                    continue
                if len(page) < page_size:
                    page.append(task.view())
                    last = task.spec.sequence
                else:
                    more = True
        token = encode_page_token({"seq": last}) if more else ""
        return page, token, total

    def bids(self, task_id: str, attempt: int = 0) -> tuple[TaskView, list[ScoredBid] | None]:
        """The task and the scored bids of ``attempt`` (0: the current one),
        earliest first; None when those bids are no longer held in memory
        (a closed attempt: the service reads them from storage)."""
        task = self._task(task_id)
        if attempt < 0:
            raise InvalidArgument(
                f"attempt must not be negative, got {attempt}",
                field="attempt",
                reason="OUT_OF_RANGE",
            )
        attempt = attempt or task.attempt
        if attempt > task.attempt:
            raise NotFound(
                f"task {task_id!r} has had {task.attempt} attempts, not {attempt}",
                field="attempt",
                reason="ATTEMPT_NOT_FOUND",
            )
        if attempt != task.attempt or task.state in CLOSED:
            return task.view(), None
        return task.view(), [self.score_now(b) for b in sorted(task.bids.values(), key=_seq)]

    def score_now(self, bid: Bid) -> ScoredBid:
        load = self.load_of(bid.agent_id)
        return ScoredBid(
            bid, load, auction_score(bid.price, load, bid.estimated_completion_s, bid.confidence)
        )

    def agent_load(self, agent_id: str) -> AgentStats:
        require_id(agent_id, "agent_id")
        return dataclasses.replace(self.stats.get(agent_id) or AgentStats())

    def list_loads(
        self, *, page_size: int, page_token: str = ""
    ) -> tuple[list[tuple[str, AgentStats]], str, int]:
        position = decode_page_token(page_token)
        after = position.get("agent", "")
        if not isinstance(after, str):
            raise InvalidArgument(
                "page_token is not a token this service issued",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            )
        ids = sorted(self.stats)
        start = bisect_right(ids, after) if after else 0
        chunk = ids[start : start + page_size]
        token = encode_page_token({"agent": chunk[-1]}) if start + page_size < len(ids) else ""
        return [(a, dataclasses.replace(self.stats[a])) for a in chunk], token, len(ids)

    def open_tasks(
        self, capabilities: Iterable[str] | None = None, agent_id: str = ""
    ) -> list[TaskView]:
        """OPEN tasks whose requirements ``capabilities`` cover (all OPEN tasks
        when None), highest priority first, and those ASSIGNED to agent_id."""
        held = None if capabilities is None else set(capabilities)
        out = []
        for task in self._order:
            if task.state is TaskState.OPEN:
                if held is not None and not held.issuperset(task.spec.requirements):
                    continue
                if agent_id and agent_id in task.excluded:
                    continue
                out.append(task.view())
            elif (
                agent_id
                and task.state is TaskState.ASSIGNED
                and task.assignments[-1].agent_id == agent_id
            ):
                out.append(task.view())
        out.sort(key=lambda v: (-v.spec.priority, v.spec.sequence))
        return out

    # --- listing -----------------------------------------------------------------

    def list_task(
        self,
        *,
        task_id: str,
        task_type: str,
        requirements: Iterable[str],
        capability: str = "",
        args: Iterable[str] = (),
        priority: int = 0,
        reward: float = 0.0,
        deadline: float | None = None,
        bidding_window_s: float = 0.0,
        max_attempts: int = 0,
        scoring: Scoring = Scoring.PLAIN,
        request_id: str = "",
        dispatch: Dispatch = Dispatch.WINNER,
    ) -> tuple[TaskView, bool]:
        """Opens a task; returns (task, created)."""
        s = self.settings
        now = self._wall()
        optional_id(task_id, "task_id")
        optional_id(request_id, "request_id")
        task_type = require_text(task_type, "task_type", max_len=MAX_TASK_TYPE_LEN)
        if any(c.isspace() or not c.isprintable() for c in task_type):
            raise InvalidArgument(
                f"task_type {task_type!r} must be printable without spaces",
                field="task_type",
                reason="MALFORMED_TASK_TYPE",
            )
        reqs = tuple(require_capabilities(list(requirements), "requirements"))
        if capability:
            require_capability(capability, "capability")
            if capability not in reqs:
                raise InvalidArgument(
                    f"capability {capability!r} must be one of the requirements",
                    field="capability",
                    reason="CAPABILITY_NOT_REQUIRED",
                )
        arg_list = tuple(args)
        if len(arg_list) > s.max_args:
            raise InvalidArgument(
                f"args has {len(arg_list)} values; at most {s.max_args} allowed",
                field="args",
                reason="TOO_MANY_VALUES",
            )
        if sum(len(a.encode()) for a in arg_list) > s.max_args_bytes:
            raise InvalidArgument(
                f"args exceed {s.max_args_bytes} bytes", field="args", reason="FIELD_TOO_LONG"
            )
        require_int_range(priority, "priority", 0, MAX_PRIORITY)
        reward = require_finite(reward, "reward", lo=0.0, hi=MAX_PRICE)
        if deadline is not None:
            deadline = require_finite(deadline, "deadline_time")
            if deadline <= now:
                raise InvalidArgument(
                    f"deadline_time is {now - deadline:.3f}s in the past",
                    field="deadline_time",
                    reason="DEADLINE_IN_PAST",
                )
            if deadline - now > s.max_deadline_s:
                raise InvalidArgument(
                    f"deadline_time is more than {s.max_deadline_s:.0f}s away",
                    field="deadline_time",
                    reason="OUT_OF_RANGE",
                )
        bidding_window_s = require_finite(
            bidding_window_s, "bidding_window", lo=0.0, hi=s.max_bidding_window_s
        )
        if max_attempts < 0 or max_attempts > MAX_ATTEMPTS:
            raise InvalidArgument(
                f"max_attempts must be within 0..{MAX_ATTEMPTS}, got {max_attempts}",
                field="max_attempts",
                reason="OUT_OF_RANGE",
            )
        max_attempts = max_attempts or 1
        scoring = Scoring(scoring)
        dispatch = Dispatch(dispatch)

        if not task_id and request_id and request_id in self._list_requests:
            return self.tasks[self._list_requests[request_id]].view(), False
        spec = TaskSpec(
            task_id=task_id or f"task-{secrets.token_hex(8)}",
            task_type=task_type,
            requirements=reqs,
            capability=capability,
            args=arg_list,
            priority=priority,
            reward=reward,
            bidding_window_s=bidding_window_s,
            max_attempts=max_attempts,
            scoring=scoring,
            request_id=request_id,
            sequence=0,
            list_wall=now,
            dispatch=dispatch,
        )
        existing = self.tasks.get(spec.task_id)
        if existing is not None:
            if existing.spec.same_request(spec, existing.deadline, deadline) or (
                request_id and request_id == existing.spec.request_id
            ):
                return existing.view(), False
            raise AlreadyExists(
                f"task {spec.task_id!r} is already listed with other content",
                field="task_id",
                reason="TASK_EXISTS",
                metadata={"task_id": spec.task_id},
            )
        if self._open >= s.max_open_tasks:
            raise ResourceExhausted(
                f"the market already holds {self._open} unfinished tasks, its limit",
                reason="TOO_MANY_OPEN_TASKS",
            )
        spec = dataclasses.replace(spec, sequence=self._next_sequence())
        task = Task(spec, deadline, now)
        self._add(task)
        if request_id:
            self._list_requests[request_id] = spec.task_id
        self._open_attempt(task, now)
        view = self._save(task)
        self._emit(EventType.TASK_LISTED, view)
        return view, True

    def _add(self, task: Task) -> None:
        self.tasks[task.spec.task_id] = task
        self._order.append(task)
        self._order_seq.append(task.spec.sequence)
        if task.state not in CLOSED:
            self._open += 1

    def _open_attempt(self, task: Task, now: float) -> None:
        task.state = TaskState.OPEN
        task.open_wall = now
        task.bids = {}
        task.closed_bid_count = 0
        task.window_elapsed = False
        task.window_close = now + task.spec.bidding_window_s if task.spec.bidding_window_s else None
        if task.window_close is not None:
            self._schedule(task.window_close, "window", task)
        if task.deadline is not None:
            self._schedule(task.deadline, "deadline", task)

    # --- bidding -----------------------------------------------------------------

    def place_bid(
        self,
        *,
        task_id: str,
        agent_id: str,
        price: float,
        estimated_completion_s: float,
        confidence: float,
        issue_ns: int,
        signature: bytes,
        bidder: Bidder | None,
        attempt: int = 0,
    ) -> tuple[Bid, bool, bool]:
        """Accepts a signed bid; returns (bid, replaced, duplicate)."""
        s = self.settings
        now = self._wall()
        require_id(task_id, "task_id")
        require_id(agent_id, "agent_id")
        price = require_finite(price, "price", lo=0.0, hi=MAX_PRICE)
        estimated_completion_s = require_finite(
            estimated_completion_s,
            "estimated_completion_seconds",
            lo=0.0,
            hi=MAX_COMPLETION_S,
            lo_open=True,
        )
        confidence = require_unit_interval(confidence, "confidence")
        if attempt < 0:
            raise InvalidArgument(
                f"attempt must not be negative, got {attempt}",
                field="attempt",
                reason="OUT_OF_RANGE",
            )
        if len(signature) != crypto.SIGNATURE_BYTES:
            raise InvalidArgument(
                f"signature must be {crypto.SIGNATURE_BYTES} bytes, got {len(signature)}",
                field="signature",
                reason="MALFORMED_SIGNATURE",
            )
        task = self._task(task_id)
        self._require_open(task, now)
        if attempt and attempt != task.attempt:
            raise FailedPrecondition(
                f"task {task_id!r} is on attempt {task.attempt}, not {attempt}",
                field="attempt",
                reason="STALE_ATTEMPT",
                metadata={"attempt": str(task.attempt)},
            )
        if bidder is None:
            raise PermissionDenied(
                f"agent {agent_id!r} is not registered; only registered agents may bid",
                field="agent_id",
                reason="BIDDER_NOT_REGISTERED",
            )
        if not bidder.healthy:
            raise FailedPrecondition(
                f"agent {agent_id!r} is critical in the registry; it may not bid until it passes again",
                field="agent_id",
                reason="BIDDER_UNHEALTHY",
            )
        if agent_id in task.excluded:
            raise PermissionDenied(
                f"agent {agent_id!r} failed this task before and may not bid on it again",
                field="agent_id",
                reason="AGENT_EXCLUDED",
            )
        missing = [r for r in task.spec.requirements if r not in bidder.capabilities]
        if missing:
            raise PermissionDenied(
                f"agent {agent_id!r} does not hold {', '.join(missing)}, required by task {task_id!r}",
                field="agent_id",
                reason="MISSING_REQUIREMENTS",
                metadata={"missing": ",".join(missing)},
            )
        skew = abs(now - issue_ns / 1e9)
        if skew > s.clock_skew_s:
            raise InvalidArgument(
                f"issue_time is {skew:.0f}s away from the market's clock; at most "
                f"{s.clock_skew_s:.0f}s allowed",
                field="issue_time",
                reason="CLOCK_SKEW",
            )
        statement = signing.bid(
            task_id, attempt, agent_id, price, estimated_completion_s, confidence, issue_ns
        )
        if not self._verify(bidder.public_key, signature, *statement):
            raise Unauthenticated(
                f"signature does not verify with agent {agent_id!r}'s registered key",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        previous = task.bids.get(agent_id)
        if previous is not None:
            if (
                previous.issue_ns == issue_ns
                and previous.signature == signature
                and previous.signed_attempt == attempt
            ):
                return previous, False, True
            if issue_ns <= previous.issue_ns:
                raise Aborted(
                    f"agent {agent_id!r} already placed a newer bid on task {task_id!r}",
                    field="issue_time",
                    reason="STALE_BID",
                )
        elif len(task.bids) >= s.max_bids_per_task:
            raise ResourceExhausted(
                f"task {task_id!r} already has {len(task.bids)} bids, the limit",
                reason="TOO_MANY_BIDS",
            )
        bid = Bid(
            task_id=task_id,
            attempt=task.attempt,
            agent_id=agent_id,
            price=price,
            estimated_completion_s=estimated_completion_s,
            confidence=confidence,
            issue_ns=issue_ns,
            signature=bytes(signature),
            public_key=bytes(bidder.public_key),
            sequence=self._next_sequence(),
            place_wall=now,
            signed_attempt=attempt,
        )
        task.bids[agent_id] = bid
        self.counters["bids"] += 1
        self.journal.append(SaveBid(bid))
        task.changed()
        self._emit(EventType.BID_PLACED, task.view(), agent_id, bid=bid)
        if task.window_elapsed:
            # The window closed with nobody bidding: the first bid decides.
            task.window_elapsed = False
            self._schedule(now, "window", task)
        return bid, previous is not None, False

    def _require_open(self, task: Task, now: float) -> None:
        if task.state is TaskState.OPEN and task.deadline is not None and now >= task.deadline:
            self._expire(task, now)
        if task.state is not TaskState.OPEN:
            raise FailedPrecondition(
                f"task {task.spec.task_id!r} is {task.state.name.lower()}, not open for bids",
                field="task_id",
                reason="TASK_NOT_OPEN",
                metadata={"state": task.state.name},
            )

    # --- auctions ----------------------------------------------------------------

    def auction_candidates(self, task_id: str) -> list[str]:
        """The bidders of an OPEN task (for fetching their trust first)."""
        task = self._task(task_id)
        return sorted(task.bids) if task.state is TaskState.OPEN else []

    def run_auction(
        self,
        task_id: str,
        *,
        scoring: Scoring = Scoring.PLAIN,
        trust: Mapping[str, float] | None = None,
        eligible: Callable[[str], bool] | None = None,
        request_id: str = "",
    ) -> AuctionResult:
        """Auctions an OPEN task once. ``trust`` (agent id -> conservative
        trust) is required for TRUST_ADJUSTED; bidders without a value, or
        for whom ``eligible`` is false (no longer registered), do not take part."""
        now = self._wall()
        optional_id(request_id, "request_id")
        task = self._task(task_id)
        if request_id:
            for assignment in task.assignments:
                if assignment.request_id == request_id:
                    return AuctionResult(assignment.won, task.view(), 0, duplicate=True)
        if task.state is TaskState.OPEN and task.deadline is not None and now >= task.deadline:
            self._expire(task, now)
        if task.state is not TaskState.OPEN:
            reason = "TASK_EXPIRED" if task.state is TaskState.EXPIRED else "ALREADY_AUCTIONED"
            raise FailedPrecondition(
                f"task {task_id!r} is {task.state.name.lower()}; an auction runs once, on an open task",
                field="task_id",
                reason=reason,
                metadata={"state": task.state.name},
            )
        if scoring is Scoring.TRUST_ADJUSTED and trust is None:
            raise FailedPrecondition(
                "a trust-adjusted auction needs the bidders' trust", reason="TRUST_REQUIRED"
            )
        best: ScoredBid | None = None
        considered = 0
        for bid in task.bids.values():
            if eligible is not None and not eligible(bid.agent_id):
                continue
            load = self.load_of(bid.agent_id)
            score = auction_score(bid.price, load, bid.estimated_completion_s, bid.confidence)
            agent_trust = 0.0
            if scoring is Scoring.TRUST_ADJUSTED:
                assert trust is not None
                if bid.agent_id not in trust:
                    continue
                agent_trust = min(max(trust[bid.agent_id], TRUST_FLOOR), 1.0)
                score /= agent_trust
            considered += 1
            candidate = ScoredBid(bid, load, score, agent_trust)
            if best is None or (score, bid.sequence) < (best.score, best.bid.sequence):
                best = candidate
        if best is None:
            raise FailedPrecondition(
                f"task {task_id!r} has no bids from registered agents"
                + (f" ({len(task.bids)} from agents no longer eligible)" if task.bids else ""),
                field="task_id",
                reason="NO_BIDS",
                metadata={"bids": str(len(task.bids))},
            )
        assignment = Assignment(
            attempt=task.attempt,
            agent_id=best.bid.agent_id,
            won=best,
            scoring=scoring,
            assign_wall=now,
            request_id=request_id,
        )
        task.assignments.append(assignment)
        task.state = TaskState.ASSIGNED
        task.window_close = None
        task.window_elapsed = False
        stats = self._stats(assignment.agent_id)
        stats.load += 1
        stats.won += 1
        self.counters["auctions"] += 1
        self.journal.append(SaveAssignment(task_id, assignment))
        view = self._save(task)
        self._emit(EventType.AUCTION_WON, view, assignment.agent_id, scored=best)
        return AuctionResult(best, view, considered)

    # --- outcomes ----------------------------------------------------------------

    def complete(
        self,
        *,
        task_id: str,
        attempt: int,
        agent_id: str,
        output: str,
        issue_ns: int,
        signature: bytes,
        request_id: str = "",
    ) -> tuple[TaskView, bool]:
        """The assigned agent's signed report of success; returns (task, duplicate)."""
        if len(output.encode()) > self.settings.max_output_bytes:
            raise InvalidArgument(
                f"output exceeds {self.settings.max_output_bytes} bytes",
                field="output",
                reason="FIELD_TOO_LONG",
            )
        task, assignment = self._reporting(
            task_id, attempt, agent_id, True, output, "", issue_ns, signature, request_id
        )
        return self._complete(task, assignment, output, request_id)

    def _complete(
        self, task: Task, assignment: Assignment, output: str, request_id: str
    ) -> tuple[TaskView, bool]:
        if assignment.outcome is TaskState.COMPLETED:
            return task.view(), True
        self._refuse_closed(task.spec.task_id, assignment)
        agent_id = assignment.agent_id
        now = self._wall()
        self._close_assignment(task, assignment, TaskState.COMPLETED, now, "", request_id)
        task.state = TaskState.COMPLETED
        task.output = output
        task.error = ""
        self._close(task, now)
        self.counters["completed"] += 1
        view = self._save(task)
        self._emit(EventType.TASK_COMPLETED, view, agent_id)
        return view, False

    def fail(
        self,
        *,
        task_id: str,
        attempt: int,
        agent_id: str,
        error: str,
        issue_ns: int,
        signature: bytes,
        request_id: str = "",
    ) -> tuple[TaskView, bool, bool]:
        """The assigned agent's signed report of failure; returns (task,
        duplicate, relisted)."""
        if len(error) > self.settings.max_error_len:
            raise InvalidArgument(
                f"error is {len(error)} characters; at most {self.settings.max_error_len} allowed",
                field="error",
                reason="FIELD_TOO_LONG",
            )
        task, assignment = self._reporting(
            task_id, attempt, agent_id, False, "", error, issue_ns, signature, request_id
        )
        return self._fail(task, assignment, error, request_id)

    def _fail(
        self, task: Task, assignment: Assignment, error: str, request_id: str
    ) -> tuple[TaskView, bool, bool]:
        if assignment.outcome is TaskState.FAILED:
            return task.view(), True, task.attempt > assignment.attempt
        self._refuse_closed(task.spec.task_id, assignment)
        relisted = self._fail_assignment(task, assignment, error or "failed", request_id)
        return task.view(), False, relisted

    def settle_with_receipt(
        self,
        *,
        task_id: str,
        attempt: int,
        command_id: str,
        session_id: str,
        agent_id: str,
        capability: str,
        start_ns: int,
        finish_ns: int,
        success: bool,
        error: str,
        output_digest: bytes,
        output: str,
        signature: bytes,
        request_id: str = "",
    ) -> tuple[TaskView, bool, bool]:
        """Settles an assigned attempt with the assigned agent's own signed
        execution receipt (``signing.agent_receipt``), as a dispatcher got it
        from the broker: success completes the task, failure fails it (and
        re-lists it while attempts remain). Returns (task, duplicate, relisted).

        The receipt proves the outcome only for this attempt: it must be
        signed by the key the agent bid with, carry the attempt's command id
        (``signing.task_command_id``) and the task's capability, and the
        output must be the one it signed."""
        require_id(agent_id, "receipt.agent_id")
        optional_id(request_id, "request_id")
        if attempt < 1:
            raise InvalidArgument(
                f"attempt must be >= 1 (the attempt the agent won), got {attempt}",
                field="attempt",
                reason="OUT_OF_RANGE",
            )
        if len(signature) != crypto.SIGNATURE_BYTES:
            raise InvalidArgument(
                f"signature must be {crypto.SIGNATURE_BYTES} bytes, got {len(signature)}",
                field="signature",
                reason="MALFORMED_SIGNATURE",
            )
        if len(output.encode()) > self.settings.max_output_bytes:
            raise InvalidArgument(
                f"output exceeds {self.settings.max_output_bytes} bytes",
                field="output",
                reason="FIELD_TOO_LONG",
            )
        if _digest(output) != bytes(output_digest):
            raise InvalidArgument(
                "output is not the output the receipt's digest covers",
                field="output",
                reason="OUTPUT_DIGEST_MISMATCH",
            )
        task = self._task(task_id)
        assignment = next((a for a in task.assignments if a.attempt == attempt), None)
        if assignment is None:
            raise FailedPrecondition(
                f"attempt {attempt} of task {task_id!r} was never auctioned",
                field="attempt",
                reason="NOT_ASSIGNED",
                metadata={"state": task.state.name, "attempt": str(task.attempt)},
            )
        if assignment.agent_id != agent_id:
            raise PermissionDenied(
                f"attempt {attempt} of task {task_id!r} is assigned to another agent",
                field="receipt.agent_id",
                reason="NOT_ASSIGNED_AGENT",
            )
        if not signing.is_task_command_id(command_id, task_id, attempt):
            raise InvalidArgument(
                f"the receipt is for command {command_id!r}, not attempt {attempt} of task "
                f"{task_id!r} (expected {signing.task_command_id(task_id, attempt)!r})",
                field="receipt.command_id",
                reason="RECEIPT_FOR_OTHER_COMMAND",
            )
        wanted = task.spec.capability
        if (wanted and capability != wanted) or capability not in task.spec.requirements:
            raise InvalidArgument(
                f"the receipt is for capability {capability!r}, which does not run this task",
                field="receipt.capability",
                reason="RECEIPT_FOR_OTHER_CAPABILITY",
            )
        statement = signing.agent_receipt(
            command_id,
            session_id,
            agent_id,
            capability,
            start_ns,
            finish_ns,
            success,
            error,
            bytes(output_digest),
        )
        if not self._verify(assignment.won.bid.public_key, signature, *statement):
            raise Unauthenticated(
                f"the receipt's signature does not verify with the key agent {agent_id!r} bid with",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        if success:
            view, duplicate = self._complete(task, assignment, output, request_id)
            return view, duplicate, False
        return self._fail(task, assignment, error[: self.settings.max_error_len], request_id)

    def _fail_assignment(
        self, task: Task, assignment: Assignment, error: str, request_id: str = ""
    ) -> bool:
        now = self._wall()
        self._close_assignment(task, assignment, TaskState.FAILED, now, error, request_id)
        if assignment.agent_id not in task.excluded:
            task.excluded.append(assignment.agent_id)
        task.state = TaskState.FAILED
        task.error = error
        self.counters["failed"] += 1
        deadline_ok = task.deadline is None or now < task.deadline
        relist = task.attempt < task.spec.max_attempts and deadline_ok
        if not relist:
            self._close(task, now)
        view = self._save(task)
        self._emit(EventType.TASK_FAILED, view, assignment.agent_id)
        if relist:
            self._relist(task, now)
        return relist

    def abandon(self, agent_id: str, why: str) -> list[TaskView]:
        """Fails every task assigned to an agent that left the registry (it
        will never report), re-listing those with attempts left."""
        out = []
        for task in self._order:
            if task.state is TaskState.ASSIGNED and task.assignments[-1].agent_id == agent_id:
                self._fail_assignment(task, task.assignments[-1], why)
                out.append(task.view())
        return out

    def _reporting(
        self,
        task_id: str,
        attempt: int,
        agent_id: str,
        success: bool,
        output: str,
        error: str,
        issue_ns: int,
        signature: bytes,
        request_id: str,
    ) -> tuple[Task, Assignment]:
        require_id(agent_id, "agent_id")
        optional_id(request_id, "request_id")
        if attempt < 1:
            raise InvalidArgument(
                f"attempt must be >= 1 (the attempt the agent won), got {attempt}",
                field="attempt",
                reason="OUT_OF_RANGE",
            )
        if len(signature) != crypto.SIGNATURE_BYTES:
            raise InvalidArgument(
                f"signature must be {crypto.SIGNATURE_BYTES} bytes, got {len(signature)}",
                field="signature",
                reason="MALFORMED_SIGNATURE",
            )
        task = self._task(task_id)
        assignment = next((a for a in task.assignments if a.attempt == attempt), None)
        if assignment is None:
            raise FailedPrecondition(
                f"attempt {attempt} of task {task_id!r} was never auctioned",
                field="attempt",
                reason="NOT_ASSIGNED",
                metadata={"state": task.state.name, "attempt": str(task.attempt)},
            )
        if assignment.agent_id != agent_id:
            raise PermissionDenied(
                f"attempt {attempt} of task {task_id!r} is assigned to another agent",
                field="agent_id",
                reason="NOT_ASSIGNED_AGENT",
            )
        digest = _digest(output)
        statement = signing.task_outcome(
            task_id, attempt, agent_id, success, digest, error, issue_ns
        )
        if not self._verify(assignment.won.bid.public_key, signature, *statement):
            raise Unauthenticated(
                f"signature does not verify with the key agent {agent_id!r} bid with",
                field="signature",
                reason="BAD_SIGNATURE",
            )
        return task, assignment

    @staticmethod
    def _refuse_closed(task_id: str, assignment: Assignment) -> None:
        if assignment.outcome is not TaskState.ASSIGNED:
            raise FailedPrecondition(
                f"attempt {assignment.attempt} of task {task_id!r} is already "
                f"{assignment.outcome.name.lower()}",
                field="task_id",
                reason="ALREADY_CLOSED",
                metadata={"outcome": assignment.outcome.name},
            )

    def _close_assignment(
        self,
        task: Task,
        assignment: Assignment,
        outcome: TaskState,
        now: float,
        error: str,
        request_id: str,
    ) -> Assignment:
        """The one place an assignment leaves ASSIGNED, and so the one place
        load goes down."""
        assert assignment.outcome is TaskState.ASSIGNED
        closed = dataclasses.replace(
            assignment, outcome=outcome, close_wall=now, error=error, outcome_request_id=request_id
        )
        index = task.assignments.index(assignment)
        task.assignments[index] = closed
        stats = self._stats(assignment.agent_id)
        stats.load -= 1
        assert stats.load >= 0, f"load of {assignment.agent_id} went negative"
        if outcome is TaskState.COMPLETED:
            stats.completed += 1
        elif outcome is TaskState.FAILED:
            stats.failed += 1
        else:
            stats.expired += 1
        self.journal.append(SaveAssignment(task.spec.task_id, closed))
        return closed

    def _close(self, task: Task, now: float) -> None:
        task.close_wall = now
        task.closed_bid_count = len(task.bids) or task.closed_bid_count
        task.bids = {}
        task.window_close = None
        self._open -= 1

    # --- re-listing and expiry -------------------------------------------------------

    def relist(
        self, task_id: str, *, deadline: float | None = None, request_id: str = ""
    ) -> tuple[TaskView, bool]:
        """Opens a FAILED or EXPIRED task for a new attempt; returns (task, duplicate)."""
        now = self._wall()
        optional_id(request_id, "request_id")
        task = self._task(task_id)
        if request_id and request_id in task.relist_request_ids:
            return task.view(), True
        if task.state not in (TaskState.FAILED, TaskState.EXPIRED):
            raise FailedPrecondition(
                f"task {task_id!r} is {task.state.name.lower()}; only a failed or expired task "
                "can be re-listed",
                field="task_id",
                reason="NOT_RELISTABLE",
                metadata={"state": task.state.name},
            )
        if deadline is not None:
            deadline = require_finite(deadline, "deadline_time")
            if deadline <= now:
                raise InvalidArgument(
                    f"deadline_time is {now - deadline:.3f}s in the past",
                    field="deadline_time",
                    reason="DEADLINE_IN_PAST",
                )
        elif task.deadline is not None and task.deadline <= now:
            raise InvalidArgument(
                "the task's deadline has passed; give a new deadline_time to re-list it",
                field="deadline_time",
                reason="DEADLINE_REQUIRED",
            )
        if task.attempt >= 10 * MAX_ATTEMPTS:
            raise ResourceExhausted(
                f"task {task_id!r} has been attempted {task.attempt} times",
                reason="TOO_MANY_ATTEMPTS",
            )
        if self._open >= self.settings.max_open_tasks:
            raise ResourceExhausted(
                f"the market already holds {self._open} unfinished tasks, its limit",
                reason="TOO_MANY_OPEN_TASKS",
            )
        if deadline is not None:
            task.deadline = deadline
        if request_id:
            task.relist_request_ids.append(request_id)
        self._open += 1
        task.close_wall = None
        self._relist(task, now)
        return task.view(), False

    def _relist(self, task: Task, now: float) -> None:
        task.attempt += 1
        self._open_attempt(task, now)
        self.counters["relisted"] += 1
        view = self._save(task)
        self._emit(EventType.TASK_RELISTED, view)

    def _expire(self, task: Task, now: float) -> TaskView:
        current = task.current
        if task.state is TaskState.ASSIGNED and current is not None:
            self._close_assignment(
                task, current, TaskState.EXPIRED, now, "deadline passed while assigned", ""
            )
            if current.agent_id not in task.excluded:
                task.excluded.append(current.agent_id)
        task.state = TaskState.EXPIRED
        task.error = "deadline passed"
        self._close(task, now)
        self.counters["expired"] += 1
        view = self._save(task)
        self._emit(EventType.TASK_EXPIRED, view, current.agent_id if current else "")
        return view

    def next_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def due(self) -> tuple[list[TaskView], list[str]]:
        """Runs the timers that are due: closes every OPEN or ASSIGNED task
        whose deadline has passed (returned first), and returns the tasks
        whose bidding window has closed with bids, for the service to
        auction. A window that closes without bids waits for the first bid."""
        now = self._wall()
        expired: list[TaskView] = []
        auctions: list[str] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, task_id, attempt = heapq.heappop(self._timers)
            task = self.tasks.get(task_id)
            if task is None or task.attempt != attempt:
                continue  # a timer of an earlier attempt
            if kind == "deadline":
                if (
                    task.state in (TaskState.OPEN, TaskState.ASSIGNED)
                    and task.deadline is not None
                    and task.deadline <= now
                ):
                    expired.append(self._expire(task, now))
            elif task.state is TaskState.OPEN and task.window_close is not None:
                if task.bids:
                    auctions.append(task_id)
                else:
                    task.window_elapsed = True
        return expired, auctions

    def window_elapsed(self, task_id: str) -> None:
        """The market's auction found no eligible bid: the next bid decides."""
        task = self.tasks.get(task_id)
        if task is not None and task.state is TaskState.OPEN:
            task.window_elapsed = True

    def retry_window(self, task_id: str, when: float) -> None:
        """Tries the market's auction of an OPEN task again at ``when``."""
        task = self.tasks.get(task_id)
        if task is not None and task.state is TaskState.OPEN:
            self._schedule(when, "window", task)

    # --- restoring from storage ------------------------------------------------------

    def restore(
        self,
        tasks: Iterable[TaskView],
        bids: Iterable[Bid],
        assignments: Mapping[str, list[Assignment]],
    ) -> None:
        """Rebuilds the state from what storage holds (tasks in listing order)."""
        for view in sorted(tasks, key=lambda v: v.spec.sequence):
            task = Task(view.spec, view.deadline, view.open_wall)
            task.state = view.state
            task.attempt = view.attempt
            task.excluded = list(view.excluded)
            task.assignments = list(assignments.get(view.spec.task_id, ()))
            task.close_wall = view.close_wall
            task.output = view.output
            task.error = view.error
            task.relist_request_ids = list(view.relist_request_ids)
            if view.state is not TaskState.OPEN:
                task.closed_bid_count = view.bid_count
            self._add(task)
            self._sequence = max(self._sequence, view.spec.sequence)
            if view.spec.request_id:
                self._list_requests[view.spec.request_id] = view.spec.task_id
            for a in task.assignments:
                stats = self._stats(a.agent_id)
                stats.won += 1
                if a.outcome is TaskState.ASSIGNED:
                    stats.load += 1
                elif a.outcome is TaskState.COMPLETED:
                    stats.completed += 1
                elif a.outcome is TaskState.FAILED:
                    stats.failed += 1
                elif a.outcome is TaskState.EXPIRED:
                    stats.expired += 1
            if task.state is TaskState.OPEN:
                if task.spec.bidding_window_s:
                    task.window_close = task.open_wall + task.spec.bidding_window_s
                    self._schedule(task.window_close, "window", task)
                if task.deadline is not None:
                    self._schedule(task.deadline, "deadline", task)
            elif task.state is TaskState.ASSIGNED and task.deadline is not None:
                self._schedule(task.deadline, "deadline", task)
        for bid in bids:
            self._sequence = max(self._sequence, bid.sequence)
            task = self.tasks.get(bid.task_id)
            if task is not None and task.state is TaskState.OPEN and bid.attempt == task.attempt:
                task.bids[bid.agent_id] = bid
        for task in self._order:
            task.changed()


def _seq(bid: Bid) -> int:
    return bid.sequence


def _digest(output: str) -> bytes:
    return hashlib.sha256(output.encode()).digest()
