"""Helpers every test tier shares: polling with a deadline, in-process servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.bootstrap import Host, ServiceApp, start_host
from services.common.config import ServerConfig

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> T:
    """Polls ``predicate`` until it returns something truthy and returns that;
    fails the test with ``what`` after the deadline. Exceptions raised by the
    predicate count as "not yet" until the deadline, then propagate."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last_error = None
        except AssertionError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            if last_error is not None:
                raise last_error
            raise AssertionError(f"{what} did not hold within {timeout_s}s")
        await asyncio.sleep(interval_s)


def server_config(label: str, data_dir: str, **overrides: object) -> ServerConfig:
    values: dict[str, object] = dict(
        service=label,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        grace_s=1.0,
        drain_delay_s=0.0,
        max_message_bytes=1024 * 1024,
        log_level="INFO",
        data_dir=data_dir,
        ready_file=None,
        parent_pid=None,
    )
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


async def serve(app: ServiceApp, data_dir: str, **overrides: object) -> Host:
    """Starts ``app`` in this process on port 0."""
    return await start_host(app, server_config(app.label, data_dir, **overrides))
