"""What the chapters share: the running cluster, clients, and the live event
tail, which is the orchestrator's event bus (one Subscribe for the whole run)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from rich.markup import escape

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from clients.launcher import LocalCluster
from clients.orchestrator import OrchestratorClient
from clients.registry import RegistryClient
from clients.scenario.narrator import Narrator

STATUS_NAMES = {0: "-", 1: "passing", 2: "warning", 3: "critical"}
# What the tail shows unless a chapter asks for more or less.
DEFAULT_TAIL = (
    "agent.*",
    "tier.*",
    "consensus.proposed",
    "consensus.vote",
    "consensus.equivocation",
    "consensus.reached",
    "consensus.rejected",
    "market.auction_won",
    "market.task_completed",
    "market.task_failed",
    "market.task_relisted",
    "bridge.*",
    "swarm.*",
    "hive.*",
    "stigmergy.layer_active",
    "stigmergy.signal",
    "operation.*",
)


def matches(patterns: Iterable[str], event_type: str) -> bool:
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


@dataclass
class Scene:
    cluster: LocalCluster
    narrator: Narrator
    registry: RegistryClient | None = None
    orchestrator: OrchestratorClient | None = None
    # Every event the bus sent this run, in cursor order.
    events: list[pb.Event] = field(default_factory=list)
    tail: tuple[str, ...] = DEFAULT_TAIL
    tail_where: Callable[[pb.Event], bool] | None = None
    subscribed_at: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self) -> None:
        self.registry = RegistryClient(self.cluster.address("registry"))
        self.orchestrator = OrchestratorClient(self.cluster.address("orchestrator"), timeout_s=15)
        live = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._follow(live)))
        await asyncio.wait_for(live.wait(), 15)

    async def _follow(self, live: asyncio.Event) -> None:
        assert self.orchestrator is not None
        # Every event from the start of the bus, so nothing the services said
        # before this subscription is missed; resumed from the last cursor if
        # the stream is interrupted.
        async for response in self.orchestrator.events(from_oldest=True):
            for event in response.events:
                self.events.append(event)
                if (
                    live.is_set()
                    and matches(self.tail, event.type)
                    and (self.tail_where is None or self.tail_where(event))
                ):
                    self.narrator.event(event.source, escape(event.summary))
            if response.caught_up and not live.is_set():
                self.subscribed_at = response.cursor
                live.set()

    def of(self, *types: str, since: int = 0) -> list[pb.Event]:
        """Events of the given types (patterns) with a cursor after ``since``."""
        return [e for e in self.events if e.cursor > since and matches(types, e.type)]

    @property
    def cursor(self) -> int:
        return self.events[-1].cursor if self.events else self.subscribed_at

    @contextlib.contextmanager
    def tailing(self, *patterns: str, where: Callable[[pb.Event], bool] | None = None):  # type: ignore[no-untyped-def]
        """Shows these types (instead of the default), optionally only the
        events ``where`` accepts, for a while."""
        before = self.tail, self.tail_where
        self.tail, self.tail_where = patterns, where
        try:
            yield
        finally:
            self.tail, self.tail_where = before

    async def wait_for(
        self, predicate: Callable[[], bool | Awaitable[bool]], *, timeout_s: float, what: str
    ) -> float:
        """Polls until ``predicate`` holds; returns the seconds it took."""
        start = time.monotonic()
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{what} did not happen within {timeout_s}s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in (self.registry, self.orchestrator):
            if client is not None:
                await client.close()
