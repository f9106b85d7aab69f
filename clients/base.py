"""The base of every typed client: a channel (owned or shared), a deadline on
every call, and grpc errors turned into ``clients.errors`` exceptions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Self

import grpc

from clients.channel import create_channel
from clients.errors import ClientError, from_rpc_error
from services.common.config import TlsConfig

DEFAULT_TIMEOUT_S = 5.0


class ServiceClient:
    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
    ) -> None:
        if isinstance(target, str):
            self.channel = create_channel(target, tls=tls)
            self._owns_channel = True
            self.target = target
        else:
            self.channel = target
            self._owns_channel = False
            self.target = ""
        self.timeout_s = timeout_s

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self,
        method: Any,
        request: Any,
        *,
        timeout_s: float | None = None,
        metadata: Any = None,
        wait_for_ready: bool | None = None,
    ) -> Any:
        """Calls a unary stub method with a deadline; raises ClientError
        subclasses. ``wait_for_ready`` queues the call until the channel
        connects (still bounded by the deadline) instead of failing fast."""
        try:
            return await method(
                request,
                timeout=self.timeout_s if timeout_s is None else timeout_s,
                metadata=metadata,
                wait_for_ready=wait_for_ready,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def _stream(
        self, method: Any, request: Any, *, timeout_s: float | None = None
    ) -> AsyncIterator[Any]:
        """Iterates a server stream; ``timeout_s`` None means no deadline
        (long-lived watches), which is the one place we allow that."""
        call = method(request, timeout=timeout_s)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()


__all__ = ["ClientError", "ServiceClient"]
