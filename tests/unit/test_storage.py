"""The SQLite helper: group commit, isolation of failing writes, kill -9 durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from services.common.storage import Database

SCHEMA = ["CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)"]


async def test_concurrent_writes_are_group_committed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(os.path.join(str(tmp_path), "a.db"), schema=SCHEMA)
    await db.open()
    try:
        await asyncio.gather(
            *(db.execute("INSERT INTO kv VALUES (?, ?)", (f"k{i}", "v")) for i in range(500))
        )
        assert db.writes == 500
        assert db.commits < 500  # batched
        assert (await db.fetchone("SELECT count(*) FROM kv"))[0] == 500
    finally:
        await db.close()


async def test_a_failing_write_does_not_undo_its_batch_neighbours(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(os.path.join(str(tmp_path), "a.db"), schema=SCHEMA)
    await db.open()
    try:
        await db.execute("INSERT INTO kv VALUES ('dup', 'v')")
        results = await asyncio.gather(
            db.execute("INSERT INTO kv VALUES ('a', 'v')"),
            db.execute("INSERT INTO kv VALUES ('dup', 'v')"),
            db.execute("INSERT INTO kv VALUES ('b', 'v')"),
            return_exceptions=True,
        )
        assert isinstance(results[1], sqlite3.IntegrityError)
        rows = await db.fetchall("SELECT k FROM kv ORDER BY k")
        assert [r[0] for r in rows] == ["a", "b", "dup"]
    finally:
        await db.close()


def test_synchronous_mode_is_checked() -> None:
    with pytest.raises(ValueError):
        Database("x.db", synchronous="OFF")


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from services.common.storage import Database

    async def main():
        db = Database(sys.argv[1], schema=["CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)"])
        await db.open()
        i = 0
        while True:
            await db.execute("INSERT INTO kv VALUES (?, 'v')", (f"k{i}",))
            print(i, flush=True)  # acknowledged: committed
            i += 1

    asyncio.run(main())
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "durable.db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    conn = sqlite3.connect(path)
    try:
        stored = {row[0] for row in conn.execute("SELECT k FROM kv")}
    finally:
        conn.close()
    assert {f"k{i}" for i in range(acknowledged + 1)} <= stored
