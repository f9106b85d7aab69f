"""Typed async client of the orchestrator: operations, topology and the event bus."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from agent2028.orchestrator.v1 import orchestrator_pb2_grpc
from agent2028.stigmergy.v1 import stigmergy_pb2
from clients.base import ServiceClient
from clients.broker import strategy_value as broker_strategy
from clients.consensus import strategy_value as consensus_strategy
from clients.errors import Unavailable
from clients.market import SCORINGS
from clients.swarm import THRESHOLDS
from services.common.timeutil import to_duration

log = logging.getLogger(__name__)

KIND_NAMES = {
    pb.OPERATION_KIND_EXECUTE: "execute",
    pb.OPERATION_KIND_EXECUTE_WITH_CONSENSUS: "execute_with_consensus",
    pb.OPERATION_KIND_COLLECTIVE_DECISION: "collective_decision",
    pb.OPERATION_KIND_ALLOCATE: "allocate",
    pb.OPERATION_KIND_SIGNAL: "signal",
}
STATUS_NAMES = {
    pb.OPERATION_STATUS_RUNNING: "running",
    pb.OPERATION_STATUS_SUCCEEDED: "succeeded",
    pb.OPERATION_STATUS_FAILED: "failed",
    pb.OPERATION_STATUS_REJECTED: "rejected",
    pb.OPERATION_STATUS_EXPIRED: "expired",
    pb.OPERATION_STATUS_NO_CONSENSUS: "no_consensus",
}
TIER_NAMES = {pb.TIER_INDIVIDUAL: "individual", pb.TIER_SWARM: "swarm"}
SERVING_NAMES = {
    pb.SERVING_STATUS_UNKNOWN: "UNKNOWN",
    pb.SERVING_STATUS_SERVING: "SERVING",
    pb.SERVING_STATUS_NOT_SERVING: "NOT_SERVING",
    pb.SERVING_STATUS_UNREACHABLE: "UNREACHABLE",
}
DEFAULT_OPERATION_TIMEOUT_S = 30.0


def new_request_id() -> str:
    return f"op-{uuid.uuid4().hex[:24]}"


class OrchestratorClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)

    # --- operations ------------------------------------------------------------------

    async def submit(
        self, request: pb.SubmitRequest, *, timeout_s: float | None = None
    ) -> pb.SubmitResponse:
        """Runs an operation. A request_id is made when none is set, so this
        call's own transparent retries run it once; the call waits a little
        longer than the operation's own timeout."""
        if not request.request_id:
            request.request_id = new_request_id()
        if timeout_s is None:
            op_timeout = (
                request.timeout.seconds + request.timeout.nanos / 1e9
                if request.HasField("timeout")
                else DEFAULT_OPERATION_TIMEOUT_S
            )
            timeout_s = op_timeout + 5.0
        return await self._unary(self.stub.Submit, request, timeout_s=timeout_s)

    @staticmethod
    def request(
        *, request_id: str = "", timeout_s: float | None = None, **operation: Any
    ) -> pb.SubmitRequest:
        """A SubmitRequest carrying one operation, e.g. ``execute=pb.ExecuteOperation(...)``."""
        request = pb.SubmitRequest(request_id=request_id, **operation)
        if timeout_s is not None:
            request.timeout.CopyFrom(to_duration(timeout_s))
        return request

    async def execute(
        self,
        capability: str,
        args: Iterable[str] = (),
        *,
        strategy: str = "best_fit",
        session_id: str = "",
        agent_id: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.SubmitResponse:
        op = pb.ExecuteOperation(
            capability=capability,
            args=list(args),
            strategy=broker_strategy(strategy),
            session_id=session_id,
            agent_id=agent_id,
        )
        return await self.submit(
            self.request(request_id=request_id, timeout_s=timeout_s, execute=op)
        )

    async def execute_with_consensus(
        self,
        capability: str,
        args: Iterable[str] = (),
        *,
        operation: str = "",
        coordinator_id: str = "",
        consensus_strategy_name: str = "byzantine",
        voter_ids: Iterable[str] = (),
        electorate_capability: str = "",
        voting_period_s: float | None = None,
        strategy: str = "best_fit",
        session_id: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.SubmitResponse:
        op = pb.ExecuteWithConsensusOperation(
            capability=capability,
            args=list(args),
            strategy=broker_strategy(strategy),
            session_id=session_id,
            operation=operation,
            coordinator_id=coordinator_id,
            consensus_strategy=consensus_strategy(consensus_strategy_name),
            voter_ids=list(voter_ids),
            electorate_capability=electorate_capability,
        )
        if voting_period_s is not None:
            op.voting_period.CopyFrom(to_duration(voting_period_s))
        return await self.submit(
            self.request(request_id=request_id, timeout_s=timeout_s, execute_with_consensus=op)
        )

    async def collective_decision(
        self,
        topic: str,
        *,
        duration_s: float,
        threshold: str = "simple",
        min_votes: int = 0,
        adopt: bool = False,
        settle_early: bool = False,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.SubmitResponse:
        op = pb.CollectiveDecisionOperation(
            topic=topic,
            threshold=THRESHOLDS[threshold],
            duration=to_duration(duration_s),
            min_votes=min_votes,
            adopt=adopt,
            settle_early=settle_early,
        )
        return await self.submit(
            self.request(request_id=request_id, timeout_s=timeout_s, collective_decision=op)
        )

    async def allocate(
        self,
        requirements: Iterable[str],
        args: Iterable[str] = (),
        *,
        capability: str = "",
        task_id: str = "",
        task_type: str = "",
        priority: int = 0,
        reward: float = 0.0,
        bidding_window_s: float | None = None,
        max_attempts: int = 0,
        scoring: str = "plain",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.SubmitResponse:
        op = pb.AllocateOperation(
            task_id=task_id,
            task_type=task_type,
            requirements=list(requirements),
            capability=capability,
            args=list(args),
            priority=priority,
            reward=reward,
            max_attempts=max_attempts,
            scoring=SCORINGS[scoring],
        )
        if bidding_window_s is not None:
            op.bidding_window.CopyFrom(to_duration(bidding_window_s))
        return await self.submit(
            self.request(request_id=request_id, timeout_s=timeout_s, allocate=op)
        )

    async def signal(
        self,
        deposit: stigmergy_pb2.DepositRequest,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.SubmitResponse:
        """Deposits through the orchestrator; ``deposit`` is signed by its agent
        (``clients.stigmergy.deposit_request``)."""
        return await self.submit(
            self.request(
                request_id=request_id,
                timeout_s=timeout_s,
                signal=pb.SignalOperation(deposit=deposit),
            )
        )

    async def get_operation(self, request_id: str) -> pb.Operation:
        response = await self._unary(
            self.stub.GetOperation, pb.GetOperationRequest(request_id=request_id)
        )
        return response.operation

    async def list_operations(
        self, *, page_size: int = 0, page_token: str = "", kind: int = 0
    ) -> pb.ListOperationsResponse:
        return await self._unary(
            self.stub.ListOperations,
            pb.ListOperationsRequest(page_size=page_size, page_token=page_token, kind=kind),
        )

    # --- topology ------------------------------------------------------------------------

    async def topology(self) -> pb.GetTopologyResponse:
        return await self._unary(self.stub.GetTopology, pb.GetTopologyRequest())

    async def event_types(self) -> pb.ListEventTypesResponse:
        return await self._unary(self.stub.ListEventTypes, pb.ListEventTypesRequest())

    # --- the bus -----------------------------------------------------------------------------

    async def publish(
        self,
        event_type: str,
        *,
        attributes: Mapping[str, str] | None = None,
        summary: str = "",
        subject: str = "",
        source: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> pb.PublishResponse:
        return await self._unary(
            self.stub.Publish,
            pb.PublishRequest(
                type=event_type,
                source=source,
                subject=subject,
                attributes=dict(attributes or {}),
                summary=summary,
                request_id=request_id,
            ),
            timeout_s=timeout_s,
        )

    async def subscribe(
        self, types: Iterable[str] = (), *, from_cursor: int = 0, from_oldest: bool = False
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """One subscription stream (no deadline: it is long-lived)."""
        async for response in self._stream(
            self.stub.Subscribe,
            pb.SubscribeRequest(
                types=list(types), from_cursor=from_cursor, from_oldest=from_oldest
            ),
        ):
            yield response

    async def events(
        self,
        types: Iterable[str] = (),
        *,
        from_cursor: int = 0,
        from_oldest: bool = False,
        resume: bool = True,
        retry_delay_s: float = 0.5,
    ) -> AsyncIterator[pb.SubscribeResponse]:
        """Like ``subscribe``, but a stream the orchestrator ends (it restarted
        or is draining) is opened again from the last cursor seen, so no
        retained event is missed or repeated."""
        types = list(types)
        cursor = from_cursor
        oldest = from_oldest
        while True:
            try:
                async for response in self.subscribe(types, from_cursor=cursor, from_oldest=oldest):
                    cursor = response.cursor or cursor
                    oldest = False
                    yield response
                if not resume:
                    return
            except Unavailable as exc:
                if not resume:
                    raise
                log.info("event stream interrupted (%s); resuming from %d", exc.code.name, cursor)
                await asyncio.sleep(retry_delay_s)
