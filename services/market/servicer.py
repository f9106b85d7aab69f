"""MarketService over gRPC: converts protos to core calls and back, persists
each mutation before answering, and runs the market's timers.

Every mutation follows one pattern: call the core, then at once (no await in
between) hand its journal to storage; answer and publish the events only
after the commit. So storage receives the core's decisions in the order they
were made, an acknowledged write survives kill -9, and watchers never see
anything a crash could take back. If a commit ever fails the market stops
taking writes (UNAVAILABLE) rather than answer from a state the disk lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent2028.market.v1 import market_pb2, market_pb2_grpc
from clients.errors import ClientError, DeadlineExceeded
from clients.errors import Unavailable as UnavailableError
from clients.trust import TrustClient
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.timeutil import (
    require_duration,
    require_timestamp,
    timestamp_from_ns,
    timestamp_ns,
    to_duration,
    to_timestamp,
)
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    optional_id,
    page_size,
    require_capabilities,
    require_id,
)
from services.market.bidders import RegistryDirectory
from services.market.config import MarketConfig
from services.market.core import (
    CLOSED,
    AgentStats,
    Assignment,
    Bid,
    Dispatch,
    Event,
    EventType,
    MarketCore,
    ScoredBid,
    Scoring,
    TaskState,
    TaskView,
)
from services.market.store import MarketStore

log = logging.getLogger(__name__)
T = TypeVar("T")

SNAPSHOT_BATCH = 256
TRUST_CONCURRENCY = 32
# How long a market-run auction waits before trying trust again.
TRUST_RETRY_S = 1.0


# --- conversions -------------------------------------------------------------------


def bid_to_proto(bid: Bid, scored: ScoredBid | None = None) -> market_pb2.Bid:
    message = market_pb2.Bid(
        task_id=bid.task_id,
        attempt=bid.attempt,
        agent_id=bid.agent_id,
        price=bid.price,
        estimated_completion_seconds=bid.estimated_completion_s,
        confidence=bid.confidence,
        issue_time=timestamp_from_ns(bid.issue_ns),
        signature=bid.signature,
        place_time=to_timestamp(bid.place_wall),
        sequence=bid.sequence,
    )
    if scored is not None:
        message.load = scored.load
        message.score = scored.score
        message.trust = scored.trust
    return message


def assignment_to_proto(a: Assignment) -> market_pb2.Assignment:
    message = market_pb2.Assignment(
        attempt=a.attempt,
        agent_id=a.agent_id,
        bid=bid_to_proto(a.won.bid, a.won),
        scoring=int(a.scoring),
        assign_time=to_timestamp(a.assign_wall),
        outcome=int(a.outcome),
        error=a.error,
    )
    if a.close_wall is not None:
        message.close_time.CopyFrom(to_timestamp(a.close_wall))
    return message


def task_to_proto(view: TaskView, *, with_assignments: bool = False) -> market_pb2.Task:
    spec = view.spec
    message = market_pb2.Task(
        task_id=spec.task_id,
        task_type=spec.task_type,
        requirements=spec.requirements,
        capability=spec.capability,
        args=spec.args,
        priority=spec.priority,
        reward=spec.reward,
        max_attempts=spec.max_attempts,
        scoring=int(spec.scoring),
        dispatch=int(spec.dispatch),
        state=int(view.state),
        attempt=view.attempt,
        excluded_agent_ids=view.excluded,
        bid_count=view.bid_count,
        list_time=to_timestamp(spec.list_wall),
        output=view.output,
        error=view.error,
    )
    if view.deadline is not None:
        message.deadline_time.CopyFrom(to_timestamp(view.deadline))
    if spec.bidding_window_s:
        message.bidding_window.CopyFrom(to_duration(spec.bidding_window_s))
    current = view.current
    if current is not None:
        message.assigned_agent_id = current.agent_id
        message.winning_bid.CopyFrom(bid_to_proto(current.won.bid, current.won))
        message.assign_time.CopyFrom(to_timestamp(current.assign_wall))
    if view.close_wall is not None:
        message.close_time.CopyFrom(to_timestamp(view.close_wall))
    if with_assignments:
        message.assignments.extend(assignment_to_proto(a) for a in view.assignments)
    return message


def event_to_proto(event: Event) -> market_pb2.MarketEvent:
    if event.cache:
        return event.cache[0]
    message = market_pb2.MarketEvent(
        index=event.index,
        type=int(event.type),
        task=task_to_proto(event.task),
        agent_id=event.agent_id,
        event_time=to_timestamp(event.wall),
    )
    if event.scored is not None:
        message.bid.CopyFrom(bid_to_proto(event.scored.bid, event.scored))
    elif event.bid is not None:
        message.bid.CopyFrom(bid_to_proto(event.bid))
    event.cache.append(message)
    return message


def load_to_proto(agent_id: str, stats: AgentStats) -> market_pb2.AgentLoad:
    return market_pb2.AgentLoad(
        agent_id=agent_id,
        load=stats.load,
        won=stats.won,
        completed=stats.completed,
        failed=stats.failed,
        expired=stats.expired,
    )


def _scoring(value: int) -> Scoring:
    if value == market_pb2.SCORING_UNSPECIFIED:
        return Scoring.PLAIN
    try:
        return Scoring(value)
    except ValueError:
        raise InvalidArgument(
            f"scoring has no value {value}", field="scoring", reason="UNKNOWN_ENUM_VALUE"
        ) from None


def _dispatch(value: int) -> Dispatch:
    if value == market_pb2.DISPATCH_UNSPECIFIED:
        return Dispatch.WINNER
    try:
        return Dispatch(value)
    except ValueError:
        raise InvalidArgument(
            f"dispatch has no value {value}", field="dispatch", reason="UNKNOWN_ENUM_VALUE"
        ) from None


def _states(values: Iterable[int]) -> list[TaskState]:
    out = []
    for i, value in enumerate(values):
        try:
            out.append(TaskState(value))
        except ValueError:
            raise InvalidArgument(
                f"states[{i}] has no task state {value}",
                field=f"states[{i}]",
                reason="UNKNOWN_ENUM_VALUE",
            ) from None
    return out


def _event_types(values: Iterable[int]) -> set[EventType]:
    out = set()
    for i, value in enumerate(values):
        try:
            out.add(EventType(value))
        except ValueError:
            raise InvalidArgument(
                f"types[{i}] has no event type {value}",
                field=f"types[{i}]",
                reason="UNKNOWN_ENUM_VALUE",
            ) from None
    return out


def _issue_ns(request: Any) -> int:
    if not request.HasField("issue_time"):
        raise InvalidArgument("issue_time is required", field="issue_time", reason="EMPTY_FIELD")
    require_timestamp(request.issue_time, "issue_time", present=True)
    return timestamp_ns(request.issue_time)


def _deadline(request: Any) -> float | None:
    if not request.HasField("deadline_time"):
        return None
    return require_timestamp(request.deadline_time, "deadline_time", present=True)


class MarketServicer(market_pb2_grpc.MarketServiceServicer):
    def __init__(self, app: MarketApp) -> None:
        self.app = app
        self.core = app.core

    async def ListTask(
        self, request: market_pb2.ListTaskRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.ListTaskResponse:
        window = 0.0
        if request.HasField("bidding_window"):
            window = require_duration(
                request.bidding_window,
                "bidding_window",
                lo=0.0,
                hi=self.core.settings.max_bidding_window_s,
            )
        deadline = _deadline(request)
        view, created = await self.app.mutate(
            self.core.list_task,
            task_id=request.task_id,
            task_type=request.task_type,
            requirements=list(request.requirements),
            capability=request.capability,
            args=list(request.args),
            priority=request.priority,
            reward=request.reward,
            deadline=deadline,
            bidding_window_s=window,
            max_attempts=request.max_attempts,
            scoring=_scoring(request.scoring),
            request_id=request.request_id,
            dispatch=_dispatch(request.dispatch),
        )
        if created:
            log.info(
                "task %s listed (%s, requires %s)",
                view.task_id,
                view.spec.task_type,
                ",".join(view.spec.requirements),
            )
        return market_pb2.ListTaskResponse(task=task_to_proto(view), created=created)

    async def GetTask(
        self, request: market_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.GetTaskResponse:
        return market_pb2.GetTaskResponse(
            task=task_to_proto(self.core.get(request.task_id), with_assignments=True)
        )

    async def ListTasks(
        self, request: market_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.ListTasksResponse:
        page, token, total = self.core.list_tasks(
            page_size=page_size(request.page_size),
            page_token=request.page_token,
            states=_states(request.states),
            agent_id=request.agent_id,
            task_type=request.task_type,
        )
        return market_pb2.ListTasksResponse(
            tasks=[task_to_proto(v) for v in page], next_page_token=token, total_size=total
        )

    async def PlaceBid(
        self, request: market_pb2.PlaceBidRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.PlaceBidResponse:
        issue_ns = _issue_ns(request)
        directory = self.app.directory
        bidder = directory.lookup(request.agent_id)
        args = dict(
            task_id=request.task_id,
            agent_id=request.agent_id,
            price=request.price,
            estimated_completion_s=request.estimated_completion_seconds,
            confidence=request.confidence,
            issue_ns=issue_ns,
            signature=request.signature,
            attempt=request.attempt,
        )
        try:
            bid, replaced, duplicate = await self.app.mutate(
                self.core.place_bid, bidder=bidder, **args
            )
        except PermissionDenied as exc:
            if bidder is not None or exc.reason != "BIDDER_NOT_REGISTERED":
                raise
            # Not in the market's view of the registry yet: ask the registry.
            bidder = await directory.resolve(request.agent_id)
            bid, replaced, duplicate = await self.app.mutate(
                self.core.place_bid, bidder=bidder, **args
            )
        return market_pb2.PlaceBidResponse(
            bid=bid_to_proto(bid, self.core.score_now(bid)),
            replaced=replaced,
            duplicate=duplicate,
        )

    async def ListBids(
        self, request: market_pb2.ListBidsRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.ListBidsResponse:
        size = page_size(request.page_size)
        view, scored = self.core.bids(request.task_id, request.attempt)
        if scored is None:
            stored = await self.app.store.bids(view.task_id, request.attempt or view.attempt)
            scored = [self.core.score_now(b) for b in stored]
        start = 0
        if request.page_token:
            position = decode_page_token(request.page_token).get("seq", 0)
            if not isinstance(position, int):
                raise InvalidArgument(
                    "page_token is not a token this service issued",
                    field="page_token",
                    reason="INVALID_PAGE_TOKEN",
                )
            start = next(
                (i for i, s in enumerate(scored) if s.bid.sequence > position), len(scored)
            )
        chunk = scored[start : start + size]
        token = (
            encode_page_token({"seq": chunk[-1].bid.sequence})
            if chunk and start + size < len(scored)
            else ""
        )
        return market_pb2.ListBidsResponse(
            bids=[bid_to_proto(s.bid, s) for s in chunk],
            next_page_token=token,
            total_size=len(scored),
        )

    async def RunAuction(
        self, request: market_pb2.RunAuctionRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.RunAuctionResponse:
        optional_id(request.request_id, "request_id")
        require_id(request.task_id, "task_id")
        self.app.require_writable()
        result = await self.app.auction(
            request.task_id,
            _scoring(request.scoring),
            request.request_id,
            time_left_s=context.time_remaining(),
        )
        return market_pb2.RunAuctionResponse(
            winning_bid=bid_to_proto(result.winner.bid, result.winner),
            task=task_to_proto(result.task),
            bids_considered=result.considered,
            duplicate=result.duplicate,
        )

    async def CompleteTask(
        self, request: market_pb2.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.CompleteTaskResponse:
        issue_ns = _issue_ns(request)
        view, duplicate = await self.app.mutate(
            self.core.complete,
            task_id=request.task_id,
            attempt=request.attempt,
            agent_id=request.agent_id,
            output=request.output,
            issue_ns=issue_ns,
            signature=request.signature,
            request_id=request.request_id,
        )
        return market_pb2.CompleteTaskResponse(task=task_to_proto(view), duplicate=duplicate)

    async def FailTask(
        self, request: market_pb2.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.FailTaskResponse:
        issue_ns = _issue_ns(request)
        view, duplicate, relisted = await self.app.mutate(
            self.core.fail,
            task_id=request.task_id,
            attempt=request.attempt,
            agent_id=request.agent_id,
            error=request.error,
            issue_ns=issue_ns,
            signature=request.signature,
            request_id=request.request_id,
        )
        return market_pb2.FailTaskResponse(
            task=task_to_proto(view), duplicate=duplicate, relisted=relisted
        )

    async def SettleWithReceipt(
        self, request: market_pb2.SettleWithReceiptRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.SettleWithReceiptResponse:
        if not request.HasField("receipt"):
            raise InvalidArgument("receipt is required", field="receipt", reason="EMPTY_FIELD")
        r = request.receipt
        for name in ("start_time", "finish_time"):
            require_timestamp(getattr(r, name), f"receipt.{name}", present=r.HasField(name))
        view, duplicate, relisted = await self.app.mutate(
            self.core.settle_with_receipt,
            task_id=request.task_id,
            attempt=request.attempt,
            command_id=r.command_id,
            session_id=r.session_id,
            agent_id=r.agent_id,
            capability=r.capability,
            start_ns=timestamp_ns(r.start_time),
            finish_ns=timestamp_ns(r.finish_time),
            success=r.success,
            error=r.error,
            output_digest=r.output_digest,
            output=request.output,
            signature=request.signature,
            request_id=request.request_id,
        )
        return market_pb2.SettleWithReceiptResponse(
            task=task_to_proto(view), duplicate=duplicate, relisted=relisted
        )

    async def RelistTask(
        self, request: market_pb2.RelistTaskRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.RelistTaskResponse:
        deadline = _deadline(request)
        view, duplicate = await self.app.mutate(
            self.core.relist, request.task_id, deadline=deadline, request_id=request.request_id
        )
        return market_pb2.RelistTaskResponse(task=task_to_proto(view), duplicate=duplicate)

    async def GetAgentLoad(
        self, request: market_pb2.GetAgentLoadRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.GetAgentLoadResponse:
        stats = self.core.agent_load(request.agent_id)
        return market_pb2.GetAgentLoadResponse(load=load_to_proto(request.agent_id, stats))

    async def ListAgentLoads(
        self, request: market_pb2.ListAgentLoadsRequest, context: grpc.aio.ServicerContext
    ) -> market_pb2.ListAgentLoadsResponse:
        page, token, total = self.core.list_loads(
            page_size=page_size(request.page_size), page_token=request.page_token
        )
        return market_pb2.ListAgentLoadsResponse(
            loads=[load_to_proto(a, s) for a, s in page], next_page_token=token, total_size=total
        )

    async def WatchOpenTasks(
        self, request: market_pb2.WatchOpenTasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[market_pb2.WatchOpenTasksResponse]:
        capabilities = (
            set(require_capabilities(list(request.capabilities), "capabilities"))
            if request.capabilities
            else None
        )
        agent_id = optional_id(request.agent_id, "agent_id")
        queue: asyncio.Queue[TaskView] = asyncio.Queue(maxsize=self.app.config.watch_queue)
        lagged: list[bool] = []

        def wanted(view: TaskView) -> bool:
            if capabilities is not None and not capabilities.issuperset(view.spec.requirements):
                return False
            return not (agent_id and agent_id in view.excluded)

        def on_event(event: Event) -> None:
            if lagged:
                return
            view = event.task
            if event.type in (EventType.TASK_LISTED, EventType.TASK_RELISTED):
                if not wanted(view):
                    return
            elif not (
                event.type is EventType.AUCTION_WON and agent_id and event.agent_id == agent_id
            ):
                return
            try:
                queue.put_nowait(view)
            except asyncio.QueueFull:
                lagged.append(True)

        events = self.core.events
        # No await between subscribing and taking the snapshot, so nothing
        # falls between them.
        events.add_listener(on_event)
        try:
            snapshot = self.core.open_tasks(capabilities, agent_id)
            for start in range(0, max(len(snapshot), 1), SNAPSHOT_BATCH):
                yield market_pb2.WatchOpenTasksResponse(
                    tasks=[task_to_proto(v) for v in snapshot[start : start + SNAPSHOT_BATCH]],
                    snapshot=True,
                )
            while True:
                views = [await queue.get()]
                while not queue.empty() and len(views) < SNAPSHOT_BATCH:
                    views.append(queue.get_nowait())
                yield market_pb2.WatchOpenTasksResponse(tasks=[task_to_proto(v) for v in views])
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        "watcher fell behind; watch again for a fresh snapshot",
                        reason="WATCHER_LAGGED",
                    )
        finally:
            events.remove_listener(on_event)

    async def Watch(
        self, request: market_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[market_pb2.WatchResponse]:
        if request.from_index < 0:
            raise InvalidArgument(
                "from_index must not be negative", field="from_index", reason="OUT_OF_RANGE"
            )
        types = _event_types(request.types)
        agent_id = optional_id(request.agent_id, "agent_id")
        task_id = optional_id(request.task_id, "task_id")

        def wanted(event: Event) -> bool:
            return (
                (not types or event.type in types)
                and (not agent_id or event.agent_id == agent_id)
                and (not task_id or event.task.task_id == task_id)
            )

        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=self.app.config.watch_queue)
        lagged: list[int] = []

        def on_event(event: Event) -> None:
            if lagged or not wanted(event):
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                lagged.append(event.index)

        log_ = self.core.events
        log_.add_listener(on_event)
        try:
            if request.from_index == 0:
                last = log_.published
                yield market_pb2.WatchResponse(index=last)
            else:
                backlog = [e for e in log_.since(request.from_index) if wanted(e)]
                last = log_.published
                for start in range(0, len(backlog), SNAPSHOT_BATCH):
                    batch = backlog[start : start + SNAPSHOT_BATCH]
                    yield market_pb2.WatchResponse(
                        events=[event_to_proto(e) for e in batch], index=batch[-1].index
                    )
                yield market_pb2.WatchResponse(index=last)
            while True:
                events = [await queue.get()]
                while not queue.empty() and len(events) < SNAPSHOT_BATCH:
                    events.append(queue.get_nowait())
                last = events[-1].index
                yield market_pb2.WatchResponse(
                    events=[event_to_proto(e) for e in events], index=last
                )
                if lagged and queue.empty():
                    raise ResourceExhausted(
                        f"watcher fell behind at index {last}; watch again from {last}",
                        reason="WATCHER_LAGGED",
                        metadata={"resume_index": str(last)},
                    )
        finally:
            log_.remove_listener(on_event)


class _MarketCollector:
    """Prometheus collector over the core's plain counters (read at scrape
    time, so the hot paths pay nothing). Exports the most recent MarketApp."""

    app: MarketApp | None = None

    def collect(self) -> Any:
        app = self.app
        if app is None:
            return
        core = app.core
        by_state = GaugeMetricFamily(
            "agent2028_market_tasks", "Tasks held by the market, by state.", labels=["state"]
        )
        counts = dict.fromkeys(TaskState, 0)
        for task in core.tasks.values():
            counts[task.state] += 1
        for state, count in counts.items():
            by_state.add_metric([state.name], count)
        yield by_state
        for name, value in core.counters.items():
            yield CounterMetricFamily(
                f"agent2028_market_{name}", f"Market {name} since the process started.", value=value
            )
        loads = [s.load for s in core.stats.values()]
        yield GaugeMetricFamily(
            "agent2028_market_assigned_load",
            "Assigned, unfinished tasks across all agents.",
            value=sum(loads),
        )
        yield GaugeMetricFamily(
            "agent2028_market_max_agent_load",
            "The highest load of any one agent.",
            value=max(loads, default=0),
        )
        yield GaugeMetricFamily(
            "agent2028_market_known_bidders",
            "Agents in the market's view of the registry.",
            value=len(app.directory.agents),
        )


COLLECTOR = _MarketCollector()
REGISTRY.register(COLLECTOR)


class MarketApp(ServiceApp):
    label = "market"

    def __init__(self, config: MarketConfig, data_dir: str) -> None:
        super().__init__()
        self.config = config
        self.core = MarketCore(config.settings)
        self.store = MarketStore(
            os.path.join(data_dir, "market.db"), synchronous=config.db_synchronous
        )
        self.directory = RegistryDirectory(
            config.registry_addr, timeout_s=config.registry_timeout_s, on_leave=self._agent_left
        )
        self.trust = (
            TrustClient(config.trust_addr, timeout_s=config.trust_timeout_s)
            if config.trust_addr
            else None
        )
        self.servicer = MarketServicer(self)
        self.storage_error: BaseException | None = None
        self._wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.core.on_schedule = lambda when: self._wake.set()
        COLLECTOR.app = self

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, market_pb2.DESCRIPTOR.services_by_name["MarketService"])]

    async def start(self) -> None:
        await self.store.open()
        tasks, bids, assignments = await self.store.load()
        self.core.restore(tasks, bids, assignments)
        self.core.drain()
        open_count = sum(1 for t in tasks if t.state not in CLOSED)
        log.info(
            "market restored %d tasks (%d unfinished) and %d open bids",
            len(tasks),
            open_count,
            len(bids),
        )
        self.directory.start()
        self._timer_task = asyncio.create_task(self._timers(), name="market-timers")

    async def stop(self) -> None:
        for task in [self._timer_task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.directory.stop()
        if self.trust is not None:
            await self.trust.close()
        await self.store.close()

    # --- persistence -------------------------------------------------------------

    def require_writable(self) -> None:
        if self.storage_error is not None:
            raise Unavailable(
                "the market's storage failed; it takes no writes until it is restarted",
                reason="STORAGE_FAILED",
            )

    async def mutate(self, change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs one core mutation and commits what it changed, also when it
        raised after changing something (e.g. a bid on a task whose deadline
        had just passed expires the task, then refuses the bid)."""
        self.require_writable()
        try:
            result = change(*args, **kwargs)
        except DomainError:
            if self.core.journal or self.core.pending:
                await self.commit()
            raise
        await self.commit()
        return result

    async def commit(self) -> None:
        """Persists what the core just changed, then publishes its events.
        Must be awaited right after the core call, with no await between."""
        records, events = self.core.drain()
        if records:
            try:
                await self.store.write(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.storage_error = exc
                log.critical("market storage commit failed; refusing writes from now on: %r", exc)
                raise Unavailable(
                    "the market could not persist this change; it takes no writes until restarted",
                    reason="STORAGE_FAILED",
                ) from None
        self.core.events.publish(events)

    # --- auctions ------------------------------------------------------------------

    async def auction(
        self,
        task_id: str,
        scoring: Scoring,
        request_id: str = "",
        *,
        time_left_s: float | None = None,
    ) -> Any:
        trust = None
        if scoring is Scoring.TRUST_ADJUSTED:
            trust = await self.fetch_trust(
                self.core.auction_candidates(task_id), time_left_s=time_left_s
            )
        result = await self.mutate(
            self.core.run_auction,
            task_id,
            scoring=scoring,
            trust=trust,
            eligible=self.directory.eligible,
            request_id=request_id,
        )
        if not result.duplicate:
            w = result.winner
            log.info(
                "auction of %s won by %s (score %.4f, load %d, %d bids)",
                task_id,
                w.bid.agent_id,
                w.score,
                w.load,
                result.considered,
            )
        return result

    async def fetch_trust(
        self, agent_ids: list[str], *, time_left_s: float | None = None
    ) -> dict[str, float]:
        """Each bidder's conservative trust from the trust service, within
        what is left of the caller's own deadline."""
        if self.trust is None:
            raise FailedPrecondition(
                "trust-adjusted scoring needs the trust service, and TRUST_ADDR is not set",
                field="scoring",
                reason="TRUST_NOT_CONFIGURED",
                metadata={"service": "trust"},
            )
        client = self.trust
        limit = asyncio.Semaphore(TRUST_CONCURRENCY)
        timeout_s = self.config.trust_timeout_s
        if time_left_s is not None:
            # Keep a little of the caller's deadline for the auction itself.
            timeout_s = max(min(timeout_s, time_left_s - 0.05), 0.01)

        async def one(agent_id: str) -> tuple[str, float]:
            async with limit:
                response = await client.conservative_score(agent_id, timeout_s=timeout_s)
            return agent_id, response.lower_bound

        try:
            pairs = await asyncio.gather(*(one(a) for a in agent_ids))
        except (UnavailableError, DeadlineExceeded) as exc:
            raise Unavailable(
                f"the trust service at {self.config.trust_addr} is unavailable ({exc.code.name}); "
                "a trust-adjusted auction cannot run",
                reason="TRUST_UNAVAILABLE",
                metadata={"service": "trust"},
            ) from None
        except ClientError as exc:
            raise Unavailable(
                f"the trust service at {self.config.trust_addr} refused a score ({exc}); "
                "a trust-adjusted auction cannot run",
                reason="TRUST_ERROR",
                metadata={"service": "trust"},
            ) from None
        return dict(pairs)

    # --- timers and registry events ---------------------------------------------------

    async def _timers(self) -> None:
        while True:
            when = self.core.next_timer()
            self._wake.clear()
            timeout = None if when is None else max(when - time.time(), 0.0)
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if self.storage_error is not None:
                await asyncio.sleep(1.0)
                continue
            try:
                expired, auctions = await self.mutate(self.core.due)
                for view in expired:
                    log.info("task %s expired", view.task_id)
                for task_id in auctions:
                    await self._market_auction(task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("market timer pass failed")
                await asyncio.sleep(0.5)

    async def _market_auction(self, task_id: str) -> None:
        """The auction of a task whose bidding window closed."""
        view = self.core.get(task_id)
        if view.state is not TaskState.OPEN:
            return
        try:
            await self.auction(task_id, view.spec.scoring)
        except FailedPrecondition as exc:
            if exc.reason == "NO_BIDS":
                self.core.window_elapsed(task_id)
            else:
                log.info("market auction of %s not run: %s", task_id, exc)
        except Unavailable as exc:
            log.warning("market auction of %s postponed: %s", task_id, exc)
            self.core.retry_window(task_id, time.time() + TRUST_RETRY_S)
        except DomainError as exc:
            log.warning("market auction of %s failed: %s", task_id, exc)

    def _agent_left(self, agent_id: str, why: str) -> None:
        task = asyncio.create_task(self._abandon(agent_id, why))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abandon(self, agent_id: str, why: str) -> None:
        if self.storage_error is not None:
            return
        views = await self.mutate(
            self.core.abandon, agent_id, f"agent {agent_id} {why} from the registry"
        )
        for view in views:
            log.info(
                "task %s failed: its agent %s %s%s",
                view.task_id,
                agent_id,
                why,
                "; re-listed" if view.state is TaskState.OPEN else "",
            )


async def build(server_config: ServerConfig) -> MarketApp:
    return MarketApp(MarketConfig.from_env(), server_config.data_dir)


__all__ = ["MarketApp", "build"]
