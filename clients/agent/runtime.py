"""The agent runtime: one agent is one OS process.

An ``Agent`` has an Ed25519 identity (a key file), serves AgentService on
port 0 (through the same bootstrap as every service: health, reflection, error
mapping), registers the address it got with a proof of possession, keeps its
lease alive over a heartbeat stream, reconnects with jittered exponential
backoff when the registry goes away, and registers again by itself when its
lease is gone (NOT_FOUND). Every execution returns a receipt signed with the
agent's key.

Writing your own agent::

    from clients.agent import Agent

    agent = Agent("text-agent-1", registry="127.0.0.1:50051")

    @agent.handler("text.upper")
    async def upper(args, ctx):
        return " ".join(args).upper()

    agent.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
import uvloop

from agent2028.agent.v1 import agent_pb2, agent_pb2_grpc
from agent2028.registry.v1 import registry_pb2
from clients.agent.faults import FaultPlan
from clients.agent.handlers import (
    ExecutionContext,
    Handler,
    HandlerError,
    InvalidArguments,
    builtin_handlers,
)
from clients.errors import (
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from clients.registry import RegistryClient
from services.common import signing
from services.common.bootstrap import Host, ServiceApp, start_host, watch_parent, write_json_atomic
from services.common.config import ServerConfig, TlsConfig
from services.common.crypto import Identity
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.errors import NotFound as NotFoundError
from services.common.timeutil import from_duration, timestamp_from_ns, to_timestamp
from services.common.validation import optional_id, require_capability, require_id

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_ARGS_BYTES = 1024 * 1024
MAX_ERROR_LEN = 2000


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog style)."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Execute(
        self, request: agent_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ExecuteResponse:
        remaining = context.time_remaining()
        return await self.agent.execute(
            command_id=request.command_id,
            session_id=request.session_id,
            capability=request.capability,
            args=list(request.args),
            timeout_s=remaining,
        )

    async def Ping(
        self, request: agent_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.PingResponse:
        a = self.agent
        return agent_pb2.PingResponse(
            agent_id=a.agent_id,
            load=a.inflight,
            max_concurrency=a.max_concurrency,
            capabilities=a.capabilities,
            start_time=to_timestamp(a.start_wall),
        )


class _AgentApp(ServiceApp):
    label = "agent"

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.servicer = AgentServicer(agent)

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])]


class Agent:
    def __init__(
        self,
        agent_id: str,
        *,
        registry: str,
        capabilities: Iterable[str] = (),
        key_file: str | None = None,
        identity: Identity | None = None,
        max_concurrency: int = 8,
        metadata: Mapping[str, str] | None = None,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        port: int = 0,
        data_dir: str | None = None,
        builtins: bool = True,
        faults: FaultPlan | None = None,
        lease_ttl_s: float = 0.0,
        metrics_port: int = -1,
        tls: TlsConfig | None = None,
    ) -> None:
        require_id(agent_id, "agent_id")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.agent_id = agent_id
        self.registry_addr = registry
        self.data_dir = data_dir or os.path.join(".agent2028", "agents", agent_id)
        if identity is None:
            identity = Identity.load_or_create(
                agent_id, key_file or os.path.join(self.data_dir, "agent.key")
            )
        if identity.signer_id != agent_id:
            raise ValueError(
                f"identity {identity.signer_id!r} does not belong to agent {agent_id!r}"
            )
        self.identity = identity
        self.max_concurrency = max_concurrency
        self.metadata = dict(metadata or {})
        self.bind_host = bind_host
        self.advertise_host = advertise_host or (
            bind_host if bind_host not in ("0.0.0.0", "::", "[::]") else _hostname()
        )
        self.port = port
        self.faults = faults or FaultPlan()
        self.lease_ttl_s = lease_ttl_s
        self.metrics_port = metrics_port
        # Serves AgentService and reaches the registry over (m)TLS when set.
        self.tls = tls
        self.capabilities: list[str] = []
        self.handlers: dict[str, Handler] = {}
        self._builtin_factories = builtin_handlers(self.data_dir) if builtins else {}
        for capability in capabilities:
            self.add_capability(capability)
        self._forger = Identity.generate(agent_id) if self.faults.forge_receipts else None
        # Observed state reported in heartbeats.
        self.inflight = 0
        self.executed = 0
        self.failed = 0
        self.latency_ewma_ms = 0.0
        self.success_ewma = 1.0
        self.start_wall = time.time()
        # Membership state.
        self.lease: registry_pb2.Lease | None = None
        self.heartbeat_interval_s = 2.0
        self.registered = asyncio.Event()
        self.registrations = 0
        # The last refusal by the registry (e.g. AlreadyExists), for operators.
        self.last_membership_error: ClientError | None = None
        self.address = ""
        self._stop = asyncio.Event()
        self._host: Host | None = None
        self._registry: RegistryClient | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._behaviours: list[Callable[[Agent], Awaitable[None]]] = []

    # --- capabilities --------------------------------------------------------

    def add_capability(self, capability: str, handler: Handler | None = None) -> None:
        """Declares a capability, with a handler (or the built-in one, if any).
        A capability without a handler is a trait (e.g. "gpu"): it can be
        required by tasks but not executed."""
        require_capability(capability, "capability")
        if capability not in self.capabilities:
            self.capabilities.append(capability)
        if handler is not None:
            self.handlers[capability] = _as_async(handler)
        elif capability in self._builtin_factories and capability not in self.handlers:
            self.handlers[capability] = self._builtin_factories[capability]()

    def handler(self, capability: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@agent.handler("text.upper")``."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add_capability(capability, fn)
            return fn

        return register

    def add_behaviour(self, behaviour: Callable[[Agent], Awaitable[None]]) -> None:
        """A coroutine run alongside membership once the agent is registered
        (voting, bidding, ...). It should return when ``agent.stopping``."""
        self._behaviours.append(behaviour)

    @property
    def stopping(self) -> asyncio.Event:
        return self._stop

    @property
    def registry(self) -> RegistryClient:
        if self._registry is None:
            raise RuntimeError("agent is not started")
        return self._registry

    # --- execution -----------------------------------------------------------

    async def execute(
        self,
        *,
        command_id: str,
        session_id: str,
        capability: str,
        args: list[str],
        timeout_s: float | None,
    ) -> agent_pb2.ExecuteResponse:
        require_id(command_id, "command_id")
        optional_id(session_id, "session_id")
        require_capability(capability, "capability")
        if len(args) > MAX_ARGS:
            raise InvalidArgument(
                f"args has {len(args)} values; at most {MAX_ARGS} allowed",
                field="args",
                reason="TOO_MANY_VALUES",
            )
        if sum(len(a) for a in args) > MAX_ARGS_BYTES:
            raise InvalidArgument(
                f"args exceed {MAX_ARGS_BYTES} bytes", field="args", reason="FIELD_TOO_LONG"
            )
        if capability not in self.capabilities:
            raise NotFoundError(
                f"agent {self.agent_id} does not hold capability {capability!r}",
                field="capability",
                reason="CAPABILITY_NOT_HELD",
            )
        handler = self.handlers.get(capability)
        if handler is None:
            raise FailedPrecondition(
                f"capability {capability!r} is a trait of agent {self.agent_id}, with no handler to run",
                field="capability",
                reason="NO_HANDLER",
            )
        if self.inflight >= self.max_concurrency:
            raise ResourceExhausted(
                f"agent {self.agent_id} is running {self.inflight} commands, its max_concurrency",
                reason="AGENT_BUSY",
                metadata={"agent_id": self.agent_id},
            )
        if self.faults.crash:
            log.warning("fault crash: exiting mid-command %s", command_id)
            os._exit(137)
        self.inflight += 1
        start_ns = time.time_ns()
        t0_ns = time.perf_counter_ns()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        ctx = ExecutionContext(
            self.agent_id, command_id, session_id, capability, deadline, self.data_dir
        )
        success, error, output = True, "", ""
        try:
            if self.faults.slow_ms:
                await asyncio.sleep(self.faults.slow_ms / 1000)
            if self.faults.fail:
                raise HandlerError("fault fail: this agent fails every command")
            result = await handler(args, ctx)
            output = json.dumps(result, default=str)
        except InvalidArguments as exc:
            raise InvalidArgument(
                str(exc)[:MAX_ERROR_LEN], field="args", reason="ARGUMENTS_REFUSED"
            ) from None
        except HandlerError as exc:
            success, error = False, str(exc)[:MAX_ERROR_LEN]
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("handler for %s raised", capability)
            success, error = False, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LEN]
        finally:
            self.inflight -= 1
        duration_ns = max(time.perf_counter_ns() - t0_ns, 1)
        finish_ns = start_ns + duration_ns
        self._observe(success, duration_ns / 1e6)
        digest = hashlib.sha256(output.encode()).digest()
        statement = signing.agent_receipt(
            command_id,
            session_id,
            self.agent_id,
            capability,
            start_ns,
            finish_ns,
            success,
            error,
            digest,
        )
        signer = self._forger or self.identity
        receipt = agent_pb2.AgentReceipt(
            command_id=command_id,
            session_id=session_id,
            agent_id=self.agent_id,
            capability=capability,
            start_time=timestamp_from_ns(start_ns),
            finish_time=timestamp_from_ns(finish_ns),
            duration_ms=duration_ns / 1e6,
            success=success,
            error=error,
            output_digest=digest,
        )
        return agent_pb2.ExecuteResponse(
            receipt=receipt, output=output, signature=signer.sign(*statement)
        )

    def _observe(self, success: bool, latency_ms: float) -> None:
        self.executed += 1
        if not success:
            self.failed += 1
        alpha = 0.2
        self.latency_ewma_ms = (
            latency_ms
            if self.executed == 1
            else self.latency_ewma_ms + alpha * (latency_ms - self.latency_ewma_ms)
        )
        self.success_ewma += alpha * ((1.0 if success else 0.0) - self.success_ewma)

    @property
    def health(self) -> float:
        """Self-assessed health: the recent success rate of this agent's commands."""
        if self.faults.unhealthy:
            return 0.1
        return round(min(max(self.success_ewma, 0.0), 1.0), 4)

    # --- membership ----------------------------------------------------------

    async def start(self) -> None:
        """Serves AgentService, then registers (in the background, retrying)."""
        config = ServerConfig(
            service="agent",
            host=self.bind_host,
            port=self.port,
            metrics_port=self.metrics_port,
            grace_s=2.0,
            drain_delay_s=0.0,
            max_message_bytes=4 * 1024 * 1024,
            log_level="INFO",
            data_dir=self.data_dir,
            ready_file=None,
            parent_pid=None,
            tls=self.tls,
        )
        self._host = await start_host(_AgentApp(self), config)
        self.address = f"{self.advertise_host}:{self._host.port}"
        self._registry = RegistryClient(self.registry_addr, tls=self.tls)
        self._tasks.append(
            asyncio.create_task(self._membership(), name=f"{self.agent_id}-membership")
        )
        for behaviour in self._behaviours:
            self._tasks.append(
                asyncio.create_task(
                    self._run_behaviour(behaviour), name=f"{self.agent_id}-{behaviour.__name__}"
                )
            )
        log.info(
            "agent %s serving on %s with %s",
            self.agent_id,
            self.address,
            ", ".join(self.capabilities),
        )

    async def _run_behaviour(self, behaviour: Callable[[Agent], Awaitable[None]]) -> None:
        await self.registered.wait()
        try:
            await behaviour(self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("behaviour %s failed", behaviour.__name__)

    async def _register(self) -> None:
        response = await self.registry.register(
            self.identity,
            address=self.address,
            capabilities=self.capabilities,
            max_concurrency=self.max_concurrency,
            metadata=self.metadata,
            lease_ttl_s=self.lease_ttl_s,
            # Queue until the registry is reachable, so a restarted registry
            # sees us the moment our channel reconnects; still bounded.
            wait_for_ready=True,
            timeout_s=max(2 * self.heartbeat_interval_s, 1.0),
        )
        self.lease = response.lease
        self.heartbeat_interval_s = from_duration(response.lease.heartbeat_interval) or 2.0
        self.registrations += 1
        self.registered.set()
        log.info(
            "agent %s %s, lease %s",
            self.agent_id,
            "re-registered" if self.registrations > 1 else "registered",
            self.lease.lease_id,
        )

    async def _membership(self) -> None:
        backoff = Backoff(base_s=0.05, cap_s=2.0)
        while not self._stop.is_set():
            try:
                if self.lease is None:
                    await self._register()
                    backoff.reset()
                await self._heartbeat_stream(backoff)
            except NotFound:
                log.info("agent %s: lease gone; registering again", self.agent_id)
                self.lease = None
                self.registered.clear()
                continue
            except AlreadyExists as exc:
                self.last_membership_error = exc
                log.error(
                    "agent %s: %s; another process holds this id under another key",
                    self.agent_id,
                    exc,
                )
            except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                log.info("agent %s: registry unreachable (%s)", self.agent_id, exc)
            except ClientError as exc:
                self.last_membership_error = exc
                log.warning("agent %s: registry refused us (%s)", self.agent_id, exc)
            except (TimeoutError, ConnectionError) as exc:
                log.info(
                    "agent %s: heartbeat stream stalled (%s)",
                    self.agent_id,
                    exc or type(exc).__name__,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                # Membership must outlive any surprise; log it and keep trying.
                log.exception("agent %s: membership loop error", self.agent_id)
            # Calls wait for the channel to be ready (bounded), so this jittered
            # pause only spreads retries out; it never needs to be long.
            backoff.cap_s = min(max(self.heartbeat_interval_s / 2, 0.05), 0.5)
            await self._sleep(backoff.next())

    async def _heartbeat_stream(self, backoff: Backoff) -> None:
        """Runs one heartbeat stream until it fails or the agent stops."""
        assert self.lease is not None
        lease_id = self.lease.lease_id
        call = self.registry.stub.Heartbeat(wait_for_ready=True)
        sequence = 0
        try:
            while not self._stop.is_set():
                sequence += 1
                send_ns = time.time_ns()
                request = registry_pb2.HeartbeatRequest(
                    agent_id=self.agent_id,
                    lease_id=lease_id,
                    sequence=sequence,
                    load=self.inflight,
                    health=self.health,
                    observed_latency_ms=self.latency_ewma_ms,
                )
                request.send_time.CopyFrom(timestamp_from_ns(send_ns))
                if sequence == 1:
                    request.signature = self.identity.sign(
                        *signing.heartbeat_open(self.agent_id, lease_id, send_ns)
                    )
                try:
                    await asyncio.wait_for(
                        call.write(request), timeout=max(2 * self.heartbeat_interval_s, 1.0)
                    )
                    response = await asyncio.wait_for(
                        call.read(), timeout=max(2 * self.heartbeat_interval_s, 1.0)
                    )
                except grpc.aio.AioRpcError as exc:
                    raise from_rpc_error(exc) from None
                except (asyncio.InvalidStateError, grpc.aio.UsageError):
                    # write() on a call the server already ended: its status says why.
                    response = grpc.aio.EOF
                if response is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details()
                    raise from_rpc_error(_Ended(code, details, await call.trailing_metadata()))
                backoff.reset()
                await self._sleep(self.heartbeat_interval_s)
        finally:
            call.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def stop(self, *, deregister: bool = True) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if deregister and self.lease is not None and self._registry is not None:
            try:
                await self._registry.deregister(self.identity)
            except ClientError as exc:
                log.info("agent %s: deregister failed (%s)", self.agent_id, exc)
        if self._host is not None:
            await self._host.stop()
        if self._registry is not None:
            await self._registry.close()

    async def run_until_signalled(
        self, *, ready_file: str | None = None, parent_pid: int | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        if ready_file:
            await self._wait_registered_then_write(ready_file)
        watchdog = asyncio.create_task(watch_parent(parent_pid, self._stop)) if parent_pid else None
        await self._stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        await self.stop()

    async def _wait_registered_then_write(self, path: str) -> None:
        async def wait_and_write() -> None:
            await self.registered.wait()
            payload = {"agent_id": self.agent_id, "address": self.address, "pid": os.getpid()}
            await asyncio.to_thread(write_json_atomic, path, payload)

        self._tasks.append(asyncio.create_task(wait_and_write()))

    def run(self) -> None:
        """Runs the agent in this process until SIGTERM or Ctrl-C."""
        uvloop.run(self.run_until_signalled())


class _Ended(grpc.RpcError):
    """A stream that ended with a status, shaped like an RpcError for from_rpc_error."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        super().__init__(details)
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def _as_async(fn: Callable[..., Any]) -> Handler:
    """Handlers may be ``async def`` or plain functions (run in a thread).
    They may take ``(args, ctx)`` or just ``(args)``."""
    takes_ctx = len(inspect.signature(fn).parameters) >= 2
    if inspect.iscoroutinefunction(fn):
        if takes_ctx:
            return fn

        async def without_ctx(args: list[str], ctx: ExecutionContext) -> Any:
            return await fn(args)

        return without_ctx

    async def in_thread(args: list[str], ctx: ExecutionContext) -> Any:
        return (
            await asyncio.to_thread(fn, args, ctx)
            if takes_ctx
            else await asyncio.to_thread(fn, args)
        )

    return in_thread


def _hostname() -> str:
    import socket

    return socket.gethostname()
