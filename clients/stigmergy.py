"""Typed async client of the stigmergy service (pheromone fields)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from agent2028.stigmergy.v1 import stigmergy_pb2, stigmergy_pb2_grpc
from clients.base import ServiceClient
from services.common import signing
from services.common.crypto import Identity
from services.common.timeutil import timestamp_from_ns, to_duration

AGGREGATIONS = {
    "mean": stigmergy_pb2.AGGREGATION_MEAN,
    "max": stigmergy_pb2.AGGREGATION_MAX,
    "sum": stigmergy_pb2.AGGREGATION_SUM,
}


def region(x_min: int = 0, y_min: int = 0, x_max: int = 0, y_max: int = 0) -> stigmergy_pb2.Region:
    """[x_min, x_max) x [y_min, y_max); all zero means the whole grid."""
    return stigmergy_pb2.Region(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)


def deposit_request(
    identity: Identity,
    x: float,
    y: float,
    pheromone_type: str,
    amount: float = 0.0,
    *,
    request_id: str | None = None,
    issue_ns: int | None = None,
) -> stigmergy_pb2.DepositRequest:
    """A deposit signed by ``identity`` (whose signer_id is the agent id)."""
    issue_ns = time.time_ns() if issue_ns is None else issue_ns
    request_id = uuid.uuid4().hex if request_id is None else request_id
    x, y, amount = float(x), float(y), float(amount)
    signature = identity.sign(
        *signing.deposit(identity.signer_id, x, y, pheromone_type, amount, issue_ns, request_id)
    )
    return stigmergy_pb2.DepositRequest(
        agent_id=identity.signer_id,
        x=x,
        y=y,
        pheromone_type=pheromone_type,
        amount=amount,
        issue_time=timestamp_from_ns(issue_ns),
        request_id=request_id,
        signature=signature,
    )


class StigmergyClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = stigmergy_pb2_grpc.StigmergyServiceStub(self.channel)

    async def deposit(
        self,
        identity: Identity,
        x: float,
        y: float,
        pheromone_type: str,
        amount: float = 0.0,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> stigmergy_pb2.DepositResponse:
        """Deposits ``amount`` (0: the service's default) at (x, y), signed by
        ``identity``. Safe to retry: the request id makes it count once."""
        request = deposit_request(identity, x, y, pheromone_type, amount, request_id=request_id)
        return await self._unary(self.stub.Deposit, request, timeout_s=timeout_s)

    async def send_deposit(
        self, request: stigmergy_pb2.DepositRequest, *, timeout_s: float | None = None
    ) -> stigmergy_pb2.DepositResponse:
        """Sends a deposit an agent already signed (see ``deposit_request``)."""
        return await self._unary(self.stub.Deposit, request, timeout_s=timeout_s)

    async def read(self, x: float, y: float, pheromone_type: str) -> float:
        response = await self._unary(
            self.stub.Read, stigmergy_pb2.ReadRequest(x=x, y=y, pheromone_type=pheromone_type)
        )
        return response.intensity

    async def gradient(
        self,
        x: float,
        y: float,
        pheromone_type: str,
        *,
        radius: int = 0,
        timeout_s: float | None = None,
    ) -> stigmergy_pb2.GradientResponse:
        return await self._unary(
            self.stub.Gradient,
            stigmergy_pb2.GradientRequest(x=x, y=y, pheromone_type=pheromone_type, radius=radius),
            timeout_s=timeout_s,
        )

    async def find_nearest(
        self,
        x: float,
        y: float,
        pheromone_type: str,
        *,
        radius: int = 0,
        min_intensity: float = 0.0,
    ) -> stigmergy_pb2.FindNearestResponse:
        return await self._unary(
            self.stub.FindNearest,
            stigmergy_pb2.FindNearestRequest(
                x=x, y=y, pheromone_type=pheromone_type, radius=radius, min_intensity=min_intensity
            ),
        )

    async def sense(
        self,
        pheromone_type: str,
        *,
        area: stigmergy_pb2.Region | None = None,
        columns: int = 0,
        rows: int = 0,
        aggregation: str = "mean",
    ) -> stigmergy_pb2.FieldView:
        response = await self._unary(
            self.stub.Sense,
            stigmergy_pb2.SenseRequest(
                pheromone_type=pheromone_type,
                region=area or region(),
                columns=columns,
                rows=rows,
                aggregation=AGGREGATIONS[aggregation],
            ),
        )
        return response.view

    async def get_field(self) -> stigmergy_pb2.GetFieldResponse:
        return await self._unary(self.stub.GetField, stigmergy_pb2.GetFieldRequest())

    async def watch_field(
        self,
        pheromone_type: str,
        *,
        area: stigmergy_pb2.Region | None = None,
        columns: int = 0,
        rows: int = 0,
        aggregation: str = "mean",
        min_interval_s: float = 0.0,
    ) -> AsyncIterator[stigmergy_pb2.FieldView]:
        request = stigmergy_pb2.WatchFieldRequest(
            pheromone_type=pheromone_type,
            region=area or region(),
            columns=columns,
            rows=rows,
            aggregation=AGGREGATIONS[aggregation],
        )
        if min_interval_s:
            request.min_interval.CopyFrom(to_duration(min_interval_s))
        async for response in self._stream(self.stub.WatchField, request):
            yield response.view
