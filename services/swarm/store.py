"""Durable swarm state in SQLite (services.common.storage): pools and their
votes, the hive mind (beliefs, intentions, decisions, generation and each
agent's latest write), and flocks (definition and current boid state).

Every change is written through ``Database.write`` (group-committed) and the
RPC that made it is acknowledged only after the commit, so an acknowledged
vote, hive write or flock step survives kill -9 of the service.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.storage import Database
from services.swarm.core import (
    Belief,
    Decision,
    HiveWrite,
    Intention,
    Pool,
    Threshold,
    Vote,
)
from services.swarm.flock import Flock, FlockRecord, FlockRules, World

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pools (
        pool_id TEXT PRIMARY KEY,
        topic TEXT NOT NULL,
        threshold INTEGER NOT NULL,
        duration_s REAL NOT NULL,
        min_votes INTEGER NOT NULL,
        create_wall REAL NOT NULL,
        request_id TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS votes (
        pool_id TEXT NOT NULL REFERENCES pools(pool_id) ON DELETE CASCADE,
        agent_id TEXT NOT NULL,
        decision TEXT NOT NULL,
        confidence REAL NOT NULL,
        weight REAL NOT NULL,
        issue_ns INTEGER NOT NULL,
        signature BLOB NOT NULL,
        wall REAL NOT NULL,
        PRIMARY KEY (pool_id, agent_id)
    )""",
    "CREATE TABLE IF NOT EXISTS hive_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS beliefs (
        name TEXT PRIMARY KEY, confidence REAL NOT NULL, source TEXT NOT NULL,
        generation INTEGER NOT NULL, wall REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS intentions (
        text TEXT PRIMARY KEY, source TEXT NOT NULL, generation INTEGER NOT NULL,
        wall REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS decisions (
        topic TEXT PRIMARY KEY, decision TEXT NOT NULL, confidence REAL NOT NULL,
        pool_id TEXT NOT NULL, final INTEGER NOT NULL, generation INTEGER NOT NULL,
        wall REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS hive_writers (
        agent_id TEXT PRIMARY KEY, issue_ns INTEGER NOT NULL, signature BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS flocks (
        flock_id TEXT PRIMARY KEY,
        boids INTEGER NOT NULL,
        rules TEXT NOT NULL,
        world TEXT NOT NULL,
        seed INTEGER NOT NULL,
        create_wall REAL NOT NULL,
        request_id TEXT NOT NULL,
        steps INTEGER NOT NULL,
        state BLOB NOT NULL,
        last_step_request TEXT NOT NULL DEFAULT '',
        last_step_orders TEXT NOT NULL DEFAULT ''
    )""",
]


@dataclass
class Loaded:
    pools: list[Pool]
    generation: int
    beliefs: list[Belief]
    intentions: list[Intention]
    decisions: list[Decision]
    writers: list[tuple[str, int, bytes]]
    flocks: list[FlockRecord]


class SwarmStore:
    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.db = Database(path, schema=SCHEMA, synchronous=synchronous)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    # --- loading --------------------------------------------------------------------

    async def load(self) -> Loaded:
        return await self.db.read(_load)

    # --- pools ------------------------------------------------------------------------

    async def save_pool(self, pool: Pool) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO pools VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                pool.pool_id,
                pool.topic,
                int(pool.threshold),
                pool.duration_s,
                pool.min_votes,
                pool.create_wall,
                pool.request_id,
            ),
        )

    async def save_vote(self, pool_id: str, vote: Vote) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pool_id,
                vote.agent_id,
                vote.decision,
                vote.confidence,
                vote.weight,
                vote.issue_ns,
                vote.signature,
                vote.wall,
            ),
        )

    async def delete_pools(self, pool_ids: Iterable[str]) -> None:
        ids = [(p,) for p in pool_ids]
        if ids:
            await self.db.executemany("DELETE FROM pools WHERE pool_id = ?", ids)

    # --- the hive ----------------------------------------------------------------------

    async def save_hive(self, write: HiveWrite) -> None:
        """Persists one hive write: its change (if any) and the writer's latest
        signed write (the replay guard)."""
        event = write.event
        if event is None and write.writer is None:
            return

        def apply(conn: sqlite3.Connection) -> None:
            if write.writer is not None:
                agent_id, issue_ns, signature = write.writer
                conn.execute(
                    "INSERT OR REPLACE INTO hive_writers VALUES (?, ?, ?)",
                    (agent_id, issue_ns, signature),
                )
            if event is None:
                return
            conn.execute(
                "INSERT OR REPLACE INTO hive_meta VALUES ('generation', ?)", (event.generation,)
            )
            if event.removed_belief:
                conn.execute("DELETE FROM beliefs WHERE name = ?", (event.removed_belief,))
            if event.belief is not None:
                b = event.belief
                conn.execute(
                    "INSERT OR REPLACE INTO beliefs VALUES (?, ?, ?, ?, ?)",
                    (b.name, b.confidence, b.source, b.generation, b.wall),
                )
            if event.intention is not None:
                i = event.intention
                conn.execute(
                    "INSERT OR REPLACE INTO intentions VALUES (?, ?, ?, ?)",
                    (i.text, i.source, i.generation, i.wall),
                )
            if event.decision is not None:
                d = event.decision
                conn.execute(
                    "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        d.topic,
                        d.decision,
                        d.confidence,
                        d.pool_id,
                        int(d.final),
                        d.generation,
                        d.wall,
                    ),
                )

        await self.db.write(apply)

    # --- flocks -------------------------------------------------------------------------

    async def save_flock(self, record: FlockRecord) -> None:
        flock = record.flock
        await self.db.execute(
            "INSERT OR REPLACE INTO flocks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.flock_id,
                flock.size,
                json.dumps(flock.rules.to_dict()),
                json.dumps({"width": flock.world.width, "height": flock.world.height}),
                record.seed,
                record.create_wall,
                record.request_id,
                flock.steps,
                flock.state_bytes(),
                record.last_step_request,
                json.dumps(record.last_step_orders) if record.last_step_orders else "",
            ),
        )

    async def delete_flock(self, flock_id: str) -> None:
        await self.db.execute("DELETE FROM flocks WHERE flock_id = ?", (flock_id,))


def _load(conn: sqlite3.Connection) -> Loaded:
    pools: dict[str, Pool] = {}
    for row in conn.execute("SELECT * FROM pools ORDER BY pool_id"):
        pool_id, topic, threshold, duration_s, min_votes, create_wall, request_id = row
        pools[pool_id] = Pool(
            pool_id=pool_id,
            topic=topic,
            threshold=Threshold(threshold),
            duration_s=duration_s,
            min_votes=min_votes,
            create_wall=create_wall,
            request_id=request_id,
        )
    for row in conn.execute("SELECT * FROM votes ORDER BY wall"):
        pool_id, agent_id, decision, confidence, weight, issue_ns, signature, wall = row
        pool = pools.get(pool_id)
        if pool is not None:
            pool.votes[agent_id] = Vote(
                agent_id, decision, confidence, weight, issue_ns, bytes(signature), wall
            )
    meta = conn.execute("SELECT value FROM hive_meta WHERE key = 'generation'").fetchone()
    beliefs = [Belief(*row) for row in conn.execute("SELECT * FROM beliefs")]
    intentions = [Intention(*row) for row in conn.execute("SELECT * FROM intentions")]
    decisions = [
        Decision(topic, decision, confidence, pool_id, bool(final), generation, wall)
        for topic, decision, confidence, pool_id, final, generation, wall in conn.execute(
            "SELECT * FROM decisions"
        )
    ]
    writers = [
        (agent_id, issue_ns, bytes(signature))
        for agent_id, issue_ns, signature in conn.execute("SELECT * FROM hive_writers")
    ]
    flocks = []
    for row in conn.execute("SELECT * FROM flocks"):
        (
            flock_id,
            boids,
            rules,
            world,
            seed,
            create_wall,
            request_id,
            steps,
            state,
            last_step_request,
            last_step_orders,
        ) = row
        rules_value = FlockRules.from_dict(json.loads(rules))
        world_value = World(**json.loads(world))
        flocks.append(
            FlockRecord(
                flock_id=flock_id,
                seed=seed,
                create_wall=create_wall,
                flock=Flock.from_state(rules_value, world_value, boids, bytes(state), steps),
                request_id=request_id,
                last_step_request=last_step_request,
                last_step_orders=json.loads(last_step_orders) if last_step_orders else None,
            )
        )
    return Loaded(
        pools=list(pools.values()),
        generation=int(meta[0]) if meta else 0,
        beliefs=beliefs,
        intentions=intentions,
        decisions=decisions,
        writers=writers,
        flocks=flocks,
    )
