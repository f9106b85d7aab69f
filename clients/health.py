"""Checking a server through the standard grpc.health.v1 protocol."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import create_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def check(
    address: str,
    service: str = "",
    *,
    timeout_s: float = 1.0,
    channel: grpc.aio.Channel | None = None,
) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    own = channel is None
    ch = channel or create_channel(address, retries=False)
    try:
        response = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        return STATUS_NAMES.get(response.status, "UNKNOWN")
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    finally:
        if own:
            await ch.close()


async def wait_serving(
    address: str, service: str = "", *, timeout_s: float = 30.0, interval_s: float = 0.05
) -> None:
    """Polls until the server reports SERVING; TimeoutError after the deadline."""
    deadline = time.monotonic() + timeout_s
    channel = create_channel(address, retries=False)
    try:
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            status = await check(
                address,
                service,
                timeout_s=min(1.0, max(deadline - time.monotonic(), 0.05)),
                channel=channel,
            )
            if status == "SERVING":
                return
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"{address} is not SERVING after {timeout_s}s (last status {status})")
    finally:
        await channel.close()
