"""Prometheus metrics: the shared RPC metrics and a tiny asyncio /metrics endpoint.

The endpoint runs on the server's own event loop (no extra thread) on the side
port given by METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

RPC_TOTAL = Counter(
    "agent2028_rpc_total",
    "RPCs handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "agent2028_rpc_duration_seconds",
    "Time spent handling unary RPCs.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STREAMS_OPEN = Gauge(
    "agent2028_streams_open",
    "Streaming RPCs currently open, by service and method.",
    ["service", "method"],
)
SERVING = Gauge(
    "agent2028_serving", "1 while the server is SERVING, 0 while draining.", ["service"]
)


class MetricsServer:
    """Serves GET /metrics (and /healthz) in the Prometheus text format."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            while (await asyncio.wait_for(reader.readline(), timeout=5.0)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                body, status, ctype = generate_latest(REGISTRY), "200 OK", CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                body, status, ctype = b"ok\n", "200 OK", "text/plain"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
