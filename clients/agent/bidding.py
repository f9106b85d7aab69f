"""Agents bid: the market behaviour of the agent runtime.

``MarketBehaviour(market_addr, policy)`` is added with ``Agent.add_behaviour``.
Once the agent is registered it follows the market's WatchOpenTasks stream
(reconnecting with jittered backoff; every reconnection starts with a fresh
snapshot), and:

- bids, signed with the agent's key, on each open task it qualifies for and
  can run (it holds every requirement and has a handler for the task's
  capability), by its policy;
- runs each task it wins through its own capability handler (the same path
  as an AgentService.Execute, with a signed receipt and the agent's load
  accounting), at most ``max_concurrency`` at a time, and reports Complete or
  Fail, signed, retrying while the market is unreachable.
  A task listed for broker dispatch (DISPATCH_BROKER) is not run here: the
  dispatcher runs it on this agent through the broker and settles it with the
  agent's signed receipt.

Policies (``--bid-policy`` / AGENT_BID_POLICY):

- ``balanced`` (default): price = the capability's base price times
  (1 + load/max_concurrency); estimated completion = the agent's measured
  command latency (at least 1 s) scaled the same way; confidence = its own
  recent success rate.
- ``greedy``: the base price whatever its load (it wants every task).
- ``off``: no bidding.

The ``lie-bids`` fault bids a tiny price and time with full confidence and
then reports every task it wins as failed without running it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent2028.market.v1 import market_pb2
from clients.errors import (
    Cancelled,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from clients.market import MarketClient
from services.common import signing
from services.common.errors import DomainError

if TYPE_CHECKING:
    from clients.agent.runtime import Agent

log = logging.getLogger(__name__)

POLICIES = ("balanced", "greedy", "off")
# High enough that an honest bid on a one-second task scores above the
# market's 0.01 floor (price * ect/1000 / (confidence + 0.1)): at the floor
# every bid ties and the load term, which spreads the work, would vanish.
BASE_PRICE = {"compute": 100.0, "database.query": 50.0, "ml.inference": 150.0, "echo": 20.0}
DEFAULT_BASE_PRICE = 100.0
MAX_OUTPUT_BYTES = 256 * 1024
MAX_ERROR_LEN = 2000
# How long a won task may run when it has no deadline of its own.
DEFAULT_RUN_LIMIT_S = 300.0
REPORT_PATIENCE_S = 120.0
REMEMBERED = 100_000


@dataclass(frozen=True)
class BidPolicy:
    name: str = "balanced"

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"bid policy {self.name!r}: expected one of {', '.join(POLICIES)}")

    def price(self, capability: str, load: int, max_concurrency: int) -> float:
        base = BASE_PRICE.get(capability, DEFAULT_BASE_PRICE)
        if self.name == "greedy":
            return base
        return round(base * (1.0 + load / max_concurrency), 6)

    def completion_s(self, latency_ms: float, load: int, max_concurrency: int) -> float:
        return round(max(latency_ms / 1000.0, 1.0) * (1.0 + load / max_concurrency), 6)

    @staticmethod
    def confidence(success_rate: float) -> float:
        return round(min(max(success_rate, 0.0), 1.0), 4)


def runnable_capability(task: market_pb2.Task, agent: Agent) -> str | None:
    """The capability this agent would run ``task`` with, or None."""
    if task.capability:
        return task.capability if task.capability in agent.handlers else None
    return next((c for c in task.requirements if c in agent.handlers), None)


class _Seen:
    """A bounded set of (task id, attempt) keys."""

    def __init__(self, limit: int = REMEMBERED) -> None:
        self._keys: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.limit = limit

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._keys

    def add(self, key: tuple[str, int]) -> None:
        self._keys[key] = None
        if len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def discard(self, key: tuple[str, int]) -> None:
        self._keys.pop(key, None)


class MarketBehaviour:
    def __init__(
        self, market_addr: str, policy: BidPolicy | str = "balanced", *, timeout_s: float = 5.0
    ) -> None:
        self.market_addr = market_addr
        self.policy = policy if isinstance(policy, BidPolicy) else BidPolicy(policy)
        self.timeout_s = timeout_s
        self.__name__ = "market-bidding"
        self.bids_placed = 0
        self.won = 0
        self.completed = 0
        self.failed = 0
        self._bid_on = _Seen()
        self._taken = _Seen()
        self._running: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._agent: Agent | None = None
        self._client: MarketClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._bidding = asyncio.Semaphore(8)

    @property
    def load(self) -> int:
        """Market tasks won and not yet reported, plus commands in flight."""
        agent = self._agent
        return len(self._running) + (agent.inflight if agent else 0)

    async def __call__(self, agent: Agent) -> None:
        from clients.agent.runtime import Backoff

        self._agent = agent
        self._slots = asyncio.Semaphore(agent.max_concurrency)
        self._client = MarketClient(self.market_addr, timeout_s=self.timeout_s)
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        try:
            while not agent.stopping.is_set():
                try:
                    async for response in self._client.watch_open_tasks(
                        agent.capabilities, agent_id=agent.agent_id
                    ):
                        backoff.reset()
                        for task in response.tasks:
                            self._consider(task)
                    log.info("agent %s: market stream ended; reconnecting", agent.agent_id)
                except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                    log.info("agent %s: market unreachable (%s)", agent.agent_id, exc.code.name)
                except ClientError as exc:
                    log.warning(
                        "agent %s: market refused the task stream (%s)", agent.agent_id, exc
                    )
                await self._sleep(backoff.next())
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._client.close()

    async def _sleep(self, seconds: float) -> None:
        assert self._agent is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._agent.stopping.wait(), seconds)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _consider(self, task: market_pb2.Task) -> None:
        agent = self._agent
        assert agent is not None
        key = (task.task_id, task.attempt)
        if task.state == market_pb2.TASK_STATE_ASSIGNED:
            if task.assigned_agent_id == agent.agent_id and key not in self._taken:
                self._taken.add(key)
                self.won += 1
                if task.dispatch == market_pb2.DISPATCH_BROKER:
                    # A dispatcher runs it on this agent through the broker
                    # (an ordinary Execute) and settles it with the receipt.
                    log.info("agent %s: won %s; the broker dispatches it", agent.agent_id, key[0])
                    return
                self._running.add(key)
                self._spawn(self._run(task))
            return
        if task.state != market_pb2.TASK_STATE_OPEN or key in self._bid_on:
            return
        if agent.agent_id in task.excluded_agent_ids:
            return
        if not set(task.requirements) <= set(agent.capabilities):
            return
        capability = runnable_capability(task, agent)
        if capability is None:
            self._bid_on.add(key)  # only traits in common: nothing to run it with
            return
        self._bid_on.add(key)
        self._spawn(self._bid(task, capability))

    async def _bid(self, task: market_pb2.Task, capability: str) -> None:
        agent = self._agent
        assert agent is not None and self._client is not None
        key = (task.task_id, task.attempt)
        if agent.faults.lie_bids:
            price, completion_s, confidence = 0.01, 1.0, 1.0
        else:
            load = self.load
            price = self.policy.price(capability, load, agent.max_concurrency)
            completion_s = self.policy.completion_s(
                agent.latency_ewma_ms, load, agent.max_concurrency
            )
            confidence = self.policy.confidence(agent.success_ewma)
        async with self._bidding:
            try:
                await self._client.place_bid(
                    agent.identity,
                    task.task_id,
                    price=price,
                    estimated_completion_s=completion_s,
                    confidence=confidence,
                    attempt=task.attempt,
                )
                self.bids_placed += 1
            except (FailedPrecondition, PermissionDenied, NotFound) as exc:
                log.debug("agent %s: no bid on %s (%s)", agent.agent_id, task.task_id, exc)
            except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                # Not placed: the next snapshot offers the task again.
                self._bid_on.discard(key)
                log.info("agent %s: bid on %s not placed (%s)", agent.agent_id, task.task_id, exc)
            except ClientError as exc:
                log.warning("agent %s: bid on %s refused (%s)", agent.agent_id, task.task_id, exc)

    async def _run(self, task: market_pb2.Task) -> None:
        agent = self._agent
        assert agent is not None and self._slots is not None
        key = (task.task_id, task.attempt)
        try:
            async with self._slots:
                success, text = await self._execute(task)
            await self._report(task, success, text)
        finally:
            self._running.discard(key)

    async def _execute(self, task: market_pb2.Task) -> tuple[bool, str]:
        agent = self._agent
        assert agent is not None
        if agent.faults.lie_bids:
            return False, "lie-bids: won with a bid it never meant to deliver on"
        capability = runnable_capability(task, agent)
        if capability is None:
            return False, f"agent {agent.agent_id} has no handler for this task"
        limit = DEFAULT_RUN_LIMIT_S
        if task.HasField("deadline_time"):
            deadline = task.deadline_time.seconds + task.deadline_time.nanos / 1e9
            limit = max(deadline - time.time(), 0.0)
        command_id = signing.task_command_id(task.task_id, task.attempt)
        try:
            response = await asyncio.wait_for(
                agent.execute(
                    command_id=command_id,
                    session_id="market",
                    capability=capability,
                    args=list(task.args),
                    timeout_s=limit,
                ),
                timeout=limit,
            )
        except TimeoutError:
            return False, f"did not finish within {limit:.1f}s (the task's deadline)"
        except DomainError as exc:
            return False, f"{exc.code}: {exc.message}"
        if response.receipt.success:
            output = response.output
            if len(output.encode()) > MAX_OUTPUT_BYTES:
                output = output.encode()[:MAX_OUTPUT_BYTES].decode("utf-8", "ignore")
            return True, output
        return False, response.receipt.error[:MAX_ERROR_LEN] or "failed"

    async def _report(self, task: market_pb2.Task, success: bool, text: str) -> None:
        """Complete or Fail, retried while the market is unreachable; both
        are idempotent, so a retry after a lost answer counts once."""
        from clients.agent.runtime import Backoff

        agent = self._agent
        assert agent is not None and self._client is not None
        request_id = f"{agent.agent_id}.{task.task_id}.{task.attempt}"[:128]
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        give_up = time.monotonic() + REPORT_PATIENCE_S
        while True:
            try:
                if success:
                    await self._client.complete_task(
                        agent.identity, task.task_id, task.attempt, text, request_id=request_id
                    )
                    self.completed += 1
                else:
                    await self._client.fail_task(
                        agent.identity, task.task_id, task.attempt, text, request_id=request_id
                    )
                    self.failed += 1
                log.info(
                    "agent %s: task %s %s",
                    agent.agent_id,
                    task.task_id,
                    "completed" if success else f"failed ({text[:80]})",
                )
                return
            except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                if time.monotonic() > give_up or agent.stopping.is_set():
                    log.warning(
                        "agent %s: gave up reporting %s (%s)", agent.agent_id, task.task_id, exc
                    )
                    return
            except ClientError as exc:
                # Closed meanwhile (expired, or failed over to someone else).
                log.info("agent %s: report on %s refused (%s)", agent.agent_id, task.task_id, exc)
                return
            await self._sleep(backoff.next())
