"""The market's durable state in SQLite (through services.common.storage).

Three tables: tasks (one row per task, rewritten on every change), bids (one
row per agent, task and attempt: a rebid overwrites it) and assignments (one
row per auctioned attempt, rewritten when it closes). The core's journal is
written in the order the core made its decisions, one write per RPC, each
acknowledged only after its group commit; restoring reads the three tables
back into the core.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from services.common.storage import Database
from services.market.core import (
    Assignment,
    Bid,
    Dispatch,
    Record,
    SaveAssignment,
    SaveBid,
    SaveTask,
    ScoredBid,
    Scoring,
    TaskSpec,
    TaskState,
    TaskView,
)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY,
        sequence INTEGER NOT NULL,
        state INTEGER NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state)",
    """CREATE TABLE IF NOT EXISTS bids (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        price REAL NOT NULL,
        estimated_completion_s REAL NOT NULL,
        confidence REAL NOT NULL,
        issue_ns INTEGER NOT NULL,
        signature BLOB NOT NULL,
        public_key BLOB NOT NULL,
        place_wall REAL NOT NULL,
        signed_attempt INTEGER NOT NULL,
        PRIMARY KEY (task_id, attempt, agent_id)
    )""",
    """CREATE TABLE IF NOT EXISTS assignments (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        outcome INTEGER NOT NULL,
        detail TEXT NOT NULL,
        PRIMARY KEY (task_id, attempt)
    )""",
]

_BID_COLUMNS = (
    "task_id, attempt, agent_id, sequence, price, estimated_completion_s, confidence, "
    "issue_ns, signature, public_key, place_wall, signed_attempt"
)


def _spec_json(spec: TaskSpec) -> str:
    return json.dumps(
        {
            "task_type": spec.task_type,
            "requirements": list(spec.requirements),
            "capability": spec.capability,
            "args": list(spec.args),
            "priority": spec.priority,
            "reward": spec.reward,
            "bidding_window_s": spec.bidding_window_s,
            "max_attempts": spec.max_attempts,
            "scoring": int(spec.scoring),
            "request_id": spec.request_id,
            "list_wall": spec.list_wall,
            "dispatch": int(spec.dispatch),
        },
        separators=(",", ":"),
    )


def _status_json(view: TaskView) -> str:
    return json.dumps(
        {
            "attempt": view.attempt,
            "deadline": view.deadline,
            "excluded": list(view.excluded),
            "open_wall": view.open_wall,
            "close_wall": view.close_wall,
            "output": view.output,
            "error": view.error,
            "relist_request_ids": list(view.relist_request_ids),
            # Closed tasks only: their bids are not loaded back into memory.
            "bid_count": view.bid_count,
        },
        separators=(",", ":"),
    )


def _bid_row(bid: Bid) -> tuple[Any, ...]:
    return (
        bid.task_id,
        bid.attempt,
        bid.agent_id,
        bid.sequence,
        bid.price,
        bid.estimated_completion_s,
        bid.confidence,
        bid.issue_ns,
        bid.signature,
        bid.public_key,
        bid.place_wall,
        bid.signed_attempt,
    )


def _bid_from_row(row: tuple[Any, ...]) -> Bid:
    return Bid(
        task_id=row[0],
        attempt=row[1],
        agent_id=row[2],
        sequence=row[3],
        price=row[4],
        estimated_completion_s=row[5],
        confidence=row[6],
        issue_ns=row[7],
        signature=bytes(row[8]),
        public_key=bytes(row[9]),
        place_wall=row[10],
        signed_attempt=row[11],
    )


def _assignment_json(a: Assignment) -> str:
    return json.dumps(
        {
            "bid": {
                "sequence": a.won.bid.sequence,
                "price": a.won.bid.price,
                "estimated_completion_s": a.won.bid.estimated_completion_s,
                "confidence": a.won.bid.confidence,
                "issue_ns": a.won.bid.issue_ns,
                "signature": a.won.bid.signature.hex(),
                "public_key": a.won.bid.public_key.hex(),
                "place_wall": a.won.bid.place_wall,
                "signed_attempt": a.won.bid.signed_attempt,
            },
            "load": a.won.load,
            "score": a.won.score,
            "trust": a.won.trust,
            "scoring": int(a.scoring),
            "assign_wall": a.assign_wall,
            "request_id": a.request_id,
            "close_wall": a.close_wall,
            "error": a.error,
            "outcome_request_id": a.outcome_request_id,
        },
        separators=(",", ":"),
    )


def _assignment_from_row(
    task_id: str, attempt: int, agent_id: str, outcome: int, detail: str
) -> Assignment:
    d = json.loads(detail)
    b = d["bid"]
    bid = Bid(
        task_id=task_id,
        attempt=attempt,
        agent_id=agent_id,
        price=b["price"],
        estimated_completion_s=b["estimated_completion_s"],
        confidence=b["confidence"],
        issue_ns=b["issue_ns"],
        signature=bytes.fromhex(b["signature"]),
        public_key=bytes.fromhex(b["public_key"]),
        sequence=b["sequence"],
        place_wall=b["place_wall"],
        signed_attempt=b["signed_attempt"],
    )
    return Assignment(
        attempt=attempt,
        agent_id=agent_id,
        won=ScoredBid(bid, d["load"], d["score"], d["trust"]),
        scoring=Scoring(d["scoring"]),
        assign_wall=d["assign_wall"],
        request_id=d["request_id"],
        outcome=TaskState(outcome),
        close_wall=d["close_wall"],
        error=d["error"],
        outcome_request_id=d["outcome_request_id"],
    )


def _apply(conn: sqlite3.Connection, records: list[Record]) -> None:
    for record in records:
        if isinstance(record, SaveBid):
            conn.execute(
                f"INSERT OR REPLACE INTO bids ({_BID_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                _bid_row(record.bid),
            )
        elif isinstance(record, SaveTask):
            view = record.task
            conn.execute(
                "INSERT INTO tasks (task_id, sequence, state, spec, status) VALUES (?,?,?,?,?) "
                "ON CONFLICT(task_id) DO UPDATE SET state = excluded.state, status = excluded.status",
                (
                    view.spec.task_id,
                    view.spec.sequence,
                    int(view.state),
                    _spec_json(view.spec),
                    _status_json(view),
                ),
            )
        elif isinstance(record, SaveAssignment):
            a = record.assignment
            conn.execute(
                "INSERT OR REPLACE INTO assignments (task_id, attempt, agent_id, outcome, detail) "
                "VALUES (?,?,?,?,?)",
                (record.task_id, a.attempt, a.agent_id, int(a.outcome), _assignment_json(a)),
            )


class MarketStore:
    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.db = Database(path, schema=SCHEMA, synchronous=synchronous)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def write(self, records: list[Record]) -> None:
        """Persists one mutation's records; returns after the commit."""
        if records:
            await self.db.write(lambda conn: _apply(conn, records))

    async def load(self) -> tuple[list[TaskView], list[Bid], dict[str, list[Assignment]]]:
        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            return (
                conn.execute(
                    "SELECT task_id, sequence, state, spec, status FROM tasks ORDER BY sequence"
                ).fetchall(),
                # Only the bids an OPEN attempt still needs are held in memory.
                conn.execute(
                    f"SELECT {', '.join('b.' + c.strip() for c in _BID_COLUMNS.split(','))} "
                    "FROM bids b JOIN tasks t ON t.task_id = b.task_id "
                    "WHERE t.state = ? ORDER BY b.sequence",
                    (int(TaskState.OPEN),),
                ).fetchall(),
                conn.execute(
                    "SELECT task_id, attempt, agent_id, outcome, detail FROM assignments "
                    "ORDER BY task_id, attempt"
                ).fetchall(),
            )

        task_rows, bid_rows, assignment_rows = await self.db.read(read)
        assignments: dict[str, list[Assignment]] = {}
        for row in assignment_rows:
            assignments.setdefault(row[0], []).append(_assignment_from_row(*row))
        tasks = [_view_from_row(row) for row in task_rows]
        return tasks, [_bid_from_row(r) for r in bid_rows], assignments

    async def bids(self, task_id: str, attempt: int) -> list[Bid]:
        rows = await self.db.fetchall(
            f"SELECT {_BID_COLUMNS} FROM bids WHERE task_id = ? AND attempt = ? ORDER BY sequence",
            (task_id, attempt),
        )
        return [_bid_from_row(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall(
            "SELECT 'tasks', count(*) FROM tasks UNION ALL SELECT 'bids', count(*) FROM bids UNION ALL SELECT 'assignments', count(*) FROM assignments"
        )
        return {name: count for name, count in rows}


def _view_from_row(row: Iterable[Any]) -> TaskView:
    task_id, sequence, state, spec_text, status_text = row
    spec = json.loads(spec_text)
    status = json.loads(status_text)
    return TaskView(
        spec=TaskSpec(
            task_id=task_id,
            task_type=spec["task_type"],
            requirements=tuple(spec["requirements"]),
            capability=spec["capability"],
            args=tuple(spec["args"]),
            priority=spec["priority"],
            reward=spec["reward"],
            bidding_window_s=spec["bidding_window_s"],
            max_attempts=spec["max_attempts"],
            scoring=Scoring(spec["scoring"]),
            request_id=spec["request_id"],
            sequence=sequence,
            list_wall=spec["list_wall"],
            # Tasks stored before dispatch existed were run by their winners.
            dispatch=Dispatch(spec.get("dispatch", Dispatch.WINNER)),
        ),
        state=TaskState(state),
        attempt=status["attempt"],
        deadline=status["deadline"],
        excluded=tuple(status["excluded"]),
        bid_count=status.get("bid_count", 0),
        assignments=(),
        open_wall=status["open_wall"],
        close_wall=status["close_wall"],
        output=status["output"],
        error=status["error"],
        relist_request_ids=tuple(status["relist_request_ids"]),
    )
