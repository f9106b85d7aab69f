"""The integration bridge: it translates between the tiers.

- An auction's winner gets its task run through the broker. Tasks listed
  with DISPATCH_BROKER (Allocate lists them so) are not run by the winning
  agent itself; when the market says one was won, the bridge asks the broker
  to run it pinned to the winner, under the attempt's command id
  (``signing.task_command_id``), and hands the agent's own signed receipt to
  the market's SettleWithReceipt, which completes or fails the task. The
  broker reports the same receipt to trust and to the registry by itself, so
  the outcome moves the winner's trust and measured reliability. Nobody
  signs for the agent: the agent's signature is the proof.
- A try that reached no agent (the winner was unreachable) leaves no receipt
  to settle with; the bridge tries again under the next command id while
  the attempt is still assigned. A winner that is no longer passing is left
  to the market, which fails over the tasks of agents that leave.
- A voting pool that closes decided becomes a hive-mind belief
  (UpdateFromVote), for the pools a CollectiveDecision asked to adopt, and
  for every pool when ORCHESTRATOR_ADOPT_ALL_POOLS is on.

What the bridge must not forget across a restart (pools to adopt, the
command id that settled each task attempt) is in the orchestrator's database;
at start it also picks up every DISPATCH_BROKER task still assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent2028.market.v1 import market_pb2
from agent2028.swarm.v1 import swarm_pb2
from clients import errors
from clients.broker import BrokerClient
from clients.market import MarketClient
from clients.swarm import SwarmClient
from services.common import signing
from services.common.storage import Database
from services.orchestrator.bus import EventBus
from services.orchestrator.events import Draft

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS bridge_pools (
        pool_id TEXT PRIMARY KEY,
        adopt INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS bridge_settlements (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        command_id TEXT NOT NULL,
        PRIMARY KEY (task_id, attempt)
    )""",
]

SESSION = "market"
# How long one run of a task with no deadline of its own may take, and how
# long the bridge keeps trying to run such a task at all.
DEFAULT_RUN_S = 60.0
GIVE_UP_S = 300.0
SETTLED_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class Settlement:
    command_id: str
    receipt: Any  # broker_pb2.ExecutionReceipt
    output: str


class Bridge:
    def __init__(
        self,
        bus: EventBus,
        db: Database,
        *,
        market: MarketClient,
        broker: BrokerClient,
        swarm: SwarmClient,
        concurrency: int = 16,
        adopt_all_pools: bool = True,
        retry_s: float = 0.5,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.bus = bus
        self.db = db
        self.market = market
        self.broker = broker
        self.swarm = swarm
        self.adopt_all_pools = adopt_all_pools
        self.retry_s = retry_s
        self.call_timeout_s = call_timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._active: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._settled: OrderedDict[tuple[str, int], Settlement] = OrderedDict()
        # pool id -> adopt it when it closes decided
        self.pools: dict[str, bool] = {}
        # Adoptions already announced on the bus (bounded, oldest forgotten).
        self._adopted: OrderedDict[str, None] = OrderedDict()
        self.dispatched = 0
        self.settled = 0

    async def start(self) -> None:
        rows = await self.db.fetchall("SELECT pool_id, adopt FROM bridge_pools")
        self.pools = {pool_id: bool(adopt) for pool_id, adopt in rows}

    async def stop(self) -> None:
        for task in list(self._active.values()):
            task.cancel()
        for task in list(self._active.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def resume_assigned(self) -> int:
        """Dispatches every DISPATCH_BROKER task the market holds as
        assigned (after a restart, or when the market's stream was lost)."""
        count = 0
        async for task in self.market.iter_tasks(
            states=["assigned"], timeout_s=self.call_timeout_s
        ):
            if task.dispatch == market_pb2.DISPATCH_BROKER:
                count += self.on_assigned(task)
        return count

    # --- market tasks through the broker -------------------------------------------------

    def on_assigned(self, task: market_pb2.Task) -> bool:
        """Starts running ``task`` (an assigned DISPATCH_BROKER task) unless
        it already runs or was settled; True when it started."""
        key = (task.task_id, task.attempt)
        if key in self._active or key in self._settled or not task.assigned_agent_id:
            return False
        runner = asyncio.create_task(self._dispatch(task), name=f"bridge-{task.task_id}")
        self._active[key] = runner
        runner.add_done_callback(lambda _: self._active.pop(key, None))
        return True

    def settlement(self, task_id: str, attempt: int) -> Settlement | None:
        return self._settled.get((task_id, attempt))

    async def find_settlement(self, task_id: str, attempt: int) -> Settlement | None:
        """The receipt that settled an attempt, from memory or (after a
        restart) from the broker by the command id recorded then."""
        found = self._settled.get((task_id, attempt))
        if found is not None:
            return found
        row = await self.db.fetchone(
            "SELECT command_id FROM bridge_settlements WHERE task_id = ? AND attempt = ?",
            (task_id, attempt),
        )
        if row is None:
            return None
        response = await self.broker.get_receipt(row[0])
        return Settlement(row[0], response.receipt, response.output)

    async def _dispatch(self, task: market_pb2.Task) -> None:
        async with self._slots:
            try:
                await self._run(task)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bridge: running %s failed unexpectedly", task.task_id)

    def _capability(self, task: market_pb2.Task) -> str:
        if task.capability:
            return task.capability
        return task.requirements[0] if len(task.requirements) == 1 else ""

    async def _still_assigned(self, task: market_pb2.Task) -> bool:
        try:
            now = await self.market.get_task(task.task_id)
        except errors.NotFound:
            return False
        except errors.ClientError:
            return True  # the market is away: keep trying while it may come back
        return (
            now.state == market_pb2.TASK_STATE_ASSIGNED
            and now.attempt == task.attempt
            and now.assigned_agent_id == task.assigned_agent_id
        )

    def _run_limit(self, task: market_pb2.Task) -> float:
        if task.HasField("deadline_time"):
            deadline = task.deadline_time.seconds + task.deadline_time.nanos / 1e9
            return deadline - time.time()
        return DEFAULT_RUN_S

    async def _unsettled(self, task: market_pb2.Task, why: str) -> None:
        log.warning("bridge: %s attempt %d cannot be settled: %s", task.task_id, task.attempt, why)
        await self.bus.publish_one(
            Draft(
                "bridge.unsettled",
                "orchestrator",
                task.task_id,
                {"attempt": str(task.attempt), "agent_id": task.assigned_agent_id, "why": why},
                f"{task.task_id} (attempt {task.attempt}) cannot be settled: {why}",
            )
        )

    async def _run(self, task: market_pb2.Task) -> None:
        agent_id = task.assigned_agent_id
        capability = self._capability(task)
        if not capability:
            await self._unsettled(task, "the task names no capability to run")
            return
        limit = self._run_limit(task)
        give_up = time.monotonic() + (limit if task.HasField("deadline_time") else GIVE_UP_S)
        dispatch = 0
        announced = False
        while time.monotonic() < give_up:
            limit = self._run_limit(task)
            if limit <= 0.05 or not await self._still_assigned(task):
                return
            command_id = signing.task_command_id(task.task_id, task.attempt, dispatch)
            if not announced:
                announced = True
                self.dispatched += 1
                await self.bus.publish_one(
                    Draft(
                        "bridge.dispatched",
                        "orchestrator",
                        task.task_id,
                        {
                            "attempt": str(task.attempt),
                            "agent_id": agent_id,
                            "capability": capability,
                            "command_id": command_id,
                        },
                        f"{task.task_id} → broker → {agent_id} (won the auction)",
                    )
                )
            run_s = min(limit, DEFAULT_RUN_S)
            try:
                response = await self.broker.execute(
                    capability,
                    list(task.args),
                    session_id=SESSION,
                    deadline_s=run_s,
                    request_id=command_id,
                    agent_id=agent_id,
                    timeout_s=run_s + self.call_timeout_s,
                )
            except (
                errors.FailedPrecondition,
                errors.NotFound,
                errors.Unavailable,
                errors.ResourceExhausted,
                errors.DeadlineExceeded,
                errors.Cancelled,
            ) as exc:
                # The winner is not passing (or gone), or the broker is away
                # or slow: the same command id is asked again, and the broker
                # answers with the receipt if it ran meanwhile.
                log.info("bridge: %s not run yet (%s)", task.task_id, exc)
                await asyncio.sleep(self.retry_s)
                continue
            except errors.ClientError as exc:
                await self._unsettled(task, f"the broker refused to run it: {exc}")
                return
            receipt = response.receipt
            last = receipt.attempt_log[-1].result if receipt.attempt_log else ""
            if last == "INVALID_ARGUMENT":
                # The winner refused the task's arguments: no retry runs it.
                await self._unsettled(
                    task, f"the winner refused the task's arguments: {receipt.error}"
                )
                return
            if not receipt.HasField("agent_receipt"):
                # No agent answered this try, and the broker keeps that
                # receipt under this id: the next try takes the next id.
                dispatch += 1
                await asyncio.sleep(self.retry_s)
                continue
            if last != "OK":
                await self._unsettled(task, f"the broker found the winner's receipt {last}")
                return
            await self._settle(task, command_id, response)
            return
        await self._unsettled(task, "the winner could not run it in time")

    async def _settle(self, task: market_pb2.Task, command_id: str, response: Any) -> None:
        receipt = response.receipt
        key = (task.task_id, task.attempt)
        # Known before the market is told, so whoever sees the task close
        # (an Allocate waiting for it, or one retried after a restart) finds
        # the receipt that closed it.
        self._settled[key] = Settlement(command_id, receipt, response.output)
        while len(self._settled) > SETTLED_KEPT:
            self._settled.popitem(last=False)
        await self.db.execute(
            "INSERT OR REPLACE INTO bridge_settlements (task_id, attempt, command_id) "
            "VALUES (?,?,?)",
            (task.task_id, task.attempt, command_id),
        )
        while True:
            try:
                settled = await self.market.settle_with_receipt(
                    task.task_id,
                    task.attempt,
                    receipt.agent_receipt,
                    receipt.agent_signature.signature,
                    response.output,
                    request_id=f"settle.{command_id}"[:128],
                    timeout_s=self.call_timeout_s,
                )
                break
            except (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled):
                if self._run_limit(task) < -60:
                    return
                await asyncio.sleep(self.retry_s)
            except errors.ClientError as exc:
                await self._forget(key)
                if isinstance(exc, errors.FailedPrecondition):
                    # Closed meanwhile (e.g. it expired): nothing to settle.
                    log.info("bridge: %s closed before it was settled (%s)", task.task_id, exc)
                else:
                    await self._unsettled(task, f"the market refused the receipt: {exc}")
                return
        self.settled += 1
        state = "completed" if receipt.success else "failed"
        await self.bus.publish_one(
            Draft(
                "bridge.settled",
                "orchestrator",
                task.task_id,
                {
                    "attempt": str(task.attempt),
                    "agent_id": receipt.agent_id,
                    "success": str(receipt.success).lower(),
                    "command_id": command_id,
                    "duration_ms": f"{receipt.duration_ms:.2f}",
                    "relisted": str(settled.relisted).lower(),
                },
                f"{task.task_id} {state} by {receipt.agent_id}: its signed receipt settled "
                "the task (and went to trust)",
            )
        )

    async def _forget(self, key: tuple[str, int]) -> None:
        self._settled.pop(key, None)
        await self.db.execute(
            "DELETE FROM bridge_settlements WHERE task_id = ? AND attempt = ?", key
        )

    # --- pools into the hive ----------------------------------------------------------------

    async def track_pool(self, pool_id: str, *, adopt: bool) -> None:
        """Follows ``pool_id`` until it closes (adopting it then, if asked)."""
        if self.pools.get(pool_id) is True and adopt is False:
            adopt = True
        if self.pools.get(pool_id) == adopt:
            return
        self.pools[pool_id] = adopt
        await self.db.execute(
            "INSERT OR REPLACE INTO bridge_pools (pool_id, adopt) VALUES (?, ?)",
            (pool_id, int(adopt)),
        )

    async def forget_pool(self, pool_id: str) -> None:
        self.pools.pop(pool_id, None)
        await self.db.execute("DELETE FROM bridge_pools WHERE pool_id = ?", (pool_id,))

    def wants_adoption(self, pool_id: str) -> bool:
        return self.adopt_all_pools or self.pools.get(pool_id, False)

    async def adopt(self, pool: swarm_pb2.Pool) -> swarm_pb2.UpdateFromVoteResponse | None:
        """Writes a decided pool's result into the hive mind (idempotent)."""
        if pool.status != swarm_pb2.POOL_STATUS_DECIDED:
            return None
        response = await self.swarm.update_from_vote(pool.pool_id)
        key = f"{pool.pool_id}:{response.decision.decision}:{int(pool.closed)}"
        if response.changed and key not in self._adopted:
            self._adopted[key] = None
            while len(self._adopted) > SETTLED_KEPT:
                self._adopted.popitem(last=False)
            await self.bus.publish_one(
                Draft(
                    "bridge.adopted",
                    "orchestrator",
                    pool.pool_id,
                    {
                        "topic": pool.topic,
                        "decision": response.decision.decision,
                        "confidence": f"{response.decision.confidence:.3f}",
                        "generation": str(response.generation),
                        "final": str(pool.closed).lower(),
                    },
                    f"pool {pool.topic!r} decided {response.decision.decision!r}"
                    + (" (final)" if pool.closed else "")
                    + f": the hive mind believes {response.decision.topic}:"
                    f"{response.decision.decision} = {response.decision.confidence:.3f} "
                    f"(generation {response.generation})",
                )
            )
        return response
