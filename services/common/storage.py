"""Durable state in SQLite (WAL) with group commit, for the services that keep it.

Writes go to one writer thread. It takes every write waiting in its queue, runs
them in one transaction (each in its own savepoint, so one failing write does
not undo its neighbours), commits once, and only then resolves each caller's
future. A write is therefore acknowledged only after its commit, and a hot path
with many concurrent writers pays for one commit per batch, not per write.

Durability: in WAL mode with ``synchronous=NORMAL`` a commit is in the WAL file
(the OS page cache) when it returns, so an acknowledged write survives
``kill -9`` of the process; only a power loss or kernel crash can take the last
commits. ``synchronous=FULL`` (DB_SYNCHRONOUS=FULL) fsyncs every commit and
survives power loss too.

Reads run on a separate reader thread with its own connection; WAL lets them
proceed while the writer commits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()


class Database:
    """An SQLite database file with an asyncio API and group-committed writes."""

    def __init__(
        self,
        path: str,
        *,
        schema: Sequence[str] = (),
        synchronous: str = "NORMAL",
        max_batch: int = 512,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        self.schema = list(schema)
        self.synchronous = synchronous
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._read_executor: Any = None
        self.commits = 0
        self.writes = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    async def open(self) -> None:
        if os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = self._connect()
        with conn:
            for statement in self.schema:
                conn.execute(statement)
        self._writer = threading.Thread(
            target=self._write_loop,
            args=(conn,),
            name=f"sqlite-writer:{os.path.basename(self.path)}",
            daemon=True,
        )
        self._writer.start()
        from concurrent.futures import ThreadPoolExecutor

        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._reader = self._connect()
        self._reader.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        """Finishes every queued write, then closes."""
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_executor is not None:
            self._read_executor.shutdown(wait=True)
            self._read_executor = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # --- writes -----------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn(conn)`` inside a transaction; returns after the commit."""
        if self._writer is None:
            raise RuntimeError("database is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, future, loop))
        return await future

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement; returns the number of rows it changed."""
        return await self.write(lambda conn: conn.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        rows = list(rows)
        return await self.write(lambda conn: conn.executemany(sql, rows).rowcount)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _future, _loop in batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append((False, exc))
                else:
                    conn.execute("RELEASE w")
                    results.append((True, value))
            conn.execute("COMMIT")
            self.commits += 1
            self.writes += len(batch)
        except Exception as exc:  # the commit itself failed: nobody's write landed
            log.exception("sqlite commit failed")
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(False, exc)] * len(batch)
        for (_fn, future, loop), (ok, value) in zip(batch, results, strict=True):
            loop.call_soon_threadsafe(_resolve, future, ok, value)

    # --- reads ------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn(conn)`` on the reader connection."""
        if self._reader is None:
            raise RuntimeError("database is not open")
        reader = self._reader
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, fn, reader)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.read(lambda conn: conn.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return await self.read(lambda conn: conn.execute(sql, params).fetchone())


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
