"""Typed async client of the task market, signing bids and outcomes for agents."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

from agent2028.agent.v1 import agent_pb2
from agent2028.market.v1 import market_pb2, market_pb2_grpc
from clients.base import ServiceClient
from clients.errors import OutOfRange, ResourceExhausted, Unavailable
from services.common import signing
from services.common.crypto import Identity
from services.common.timeutil import timestamp_from_ns, to_duration, to_timestamp

log = logging.getLogger(__name__)

STATES = {
    "open": market_pb2.TASK_STATE_OPEN,
    "assigned": market_pb2.TASK_STATE_ASSIGNED,
    "completed": market_pb2.TASK_STATE_COMPLETED,
    "failed": market_pb2.TASK_STATE_FAILED,
    "expired": market_pb2.TASK_STATE_EXPIRED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
SCORINGS = {"plain": market_pb2.SCORING_PLAIN, "trust": market_pb2.SCORING_TRUST_ADJUSTED}
DISPATCHES = {"winner": market_pb2.DISPATCH_WINNER, "broker": market_pb2.DISPATCH_BROKER}
EVENT_NAMES = {
    market_pb2.EVENT_TYPE_TASK_LISTED: "listed",
    market_pb2.EVENT_TYPE_BID_PLACED: "bid",
    market_pb2.EVENT_TYPE_AUCTION_WON: "won",
    market_pb2.EVENT_TYPE_TASK_COMPLETED: "completed",
    market_pb2.EVENT_TYPE_TASK_FAILED: "failed",
    market_pb2.EVENT_TYPE_TASK_EXPIRED: "expired",
    market_pb2.EVENT_TYPE_TASK_RELISTED: "relisted",
}
EVENT_TYPES = {v: k for k, v in EVENT_NAMES.items()}


def output_digest(output: str) -> bytes:
    return hashlib.sha256(output.encode()).digest()


class MarketClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = market_pb2_grpc.MarketServiceStub(self.channel)

    async def list_task(
        self,
        task_type: str,
        requirements: Iterable[str],
        *,
        task_id: str = "",
        capability: str = "",
        args: Iterable[str] = (),
        priority: int = 0,
        reward: float = 0.0,
        deadline: float | None = None,
        bidding_window_s: float = 0.0,
        max_attempts: int = 0,
        scoring: str = "plain",
        request_id: str = "",
        dispatch: str = "winner",
        timeout_s: float | None = None,
    ) -> market_pb2.ListTaskResponse:
        """Lists a task. ``deadline`` is a unix time; ``bidding_window_s`` > 0
        lets the market run the auction itself when the window closes.
        ``dispatch`` "broker" leaves running the task to a dispatcher (see
        ``settle_with_receipt``) instead of the winner."""
        request = market_pb2.ListTaskRequest(
            task_id=task_id,
            task_type=task_type,
            requirements=list(requirements),
            capability=capability,
            args=list(args),
            priority=priority,
            reward=reward,
            max_attempts=max_attempts,
            scoring=SCORINGS[scoring],
            request_id=request_id,
            dispatch=DISPATCHES[dispatch],
        )
        if deadline is not None:
            request.deadline_time.CopyFrom(to_timestamp(deadline))
        if bidding_window_s:
            request.bidding_window.CopyFrom(to_duration(bidding_window_s))
        return await self._unary(self.stub.ListTask, request, timeout_s=timeout_s)

    async def get_task(self, task_id: str) -> market_pb2.Task:
        response = await self._unary(self.stub.GetTask, market_pb2.GetTaskRequest(task_id=task_id))
        return response.task

    async def list_tasks(
        self,
        *,
        states: Iterable[str] = (),
        agent_id: str = "",
        task_type: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> market_pb2.ListTasksResponse:
        return await self._unary(
            self.stub.ListTasks,
            market_pb2.ListTasksRequest(
                states=[STATES[s] for s in states],
                agent_id=agent_id,
                task_type=task_type,
                page_size=page_size,
                page_token=page_token,
            ),
            timeout_s=timeout_s,
        )

    async def iter_tasks(
        self,
        *,
        states: Iterable[str] = (),
        agent_id: str = "",
        task_type: str = "",
        page_size: int = 500,
        timeout_s: float | None = None,
    ) -> AsyncIterator[market_pb2.Task]:
        """Every matching task, page by page."""
        token = ""
        states = list(states)
        while True:
            page = await self.list_tasks(
                states=states,
                agent_id=agent_id,
                task_type=task_type,
                page_size=page_size,
                page_token=token,
                timeout_s=timeout_s,
            )
            for task in page.tasks:
                yield task
            token = page.next_page_token
            if not token:
                return

    async def place_bid(
        self,
        identity: Identity,
        task_id: str,
        *,
        price: float,
        estimated_completion_s: float,
        confidence: float,
        attempt: int = 0,
        issue_ns: int | None = None,
        timeout_s: float | None = None,
    ) -> market_pb2.PlaceBidResponse:
        """A bid signed by ``identity`` (its signer_id is the bidding agent)."""
        issue_ns = time.time_ns() if issue_ns is None else issue_ns
        signature = identity.sign(
            *signing.bid(
                task_id,
                attempt,
                identity.signer_id,
                price,
                estimated_completion_s,
                confidence,
                issue_ns,
            )
        )
        return await self._unary(
            self.stub.PlaceBid,
            market_pb2.PlaceBidRequest(
                task_id=task_id,
                agent_id=identity.signer_id,
                price=price,
                estimated_completion_seconds=estimated_completion_s,
                confidence=confidence,
                issue_time=timestamp_from_ns(issue_ns),
                signature=signature,
                attempt=attempt,
            ),
            timeout_s=timeout_s,
        )

    async def list_bids(
        self, task_id: str, *, attempt: int = 0, page_size: int = 0, page_token: str = ""
    ) -> market_pb2.ListBidsResponse:
        return await self._unary(
            self.stub.ListBids,
            market_pb2.ListBidsRequest(
                task_id=task_id, attempt=attempt, page_size=page_size, page_token=page_token
            ),
        )

    async def iter_bids(self, task_id: str, *, attempt: int = 0) -> AsyncIterator[market_pb2.Bid]:
        token = ""
        while True:
            page = await self.list_bids(task_id, attempt=attempt, page_size=1000, page_token=token)
            for bid in page.bids:
                yield bid
            token = page.next_page_token
            if not token:
                return

    async def run_auction(
        self,
        task_id: str,
        *,
        scoring: str = "plain",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> market_pb2.RunAuctionResponse:
        return await self._unary(
            self.stub.RunAuction,
            market_pb2.RunAuctionRequest(
                task_id=task_id, scoring=SCORINGS[scoring], request_id=request_id
            ),
            timeout_s=timeout_s,
        )

    async def complete_task(
        self,
        identity: Identity,
        task_id: str,
        attempt: int,
        output: str,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> market_pb2.CompleteTaskResponse:
        issue_ns = time.time_ns()
        signature = identity.sign(
            *signing.task_outcome(
                task_id, attempt, identity.signer_id, True, output_digest(output), "", issue_ns
            )
        )
        return await self._unary(
            self.stub.CompleteTask,
            market_pb2.CompleteTaskRequest(
                task_id=task_id,
                attempt=attempt,
                agent_id=identity.signer_id,
                output=output,
                issue_time=timestamp_from_ns(issue_ns),
                signature=signature,
                request_id=request_id,
            ),
            timeout_s=timeout_s,
        )

    async def fail_task(
        self,
        identity: Identity,
        task_id: str,
        attempt: int,
        error: str,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> market_pb2.FailTaskResponse:
        issue_ns = time.time_ns()
        signature = identity.sign(
            *signing.task_outcome(
                task_id, attempt, identity.signer_id, False, output_digest(""), error, issue_ns
            )
        )
        return await self._unary(
            self.stub.FailTask,
            market_pb2.FailTaskRequest(
                task_id=task_id,
                attempt=attempt,
                agent_id=identity.signer_id,
                error=error,
                issue_time=timestamp_from_ns(issue_ns),
                signature=signature,
                request_id=request_id,
            ),
            timeout_s=timeout_s,
        )

    async def settle_with_receipt(
        self,
        task_id: str,
        attempt: int,
        receipt: agent_pb2.AgentReceipt,
        signature: bytes,
        output: str,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> market_pb2.SettleWithReceiptResponse:
        """Settles an assigned attempt with the agent's own signed receipt
        (e.g. ``ExecutionReceipt.agent_receipt`` and ``agent_signature.signature``
        from the broker, with the output it returned)."""
        return await self._unary(
            self.stub.SettleWithReceipt,
            market_pb2.SettleWithReceiptRequest(
                task_id=task_id,
                attempt=attempt,
                receipt=receipt,
                signature=signature,
                output=output,
                request_id=request_id,
            ),
            timeout_s=timeout_s,
        )

    async def relist_task(
        self, task_id: str, *, deadline: float | None = None, request_id: str = ""
    ) -> market_pb2.RelistTaskResponse:
        request = market_pb2.RelistTaskRequest(task_id=task_id, request_id=request_id)
        if deadline is not None:
            request.deadline_time.CopyFrom(to_timestamp(deadline))
        return await self._unary(self.stub.RelistTask, request)

    async def get_agent_load(self, agent_id: str) -> market_pb2.AgentLoad:
        response = await self._unary(
            self.stub.GetAgentLoad, market_pb2.GetAgentLoadRequest(agent_id=agent_id)
        )
        return response.load

    async def iter_agent_loads(self) -> AsyncIterator[market_pb2.AgentLoad]:
        token = ""
        while True:
            page = await self._unary(
                self.stub.ListAgentLoads,
                market_pb2.ListAgentLoadsRequest(page_size=1000, page_token=token),
            )
            for load in page.loads:
                yield load
            token = page.next_page_token
            if not token:
                return

    async def watch_open_tasks(
        self, capabilities: Iterable[str] = (), *, agent_id: str = ""
    ) -> AsyncIterator[market_pb2.WatchOpenTasksResponse]:
        """One stream (no deadline: it is long-lived); reconnecting is the
        caller's business (it gets a fresh snapshot each time)."""
        async for response in self._stream(
            self.stub.WatchOpenTasks,
            market_pb2.WatchOpenTasksRequest(capabilities=list(capabilities), agent_id=agent_id),
        ):
            yield response

    async def watch(
        self,
        *,
        from_index: int = 0,
        types: Iterable[str] = (),
        agent_id: str = "",
        task_id: str = "",
        resume: bool = True,
        retry_delay_s: float = 0.5,
    ) -> AsyncIterator[market_pb2.WatchResponse]:
        """Market events. With ``resume``, an interrupted or lagging watch
        continues from the last index seen; when that is no longer retained
        (e.g. the market restarted) it continues from now."""
        index = from_index
        type_values = [EVENT_TYPES[t] for t in types]
        while True:
            try:
                async for response in self._stream(
                    self.stub.Watch,
                    market_pb2.WatchRequest(
                        from_index=index, types=type_values, agent_id=agent_id, task_id=task_id
                    ),
                ):
                    index = response.index
                    yield response
                if not resume:
                    return
            except (ResourceExhausted, Unavailable) as exc:
                if not resume:
                    raise
                log.info("market watch interrupted (%s); resuming from %d", exc.code.name, index)
                await asyncio.sleep(retry_delay_s)
            except OutOfRange:
                if not resume:
                    raise
                log.info("market watch index %d no longer retained; continuing from now", index)
                index = 0
