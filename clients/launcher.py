"""Starts the cluster on this machine: every service and any number of agents,
each its own OS process on loopback.

Used by ``make run``, by ``agent2028 cluster up`` and by the cluster tests.
Services bind port 0 (or their default ports) and report the port they got in
a ready file; the launcher waits for each to answer SERVING on the standard
health protocol before starting the next, and hands each service the addresses
of the ones before it through ``<PEER>_ADDR``. Attached clusters pass their pid
so children exit if the launcher dies; detached ones save their state to
``<state_dir>/cluster.json`` for ``cluster status`` and ``cluster down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from clients.health import wait_serving


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    default_port: int

    @property
    def addr_env(self) -> str:
        return f"{self.name.upper()}_ADDR"


# In start order: a service may call those listed before it. Adding a service
# to the cluster is adding it here.
SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec("registry", "services.registry", 50051),
        ServiceSpec("trust", "services.trust", 50054),
        ServiceSpec("broker", "services.broker", 50052),
        ServiceSpec("consensus", "services.consensus", 50053),
        ServiceSpec("market", "services.market", 50055),
        ServiceSpec("stigmergy", "services.stigmergy", 50056),
        ServiceSpec("swarm", "services.swarm", 50057),
        ServiceSpec("orchestrator", "services.orchestrator", 50050),
    )
}

# Settings that make the registry notice failures within a few seconds, for
# demos and tests (production defaults are slower and calmer).
FAST_FAILURE_DETECTION = {
    "REGISTRY_HEARTBEAT_INTERVAL_S": "0.5",
    "REGISTRY_LEASE_TTL_S": "3",
    "REGISTRY_DEREGISTER_CRITICAL_AFTER_S": "2",
}


@dataclass
class Proc:
    name: str
    kind: str  # "service" or "agent"
    pid: int
    log_path: str
    address: str = ""
    port: int = 0
    metrics_port: int = 0
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.kind == "external":
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _is_ours(self.pid)


def _is_ours(pid: int) -> bool:
    """A pid from a saved state file still runs one of our processes (not a
    recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc: trust the pid
    return b"services." in cmdline or b"clients.agent" in cmdline


def _read_json(path: str) -> dict[str, object] | None:
    """A small JSON file, or None while it does not exist (yet)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class LaunchError(RuntimeError):
    pass


class LocalCluster:
    def __init__(
        self,
        state_dir: str = ".agent2028",
        *,
        services: Iterable[str] | None = None,
        ephemeral_ports: bool = True,
        env: Mapping[str, str] | None = None,
        attached: bool = True,
        python: str = sys.executable,
        host: str = "127.0.0.1",
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.service_names = list(services) if services is not None else list(SERVICES)
        unknown = [s for s in self.service_names if s not in SERVICES]
        if unknown:
            raise ValueError(
                f"unknown services: {', '.join(unknown)}; known: {', '.join(SERVICES)}"
            )
        self.ephemeral_ports = ephemeral_ports
        self.env = dict(env or {})
        self.attached = attached
        self.python = python
        self.host = host
        self.procs: dict[str, Proc] = {}
        os.makedirs(self.logs_dir, exist_ok=True)

    # --- paths and addresses ---------------------------------------------------

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "cluster.json")

    def address(self, name: str) -> str:
        proc = self.procs.get(name)
        if proc is None or not proc.address:
            raise KeyError(f"{name} is not running in this cluster")
        return proc.address

    def peer_env(self) -> dict[str, str]:
        return {
            SERVICES[p.name].addr_env: p.address
            for p in self.procs.values()
            if p.kind in ("service", "external") and p.address and p.name in SERVICES
        }

    @property
    def agents(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.kind == "agent"]

    # --- processes ---------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.attached:
            env["AGENT2028_PARENT_PID"] = str(os.getpid())
        else:
            env.pop("AGENT2028_PARENT_PID", None)
        return env

    def _spawn(self, name: str, kind: str, args: list[str], env: dict[str, str]) -> Proc:
        log_path = os.path.join(self.logs_dir, f"{name}.log")
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                [self.python, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.getcwd(),
            )
        finally:
            log.close()
        return Proc(
            name=name,
            kind=kind,
            pid=popen.pid,
            log_path=log_path,
            args=args,
            env={k: v for k, v in env.items() if k not in os.environ or os.environ[k] != v},
            popen=popen,
        )

    async def _wait_ready_file(
        self, proc: Proc, ready_file: str, timeout_s: float
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive():
                raise LaunchError(
                    f"{proc.name} exited during start-up:\n{self.log_tail(proc.name)}"
                )
            ready = _read_json(ready_file)
            if ready is not None:
                return ready
            await asyncio.sleep(0.02)
        raise LaunchError(
            f"{proc.name} did not become ready within {timeout_s}s:\n{self.log_tail(proc.name)}"
        )

    def log_tail(self, name: str, lines: int = 20) -> str:
        proc = self.procs.get(name)
        path = proc.log_path if proc else os.path.join(self.logs_dir, f"{name}.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Starts every service in order, each once the previous is SERVING."""
        for name in self.service_names:
            await self.start_service(name, timeout_s=timeout_s)
        if not self.attached:
            self.save()

    async def start_service(
        self, name: str, *, port: int | None = None, timeout_s: float = 30.0
    ) -> Proc:
        spec = SERVICES[name]
        if port is None:
            previous = self.procs.get(name)
            port = (
                previous.port
                if previous and previous.port
                else (0 if self.ephemeral_ports else spec.default_port)
            )
        ready_file = os.path.join(self.state_dir, "run", f"{name}.ready.json")
        os.makedirs(os.path.dirname(ready_file), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_file)
        env = self._base_env()
        env.update(self.peer_env())
        env.update(
            {
                "PORT": str(port),
                "BIND_HOST": self.host,
                "READY_FILE": ready_file,
                "DATA_DIR": os.path.join(self.state_dir, "data", name),
                "METRICS_PORT": env.get(
                    f"{name.upper()}_METRICS_PORT", "0" if port == 0 else str(port + 1000)
                ),
            }
        )
        proc = self._spawn(name, "service", ["-m", spec.module], env)
        self.procs[name] = proc
        ready = await self._wait_ready_file(proc, ready_file, timeout_s)
        proc.port = int(ready["port"])  # type: ignore[arg-type]
        proc.metrics_port = int(ready.get("metrics_port", 0) or 0)  # type: ignore[arg-type]
        proc.address = f"{self.host}:{proc.port}"
        await wait_serving(proc.address, timeout_s=timeout_s)
        return proc

    async def spawn_agent(
        self,
        agent_id: str,
        capabilities: Sequence[str],
        *,
        faults: Sequence[str] = (),
        max_concurrency: int = 8,
        metadata: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout_s: float = 30.0,
    ) -> Proc:
        """Starts one agent process; with ``wait``, returns once it registered."""
        if "registry" not in self.procs:
            raise LaunchError("start the registry before agents")
        agent_dir = os.path.join(self.state_dir, "agents", agent_id)
        ready_file = os.path.join(self.state_dir, "run", f"{agent_id}.ready.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_file)
        args = [
            "-m",
            "clients.agent",
            "--id",
            agent_id,
            "--data-dir",
            agent_dir,
            "--max-concurrency",
            str(max_concurrency),
            "--ready-file",
            ready_file,
        ]
        for cap in capabilities:
            args += ["--capability", cap]
        for fault in faults:
            args += ["--fault", fault]
        for key, value in (metadata or {}).items():
            args += ["--metadata", f"{key}={value}"]
        args += list(extra_args)
        child_env = self._base_env()
        child_env.update(self.peer_env())
        child_env.update(env or {})
        proc = self._spawn(agent_id, "agent", args, child_env)
        proc.capabilities = list(capabilities)
        self.procs[agent_id] = proc
        if wait:
            ready = await self._wait_ready_file(proc, ready_file, timeout_s)
            proc.address = str(ready["address"])
        if not self.attached:
            self.save()
        return proc

    async def spawn_agents(
        self,
        count: int,
        capabilities: Sequence[Sequence[str]],
        *,
        prefix: str = "agent",
        start_index: int = 1,
        pool_votes: Sequence[str] = (),
        **kwargs: object,
    ) -> list[Proc]:
        """``count`` agents named prefix-001...; agent i holds capabilities[i % len]
        and, when ``pool_votes`` is given, votes in swarm pools by
        pool_votes[i % len] (AGENT_POOL_VOTE)."""
        env = dict(kwargs.pop("env", None) or {})  # type: ignore[call-overload]
        procs = []
        for i in range(start_index, start_index + count):
            n = i - start_index
            own = dict(env)
            if pool_votes:
                own["AGENT_POOL_VOTE"] = pool_votes[n % len(pool_votes)]
            procs.append(
                await self.spawn_agent(
                    f"{prefix}-{i:03d}",
                    capabilities[n % len(capabilities)],
                    wait=False,
                    env=own,
                    **kwargs,  # type: ignore[arg-type]
                )
            )
        for proc in procs:
            ready_file = os.path.join(self.state_dir, "run", f"{proc.name}.ready.json")
            ready = await self._wait_ready_file(
                proc, ready_file, float(kwargs.get("timeout_s", 30.0))
            )  # type: ignore[arg-type]
            proc.address = str(ready["address"])
        if not self.attached:
            self.save()
        return procs

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    async def kill(self, name: str) -> None:
        """kill -9, then reap."""
        self.signal(name, signal.SIGKILL)
        await self.wait_exit(name, timeout_s=10.0)

    async def terminate(self, name: str, *, timeout_s: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it had to be killed)."""
        self.signal(name, signal.SIGTERM)
        try:
            return await self.wait_exit(name, timeout_s=timeout_s)
        except TimeoutError:
            await self.kill(name)
            return None

    async def wait_exit(self, name: str, *, timeout_s: float) -> int | None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.popen is not None:
                code = proc.popen.poll()
                if code is not None:
                    return code
            elif not proc.alive():
                return None
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{name} (pid {proc.pid}) still running after {timeout_s}s")

    async def restart_service(self, name: str, *, timeout_s: float = 30.0) -> Proc:
        """Starts a stopped or killed service again on the same port."""
        proc = self.procs[name]
        if proc.alive():
            await self.terminate(name)
        return await self.start_service(name, port=proc.port, timeout_s=timeout_s)

    async def stop(self, *, timeout_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM agents, then services in reverse order; SIGKILL stragglers."""
        codes: dict[str, int | None] = {}
        agents = [p.name for p in self.procs.values() if p.kind == "agent" and p.alive()]
        for name in agents:
            self.signal(name, signal.SIGTERM)
        for name in agents:
            try:
                codes[name] = await self.wait_exit(name, timeout_s=timeout_s)
            except TimeoutError:
                await self.kill(name)
                codes[name] = None
        for name in reversed([p.name for p in self.procs.values() if p.kind == "service"]):
            if self.procs[name].alive():
                codes[name] = await self.terminate(name, timeout_s=timeout_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file)
        return codes

    # --- detached state ------------------------------------------------------------

    def save(self) -> None:
        state = {
            "state_dir": self.state_dir,
            "services": self.service_names,
            "procs": [
                {f.name: getattr(p, f.name) for f in fields(Proc) if f.name != "popen"}
                for p in self.procs.values()
            ],
        }
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, state_dir: str = ".agent2028") -> LocalCluster | None:
        path = os.path.join(os.path.abspath(state_dir), "cluster.json")
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return None
        cluster = cls(state_dir, services=state.get("services", []), attached=False)
        for item in state.get("procs", []):
            proc = Proc(**item)
            cluster.procs[proc.name] = proc
        return cluster


def saved_address(service: str, state_dir: str = ".agent2028") -> str | None:
    """The address of ``service`` in a detached cluster's saved state, if any."""
    cluster = (
        LocalCluster.load(state_dir)
        if os.path.exists(os.path.join(state_dir, "cluster.json"))
        else None
    )
    if cluster is None:
        return None
    proc = cluster.procs.get(service)
    return proc.address if proc and proc.alive() else None
