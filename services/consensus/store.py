"""The consensus service's durable state in SQLite, and the ordered journal
every change goes through.

Tables: proposals (one row each; decision, certificate and, once closed, the
final tally), electorate (each voter's key as snapshotted at propose time),
votes (the first signed vote of each voter), evidence (both signed votes of
an equivocator), trust_outbox (evidence not yet recorded by trust) and events
(one row per durable change, the history ``Watch`` resumes from).

``Journal`` commits changes in the order they were made: the core mutates its
in-memory state and submits the matching write in the same synchronous step,
the journal runs every submitted write of a round in one transaction, and
only after the commit resolves each writer and runs its ``on_commit`` hook
(which publishes events). So watchers see changes in index order, and never
one that is not durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.storage import Database

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS proposals (
        seq INTEGER PRIMARY KEY,
        proposal_id TEXT NOT NULL UNIQUE,
        operation TEXT NOT NULL,
        proposer_id TEXT NOT NULL,
        strategy INTEGER NOT NULL,
        electorate_capability TEXT NOT NULL,
        electorate_size INTEGER NOT NULL,
        create_time REAL NOT NULL,
        deadline_time REAL NOT NULL,
        request_id TEXT,
        status INTEGER NOT NULL,
        decide_time REAL,
        certificate TEXT,
        approvals INTEGER NOT NULL DEFAULT 0,
        rejections INTEGER NOT NULL DEFAULT 0,
        excluded INTEGER NOT NULL DEFAULT 0,
        voted INTEGER NOT NULL DEFAULT 0,
        closed INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS proposals_by_request ON proposals(request_id)"
    " WHERE request_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS proposals_live ON proposals(closed) WHERE closed = 0",
    """CREATE TABLE IF NOT EXISTS electorate (
        proposal_seq INTEGER NOT NULL,
        voter_id TEXT NOT NULL,
        public_key BLOB NOT NULL,
        PRIMARY KEY (proposal_seq, voter_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS votes (
        proposal_seq INTEGER NOT NULL,
        voter_id TEXT NOT NULL,
        arrival INTEGER NOT NULL,
        choice INTEGER NOT NULL,
        signature BLOB NOT NULL,
        receive_time REAL NOT NULL,
        PRIMARY KEY (proposal_seq, voter_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS evidence (
        seq INTEGER PRIMARY KEY,
        evidence_id TEXT NOT NULL UNIQUE,
        proposal_seq INTEGER NOT NULL,
        voter_id TEXT NOT NULL,
        first_choice INTEGER NOT NULL,
        first_signature BLOB NOT NULL,
        first_time REAL NOT NULL,
        second_choice INTEGER NOT NULL,
        second_signature BLOB NOT NULL,
        second_time REAL NOT NULL,
        detect_time REAL NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0,
        UNIQUE (proposal_seq, voter_id)
    )""",
    """CREATE TABLE IF NOT EXISTS trust_outbox (
        evidence_id TEXT PRIMARY KEY,
        subject_id TEXT NOT NULL,
        detect_time REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        event_index INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        proposal_seq INTEGER NOT NULL,
        voter_id TEXT NOT NULL,
        event_time REAL NOT NULL,
        status INTEGER NOT NULL,
        approvals INTEGER NOT NULL,
        rejections INTEGER NOT NULL,
        excluded INTEGER NOT NULL,
        voted INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_proposal ON events(proposal_seq, event_index)",
]

PROPOSAL_COLUMNS = (
    "seq, proposal_id, operation, proposer_id, strategy, electorate_capability, electorate_size,"
    " create_time, deadline_time, request_id, status, decide_time, certificate, approvals,"
    " rejections, excluded, voted, closed"
)
EVIDENCE_COLUMNS = (
    "e.evidence_id, p.proposal_id, e.voter_id, e.first_choice, e.first_signature, e.first_time,"
    " e.second_choice, e.second_signature, e.second_time, e.detect_time, e.reported, e.seq"
)


class StorageFailed(Exception):
    """A journal round did not commit; nothing of it is durable."""


@dataclass
class _Entry:
    write: Callable[[sqlite3.Connection], None]
    on_commit: Callable[[], None] | None
    future: asyncio.Future[None]


class Journal:
    """Ordered group commit of the core's changes (see the module docstring)."""

    def __init__(self, db: Database, on_failure: Callable[[BaseException], None]) -> None:
        self.db = db
        self._on_failure = on_failure
        self._entries: list[_Entry] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="consensus-journal")

    async def stop(self) -> None:
        """Commits what is queued, then stops."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None

    def submit(
        self,
        write: Callable[[sqlite3.Connection], None],
        on_commit: Callable[[], None] | None = None,
    ) -> asyncio.Future[None]:
        """Queues ``write``; the returned future resolves after its commit.
        Synchronous on purpose: the caller's memory change and its place in
        the commit order are decided in the same step."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._entries.append(_Entry(write, on_commit, future))
        self._wake.set()
        return future

    def fail_pending(self, exc: BaseException) -> None:
        """Fails every write queued and not yet started."""
        entries, self._entries = self._entries, []
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(exc)

    async def _run(self) -> None:
        while True:
            if not self._entries:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            entries, self._entries = self._entries, []

            def write_all(conn: sqlite3.Connection, entries: list[_Entry] = entries) -> None:
                for entry in entries:
                    entry.write(conn)

            try:
                await self.db.write(write_all)
            except asyncio.CancelledError:
                for entry in entries:
                    if not entry.future.done():
                        entry.future.set_exception(StorageFailed("the service is stopping"))
                raise
            except Exception as exc:
                log.exception("consensus journal: a commit of %d changes failed", len(entries))
                for entry in entries:
                    if not entry.future.done():
                        entry.future.set_exception(StorageFailed(str(exc)))
                self._on_failure(exc)
                continue
            self.rounds += 1
            for entry in entries:
                if entry.on_commit is not None:
                    try:
                        entry.on_commit()
                    except Exception:
                        log.exception("consensus journal: an on-commit hook failed")
                if not entry.future.done():
                    entry.future.set_result(None)


# --- writes (run on the database's writer thread) ------------------------------------


def insert_proposal(
    conn: sqlite3.Connection, row: Sequence[Any], electorate: Iterable[tuple[str, bytes]]
) -> None:
    conn.execute(
        "INSERT INTO proposals (seq, proposal_id, operation, proposer_id, strategy,"
        " electorate_capability, electorate_size, create_time, deadline_time, request_id, status)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    seq = row[0]
    conn.executemany(
        "INSERT INTO electorate (proposal_seq, voter_id, public_key) VALUES (?, ?, ?)",
        [(seq, voter_id, key) for voter_id, key in electorate],
    )


def insert_vote(
    conn: sqlite3.Connection,
    seq: int,
    voter_id: str,
    arrival: int,
    choice: int,
    signature: bytes,
    receive_time: float,
) -> None:
    conn.execute(
        "INSERT INTO votes (proposal_seq, voter_id, arrival, choice, signature, receive_time)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (seq, voter_id, arrival, choice, signature, receive_time),
    )


def insert_event(conn: sqlite3.Connection, row: Sequence[Any]) -> None:
    conn.execute(
        "INSERT INTO events (event_index, type, proposal_seq, voter_id, event_time, status,"
        " approvals, rejections, excluded, voted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )


def record_decision(
    conn: sqlite3.Connection,
    seq: int,
    status: int,
    decide_time: float,
    certificate_voters: list[str],
    certificate_evidence: list[str],
) -> None:
    conn.execute(
        "UPDATE proposals SET status = ?, decide_time = ?, certificate = ? WHERE seq = ?",
        (
            status,
            decide_time,
            json.dumps({"voters": certificate_voters, "evidence": certificate_evidence}),
            seq,
        ),
    )


def insert_evidence(conn: sqlite3.Connection, row: Sequence[Any], subject_id: str) -> None:
    """The evidence and its trust report, in one step: evidence is never kept
    without the report that it still owes."""
    conn.execute(
        "INSERT INTO evidence (evidence_id, proposal_seq, voter_id, first_choice,"
        " first_signature, first_time, second_choice, second_signature, second_time,"
        " detect_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    conn.execute(
        "INSERT INTO trust_outbox (evidence_id, subject_id, detect_time) VALUES (?, ?, ?)",
        (row[0], subject_id, row[9]),
    )


def close_proposal(
    conn: sqlite3.Connection,
    seq: int,
    status: int,
    decide_time: float | None,
    approvals: int,
    rejections: int,
    excluded: int,
    voted: int,
) -> None:
    conn.execute(
        "UPDATE proposals SET status = ?, decide_time = ?, approvals = ?, rejections = ?,"
        " excluded = ?, voted = ?, closed = 1 WHERE seq = ?",
        (status, decide_time, approvals, rejections, excluded, voted, seq),
    )


def mark_reported(conn: sqlite3.Connection, evidence_id: str) -> None:
    conn.execute("DELETE FROM trust_outbox WHERE evidence_id = ?", (evidence_id,))
    conn.execute("UPDATE evidence SET reported = 1 WHERE evidence_id = ?", (evidence_id,))


# --- reads (run on the database's reader thread) -------------------------------------


def counters(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """The highest proposal seq, event index and evidence seq in use."""
    proposal = conn.execute("SELECT coalesce(max(seq), 0) FROM proposals").fetchone()[0]
    event = conn.execute("SELECT coalesce(max(event_index), 0) FROM events").fetchone()[0]
    evidence = conn.execute("SELECT coalesce(max(seq), 0) FROM evidence").fetchone()[0]
    return proposal, event, evidence


def live_proposals(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE closed = 0 ORDER BY seq"
    ).fetchall()


def proposal_by_id(conn: sqlite3.Connection, proposal_id: str) -> tuple[Any, ...] | None:
    return conn.execute(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE proposal_id = ?", (proposal_id,)
    ).fetchone()


def proposal_by_seq(conn: sqlite3.Connection, seq: int) -> tuple[Any, ...] | None:
    return conn.execute(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE seq = ?", (seq,)
    ).fetchone()


def proposal_by_request(conn: sqlite3.Connection, request_id: str) -> tuple[Any, ...] | None:
    return conn.execute(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE request_id = ?", (request_id,)
    ).fetchone()


def proposal_details(
    conn: sqlite3.Connection, seq: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(electorate rows, vote rows in arrival order, evidence rows) of one proposal."""
    electorate = conn.execute(
        "SELECT voter_id, public_key FROM electorate WHERE proposal_seq = ? ORDER BY voter_id",
        (seq,),
    ).fetchall()
    votes = conn.execute(
        "SELECT voter_id, choice, signature, receive_time, arrival FROM votes"
        " WHERE proposal_seq = ? ORDER BY arrival",
        (seq,),
    ).fetchall()
    evidence = conn.execute(
        f"SELECT {EVIDENCE_COLUMNS} FROM evidence e JOIN proposals p ON p.seq = e.proposal_seq"
        " WHERE e.proposal_seq = ? ORDER BY e.seq",
        (seq,),
    ).fetchall()
    return electorate, votes, evidence


def proposals_page(
    conn: sqlite3.Connection, before_seq: int | None, statuses: Sequence[int], limit: int
) -> list[tuple[Any, ...]]:
    where, params = [], []
    if before_seq is not None:
        where.append("seq < ?")
        params.append(before_seq)
    if statuses:
        where.append(f"status IN ({','.join('?' * len(statuses))})")
        params.extend(statuses)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return conn.execute(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals {clause} ORDER BY seq DESC LIMIT ?",
        (*params, limit),
    ).fetchall()


def evidence_page(
    conn: sqlite3.Connection,
    before_seq: int | None,
    proposal_id: str,
    voter_id: str,
    limit: int,
) -> list[tuple[Any, ...]]:
    where, params = [], []
    if before_seq is not None:
        where.append("e.seq < ?")
        params.append(before_seq)
    if proposal_id:
        where.append("p.proposal_id = ?")
        params.append(proposal_id)
    if voter_id:
        where.append("e.voter_id = ?")
        params.append(voter_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return conn.execute(
        f"SELECT {EVIDENCE_COLUMNS} FROM evidence e JOIN proposals p ON p.seq = e.proposal_seq"
        f" {clause} ORDER BY e.seq DESC LIMIT ?",
        (*params, limit),
    ).fetchall()


def outbox(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT evidence_id, subject_id, detect_time FROM trust_outbox ORDER BY detect_time"
    ).fetchall()


def events_range(
    conn: sqlite3.Connection,
    after: int,
    upto: int,
    proposal_seq: int | None,
    types: Sequence[int],
    limit: int,
) -> list[tuple[Any, ...]]:
    where, params = ["event_index > ?", "event_index <= ?"], [after, upto]
    if proposal_seq is not None:
        where.append("proposal_seq = ?")
        params.append(proposal_seq)
    if types:
        where.append(f"type IN ({','.join('?' * len(types))})")
        params.extend(types)
    return conn.execute(
        "SELECT event_index, type, proposal_seq, voter_id, event_time, status, approvals,"
        f" rejections, excluded, voted FROM events WHERE {' AND '.join(where)}"
        " ORDER BY event_index LIMIT ?",
        (*params, limit),
    ).fetchall()
