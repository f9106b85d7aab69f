"""One bootstrap for every server of the cluster.

``start_host(app, config)`` serves a ``ServiceApp`` on grpc.aio with the
standard health protocol (real statuses: NOT_SERVING while starting and while
draining), server reflection, explicit message size limits, keepalive,
Prometheus metrics on a side port, and returns the bound port so tests can bind
port 0. ``run(...)`` is the ``__main__`` of a service: configuration from the
environment (a bad value exits 2 naming the variable), JSON logs, uvloop, and a
graceful shutdown on SIGTERM or SIGINT:

1. every health status turns NOT_SERVING and ``app.draining`` is set, so
   long-lived streams end and load balancers move away;
2. after DRAIN_DELAY_S the server stops taking RPCs and gives in-flight ones
   GRACE_PERIOD_S to finish;
3. ``app.stop()`` flushes state; the process exits 0.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import uvloop
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.config import ConfigError, ServerConfig, TlsConfig
from services.common.logs import setup_logging
from services.common.metrics import SERVING, MetricsServer
from services.common.rpc import OpenStreams, add_servicer

log = logging.getLogger(__name__)


class ServiceApp(abc.ABC):
    """What a service gives the bootstrap: its servicers and its lifecycle.

    Subclasses set ``label`` (e.g. "registry"), implement ``bindings`` and may
    override ``start`` (background tasks, opening storage) and ``stop``
    (flushing). Long-lived streams should end when ``draining`` is set.
    """

    label = "service"

    def __init__(self) -> None:
        self.draining = asyncio.Event()

    @abc.abstractmethod
    def bindings(self) -> list[tuple[Any, ServiceDescriptor]]:
        """The (servicer, service descriptor) pairs to serve."""

    async def start(self) -> None:
        """Called before the server accepts RPCs."""

    async def stop(self) -> None:
        """Called after the server has stopped."""


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        # A second server on the same port must fail loudly, not share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 3),
    ]


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("serving TLS needs TLS_CERT_FILE and TLS_KEY_FILE")
    return grpc.ssl_server_credentials(
        [(TlsConfig.read(tls.key_file), TlsConfig.read(tls.cert_file))],
        root_certificates=TlsConfig.read(tls.ca_file),
        require_client_auth=tls.require_client_auth and bool(tls.ca_file),
    )


class Host:
    """A started server with its health service and metrics endpoint."""

    def __init__(self, app: ServiceApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.server: grpc.aio.Server = grpc.aio.server(options=server_options(config))
        self.health = HealthServicer()
        self.metrics: MetricsServer | None = None
        self.streams = OpenStreams()
        self.port = 0
        self.metrics_port = 0
        self._service_names: list[str] = []
        self._stopped = False

    @property
    def address(self) -> str:
        host = (
            self.config.host if self.config.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        )
        return f"{host}:{self.port}"

    async def start(self) -> None:
        for servicer, descriptor in self.app.bindings():
            add_servicer(
                self.server, servicer, descriptor, label=self.app.label, streams=self.streams
            )
            self._service_names.append(descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        bind = f"{self.config.host}:{self.config.port}"
        if self.config.tls:
            self.port = self.server.add_secure_port(bind, server_credentials(self.config.tls))
        else:
            self.port = self.server.add_insecure_port(bind)
        await self.app.start()
        await self.server.start()
        if self.config.metrics_port >= 0:
            self.metrics = MetricsServer(self.config.host, self.config.metrics_port)
            self.metrics_port = await self.metrics.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        SERVING.labels(self.app.label).set(1)
        log.info(
            "%s serving on %s (metrics on port %s)",
            self.app.label,
            self.address,
            self.metrics_port if self.metrics else "off",
            extra={"port": self.port, "metrics_port": self.metrics_port},
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains and stops; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        SERVING.labels(self.app.label).set(0)
        self.app.draining.set()
        if self.config.drain_delay_s:
            await asyncio.sleep(self.config.drain_delay_s)
        self.streams.drain()
        await self.server.stop(grace)
        await self.app.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("%s stopped", self.app.label)


async def start_host(app: ServiceApp, config: ServerConfig) -> Host:
    """Starts ``app`` and returns the running host (``host.port`` is bound)."""
    host = Host(app, config)
    try:
        await host.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await host.server.stop(0)
        raise
    return host


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Writes JSON so a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


async def watch_parent(parent_pid: int, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """Sets ``stop`` when ``parent_pid`` is gone, so a test runner that dies
    does not leave servers behind."""
    while not stop.is_set():
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            log.warning("parent process %d is gone; shutting down", parent_pid)
            stop.set()
            return
        except PermissionError:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def serve_until_signalled(app: ServiceApp, config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = await start_host(app, config)
    if config.ready_file:
        write_json_atomic(
            config.ready_file,
            {
                "service": app.label,
                "port": host.port,
                "address": host.address,
                "metrics_port": host.metrics_port,
                "pid": os.getpid(),
            },
        )
    watchdog = (
        asyncio.create_task(watch_parent(config.parent_pid, stop)) if config.parent_pid else None
    )
    await stop.wait()
    log.info("%s draining (grace %.1fs)", app.label, config.grace_s)
    await host.stop()
    if watchdog is not None:
        watchdog.cancel()


def run(
    label: str, default_port: int, build: Callable[[ServerConfig], Awaitable[ServiceApp]]
) -> None:
    """The ``__main__`` of a service."""
    try:
        config = ServerConfig.from_env(label, default_port)
    except ConfigError as exc:
        print(f"{label}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(label, config.log_level)

    async def main() -> None:
        try:
            app = await build(config)
        except ConfigError as exc:
            print(f"{label}: configuration error: {exc}", file=sys.stderr)
            sys.exit(2)
        await serve_until_signalled(app, config)

    uvloop.run(main())
    sys.exit(0)
