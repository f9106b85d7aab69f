"""The event bus: cursors, durable retained history, and subscribers with
bounded queues. No grpc here.

Design notes
- One writer task gives events their cursors, commits each batch (events,
  the watch positions they came from, and the trimming of history beyond
  the retention bound) in one transaction, and only then appends them to the
  in-memory history and offers them to subscribers. So a subscriber never
  sees an event a crash could take back, cursors are in commit order, and a
  restarted orchestrator serves the same cursors from its database.
- Idempotency: a draft with a request_id that a retained event already has
  is not committed again (the publisher gets the first event back). The
  aggregated watch streams need none: each batch is committed with the
  stream position it came from, so a restarted orchestrator resumes each
  stream right after what it already committed.
- Subscribers: offering an event to a subscriber never blocks and never
  waits for it (publishers are never slowed by a slow reader). Each has a
  bounded queue; when it is full the subscriber is marked lagged and gets no
  more live events until its stream has drained the queue, told the reader
  (Lag), and re-read everything after its last cursor from the history. The
  history read and the return to live delivery happen with no await between
  them, so nothing is skipped or sent twice.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgument, OutOfRange
from services.common.storage import Database
from services.orchestrator.events import Draft, Event, TypeFilter

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        cursor INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        subject TEXT NOT NULL,
        wall REAL NOT NULL,
        attributes TEXT NOT NULL,
        summary TEXT NOT NULL,
        request_id TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS positions (
        source TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS bus_meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
]

BATCH_EVENTS = 256
# Well under the usual 4 MiB message limit, whatever the events carry.
BATCH_BYTES = 1 << 20
MAX_JOBS_PER_COMMIT = 512


@dataclass(slots=True)
class Batch:
    """One message of a subscription."""

    events: list[Event]
    # The subscriber is current through this cursor.
    cursor: int
    caught_up: bool = False
    # Set when the subscriber lagged: (resume cursor, cursors missed).
    lag: tuple[int, int] | None = None


@dataclass(slots=True)
class _Job:
    drafts: Sequence[Draft]
    position: tuple[str, int] | None
    future: asyncio.Future[list[tuple[Event, bool]]]


class Subscription:
    """One subscriber: its filter, bounded queue and lag state."""

    __slots__ = ("backlog", "head", "lagged", "queue", "queue_size", "start", "wake", "wants")

    def __init__(
        self, wants: TypeFilter, queue_size: int, start: int, head: int, backlog: list[Event]
    ) -> None:
        self.wants = wants
        self.queue_size = queue_size
        self.queue: deque[Event] = deque()
        self.wake = asyncio.Event()
        self.lagged = False
        self.start = start
        # The bus's head when it subscribed: newer events come through the queue.
        self.head = head
        self.backlog = backlog

    def offer(self, event: Event) -> None:
        """Called by the bus for every committed event; never blocks."""
        if self.lagged or not self.wants(event.type):
            return
        if len(self.queue) >= self.queue_size:
            self.lagged = True
        else:
            self.queue.append(event)
        self.wake.set()


class EventBus:
    def __init__(
        self,
        db: Database | None,
        *,
        history: int = 10_000,
        queue_size: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history < 1 or queue_size < 1:
            raise ValueError("history and queue_size must be >= 1")
        self.db = db
        self.history = history
        self.queue_size = queue_size
        self._clock = clock
        self._events: list[Event] = []
        self._cursors: list[int] = []
        self._start = 0
        self._by_request: dict[str, Event] = {}
        self._subs: set[Subscription] = set()
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.head = 0
        self.positions: dict[str, int] = {}
        self.published = 0
        self.lags = 0

    # --- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Loads the retained history and watch positions, starts the writer."""
        if self.db is not None:
            rows, positions, head = await self.db.read(self._load)
            self.positions = dict(positions)
            for row in rows:
                event = Event(
                    cursor=row[0],
                    type=row[1],
                    source=row[2],
                    subject=row[3],
                    wall=row[4],
                    attributes=json.loads(row[5]),
                    summary=row[6],
                    request_id=row[7],
                )
                self._append(event)
            self.head = max(head, self._cursors[-1] if self._cursors else 0)
        self._writer = asyncio.create_task(self._write_loop(), name="event-bus-writer")

    def _load(self, conn: sqlite3.Connection) -> tuple[list[tuple], list[tuple], int]:
        rows = conn.execute(
            "SELECT cursor, type, source, subject, wall, attributes, summary, request_id "
            "FROM events ORDER BY cursor DESC LIMIT ?",
            (self.history,),
        ).fetchall()
        rows.reverse()
        positions = conn.execute("SELECT source, position FROM positions").fetchall()
        head = conn.execute("SELECT value FROM bus_meta WHERE key = 'head'").fetchone()
        return rows, positions, head[0] if head else 0

    async def close(self) -> None:
        """Commits what was queued, then stops the writer."""
        if self._writer is None:
            return
        await self._jobs.join()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    # --- history ------------------------------------------------------------------

    @property
    def oldest(self) -> int:
        """The oldest retained cursor (head + 1 when nothing is retained)."""
        return self._cursors[self._start] if self._start < len(self._cursors) else self.head + 1

    @property
    def retained(self) -> int:
        return len(self._cursors) - self._start

    def _append(self, event: Event) -> None:
        self._events.append(event)
        self._cursors.append(event.cursor)
        if event.request_id:
            self._by_request[event.request_id] = event
        while len(self._cursors) - self._start > self.history:
            old = self._events[self._start]
            if old.request_id and self._by_request.get(old.request_id) is old:
                del self._by_request[old.request_id]
            self._start += 1
        if self._start > self.history:
            del self._events[: self._start]
            del self._cursors[: self._start]
            self._start = 0

    def since(self, cursor: int) -> list[Event]:
        """Retained events after ``cursor``, oldest first."""
        i = bisect.bisect_right(self._cursors, cursor, lo=self._start)
        return self._events[i:]

    def check_cursor(self, cursor: int, field: str = "from_cursor") -> None:
        """OUT_OF_RANGE for a cursor ahead of the bus or older than what is
        retained (resuming from it would silently skip events)."""
        if cursor < 0:
            raise InvalidArgument(
                f"{field} must not be negative, got {cursor}", field=field, reason="OUT_OF_RANGE"
            )
        if cursor > self.head:
            raise OutOfRange(
                f"{field} {cursor} is ahead of the bus (its newest cursor is {self.head})",
                field=field,
                reason="CURSOR_IN_FUTURE",
                metadata={"head_cursor": str(self.head)},
            )
        if cursor < self.oldest - 1:
            raise OutOfRange(
                f"events after cursor {cursor} are no longer retained (the oldest is "
                f"{self.oldest}); subscribe from_oldest or from 0",
                field=field,
                reason="CURSOR_EXPIRED",
                metadata={"oldest_cursor": str(self.oldest), "head_cursor": str(self.head)},
            )

    def find(self, request_id: str) -> Event | None:
        return self._by_request.get(request_id)

    # --- publishing ---------------------------------------------------------------------

    async def publish(
        self, drafts: Sequence[Draft], *, position: tuple[str, int] | None = None
    ) -> list[tuple[Event, bool]]:
        """Commits ``drafts`` (and, with them, a watch ``position``); returns
        each event with whether it was a duplicate of a retained one."""
        if self._writer is None:
            raise RuntimeError("the event bus is not open")
        future: asyncio.Future[list[tuple[Event, bool]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._jobs.put_nowait(_Job(drafts, position, future))
        return await future

    async def publish_one(self, draft: Draft) -> tuple[Event, bool]:
        return (await self.publish([draft]))[0]

    async def _write_loop(self) -> None:
        while True:
            jobs = [await self._jobs.get()]
            while not self._jobs.empty() and len(jobs) < MAX_JOBS_PER_COMMIT:
                jobs.append(self._jobs.get_nowait())
            try:
                await self._commit(jobs)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.cancel()
                raise
            except Exception as exc:
                log.exception("event bus commit failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                for _ in jobs:
                    self._jobs.task_done()

    async def _commit(self, jobs: list[_Job]) -> None:
        wall = self._clock()
        first = self.head + 1
        cursor = self.head
        fresh: list[Event] = []
        seen: dict[str, Event] = {}
        results: list[list[tuple[Event, bool]]] = []
        positions: dict[str, int] = {}
        for job in jobs:
            out = []
            for draft in job.drafts:
                known = (
                    (self._by_request.get(draft.request_id) or seen.get(draft.request_id))
                    if draft.request_id
                    else None
                )
                if known is not None:
                    out.append((known, True))
                    continue
                cursor += 1
                event = Event(
                    cursor=cursor,
                    type=draft.type,
                    source=draft.source,
                    subject=draft.subject,
                    wall=wall,
                    attributes=dict(draft.attributes),
                    summary=draft.summary,
                    request_id=draft.request_id,
                )
                if draft.request_id:
                    seen[draft.request_id] = event
                fresh.append(event)
                out.append((event, False))
            if job.position is not None:
                positions[job.position[0]] = job.position[1]
            results.append(out)
        if self.db is not None and (fresh or positions):
            keep_after = cursor - self.history
            await self.db.write(lambda conn: _store(conn, fresh, positions, cursor, keep_after))
        self.head = max(self.head, cursor)
        self.positions.update(positions)
        for event in fresh:
            self._append(event)
            for sub in list(self._subs):
                sub.offer(event)
        self.published += len(fresh)
        if fresh and fresh[0].cursor != first:  # pragma: no cover - an invariant
            log.error("cursor gap: expected %d, got %d", first, fresh[0].cursor)
        for job, out in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(out)

    # --- subscribing --------------------------------------------------------------------

    def subscribe(
        self, wants: TypeFilter, *, from_cursor: int = 0, from_oldest: bool = False
    ) -> Subscription:
        """A subscription, registered at once: its backlog (retained events
        after the cursor) and its live events meet without a gap."""
        if from_oldest:
            if from_cursor:
                raise InvalidArgument(
                    "from_cursor must be 0 with from_oldest",
                    field="from_cursor",
                    reason="CONFLICTING_FIELDS",
                )
            start = self.oldest - 1
        elif from_cursor:
            self.check_cursor(from_cursor)
            start = from_cursor
        else:
            start = self.head
        backlog = [e for e in self.since(start) if wants(e.type)] if start < self.head else []
        sub = Subscription(wants, self.queue_size, start, self.head, backlog)
        self._subs.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def stream(self, sub: Subscription) -> AsyncIterator[Batch]:
        """The messages of one subscription, until the caller stops."""
        try:
            last = sub.start
            for chunk in chunks(sub.backlog):
                last = chunk[-1].cursor
                yield Batch(chunk, last)
            sub.backlog = []
            # Current through the head as it was at subscription: anything
            # newer arrives through the queue.
            yield Batch([], max(last, sub.head), caught_up=True)
            while True:
                if sub.queue:
                    chunk = []
                    size = 0
                    while sub.queue and len(chunk) < BATCH_EVENTS and size < BATCH_BYTES:
                        chunk.append(sub.queue.popleft())
                        size += _size(chunk[-1])
                    last = chunk[-1].cursor
                    yield Batch(chunk, last)
                    continue
                if sub.lagged:
                    # The queue is drained: re-read the rest from history and
                    # go live again, with no await in between.
                    missed = max(0, self.oldest - 1 - last)
                    backlog = [e for e in self.since(last) if sub.wants(e.type)]
                    sub.lagged = False
                    self.lags += 1
                    yield Batch([], last, lag=(last, missed))
                    for chunk in chunks(backlog):
                        last = chunk[-1].cursor
                        yield Batch(chunk, last)
                    continue
                sub.wake.clear()
                await sub.wake.wait()
        finally:
            self._subs.discard(sub)


def _size(event: Event) -> int:
    return 64 + len(event.summary) + sum(len(k) + len(v) for k, v in event.attributes.items())


def chunks(events: list[Event]) -> list[list[Event]]:
    """``events`` cut into stream messages of bounded count and size."""
    out: list[list[Event]] = []
    chunk: list[Event] = []
    size = 0
    for event in events:
        n = _size(event)
        if chunk and (len(chunk) >= BATCH_EVENTS or size + n > BATCH_BYTES):
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(event)
        size += n
    if chunk:
        out.append(chunk)
    return out


def _store(
    conn: sqlite3.Connection,
    events: list[Event],
    positions: dict[str, int],
    head: int,
    keep_after: int,
) -> None:
    conn.executemany(
        "INSERT INTO events (cursor, type, source, subject, wall, attributes, summary, "
        "request_id) VALUES (?,?,?,?,?,?,?,?)",
        [
            (
                e.cursor,
                e.type,
                e.source,
                e.subject,
                e.wall,
                json.dumps(dict(e.attributes), separators=(",", ":")),
                e.summary,
                e.request_id,
            )
            for e in events
        ],
    )
    conn.executemany(
        "INSERT INTO positions (source, position) VALUES (?, ?) "
        "ON CONFLICT(source) DO UPDATE SET position = excluded.position",
        list(positions.items()),
    )
    conn.execute(
        "INSERT INTO bus_meta (key, value) VALUES ('head', ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (head,),
    )
    if events and keep_after > 0:
        conn.execute("DELETE FROM events WHERE cursor <= ?", (keep_after,))
