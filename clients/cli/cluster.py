"""agent2028 cluster up|down|status: the local cluster as processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket

import typer
from rich.table import Table

from clients.cli.common import console, fail, plural, print_json, run, state_dir
from clients.health import check
from clients.launcher import SERVICES, LaunchError, LocalCluster

app = typer.Typer(help="Start, inspect and stop the local cluster.", no_args_is_help=True)

DEFAULT_MIX = [
    ["database.query", "compute"],
    ["ml.inference", "compute"],
    ["database.query", "ml.inference"],
    ["compute", "echo"],
    ["database.query", "echo"],
]
# How each agent votes in swarm pools (AGENT_POOL_VOTE), so a CollectiveDecision
# on a fresh cluster has voters: the guide's 5.1 votes, then two more.
DEFAULT_POOL_VOTES = ["approve:0.9", "approve:0.85", "reject:0.6", "approve:0.8", "approve:0.7"]


def _table(cluster: LocalCluster, health: dict[str, str]) -> Table:
    table = Table(title="agent2028 cluster")
    for column in ("name", "kind", "pid", "address", "status", "log"):
        table.add_column(column)
    for proc in cluster.procs.values():
        status = health.get(proc.name) or ("running" if proc.alive() else "[red]exited[/red]")
        if status == "SERVING":
            status = "[green]SERVING[/green]"
        table.add_row(proc.name, proc.kind, str(proc.pid), proc.address, status, proc.log_path)
    return table


async def _health(cluster: LocalCluster) -> dict[str, str]:
    out: dict[str, str] = {}
    for proc in cluster.procs.values():
        if proc.kind == "service":
            out[proc.name] = await check(proc.address) if proc.alive() else "EXITED"
    return out


def _load() -> LocalCluster | None:
    """The detached cluster saved in the state dir, if any (a state file
    that cannot be read is a one-line error, not a traceback)."""
    try:
        return LocalCluster.load(state_dir())
    except (ValueError, TypeError) as exc:
        fail(f"cannot read the cluster state in {state_dir()}/cluster.json: {exc}")


def _port_in_use(host: str, port: int) -> bool:
    """Something listens on host:port. SO_REUSEADDR, as the servers set it, so
    only a listener (not a connection in TIME_WAIT) makes the bind fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listener_state_dir(port: int) -> str | None:
    """Best effort, on Linux: when a process of another detached cluster
    listens on ``port``, the state dir it was started with (the launcher
    gives each service DATA_DIR=<state dir>/data/<name>)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fd_dir = f"/proc/{pid}/fd"
            if not any(
                os.readlink(os.path.join(fd_dir, fd)) in inodes for fd in os.listdir(fd_dir)
            ):
                continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            data_dir = env.get(b"DATA_DIR", b"").decode(errors="replace")
            candidate = os.path.dirname(os.path.dirname(data_dir)) if data_dir else ""
            if candidate and os.path.isfile(os.path.join(candidate, "cluster.json")):
                return candidate
    return None


def _check_default_ports(host: str = "127.0.0.1") -> None:
    """Before starting anything on the default ports: each must be free."""
    for spec in SERVICES.values():
        metrics = os.environ.get(f"{spec.name.upper()}_METRICS_PORT", str(spec.default_port + 1000))
        ports = [spec.default_port] + [int(metrics)] * (metrics.isdigit() and metrics != "0")
        for port in ports:
            if not _port_in_use(host, port):
                continue
            other = _listener_state_dir(port)
            if other:
                fail(
                    f"a cluster is already running (state in {other}): stop it with "
                    f"`AGENT2028_STATE_DIR={other} agent2028 cluster down`, or pass --ephemeral-ports"
                )
            fail(
                f"port {port} ({spec.name}'s default) is already in use on {host}: "
                "pass --ephemeral-ports to bind free ports instead"
            )


def _launch_error(exc: Exception) -> str:
    """A launch failure in one line: what failed and the log's last line (a
    service's traceback stays in its log, under the state dir)."""
    head, _, tail = str(exc).partition("\n")
    head = head.rstrip(":")
    bind = re.search(r"Failed to bind to address (\S+?);", tail)
    if bind:
        return (
            f"{head}: cannot bind {bind[1]} (already in use?): "
            "pass --ephemeral-ports to bind free ports instead"
        )
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    return f"{head}: {last}" if last else head


@app.command()
def up(
    agents: int = typer.Option(
        5, "--agents", "-n", min=0, max=500, help="agent processes to start"
    ),
    detach: bool = typer.Option(
        False, "--detach", "-d", help="leave the cluster running and return"
    ),
    ephemeral_ports: bool = typer.Option(
        False, "--ephemeral-ports", help="bind free ports instead of the defaults (50050...)"
    ),
    fast: bool = typer.Option(
        True, "--fast/--calm", help="fast failure detection (0.5s heartbeats) or production timings"
    ),
) -> None:
    """Start every service and AGENTS agents with mixed capabilities."""
    existing = _load()
    if existing is not None and any(p.alive() for p in existing.procs.values()):
        fail(
            f"a cluster is already running (state in {existing.state_dir}): "
            "stop it with `agent2028 cluster down`"
        )
    if not ephemeral_ports:
        _check_default_ports()

    async def main() -> None:
        from clients.launcher import FAST_FAILURE_DETECTION

        cluster = LocalCluster(
            state_dir(),
            ephemeral_ports=ephemeral_ports,
            attached=not detach,
            env=FAST_FAILURE_DETECTION if fast else {},
        )
        try:
            await cluster.start()
            if agents:
                await cluster.spawn_agents(agents, DEFAULT_MIX, pool_votes=DEFAULT_POOL_VOTES)
        except (LaunchError, TimeoutError) as exc:
            await cluster.stop()
            fail(_launch_error(exc))
        console.print(_table(cluster, await _health(cluster)))
        if detach:
            cluster.save()
            console.print(
                "Detached. [bold]agent2028 cluster status[/bold] to look, [bold]agent2028 cluster down[/bold] to stop."
            )
            return
        console.print("Running. Ctrl-C stops everything.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        console.print("Stopping...")
        codes = await cluster.stop()
        console.print(f"Stopped {plural(len(codes), 'process', 'processes')}.")

    run(main())


@app.command()
def down() -> None:
    """Stop a detached cluster (agents first, then services)."""
    cluster = _load()
    if cluster is None:
        fail(f"no detached cluster found in {state_dir()}")

    async def main() -> None:
        codes = await cluster.stop()
        console.print(f"Stopped {plural(len(codes), 'process', 'processes')}.")

    run(main())


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show each process of a detached cluster and each service's health."""
    cluster = _load()
    if cluster is None:
        fail(f"no detached cluster found in {state_dir()}")

    async def main() -> None:
        health = await _health(cluster)
        if as_json:
            print_json(
                [
                    {
                        "name": p.name,
                        "kind": p.kind,
                        "pid": p.pid,
                        "address": p.address,
                        "alive": p.alive(),
                        "health": health.get(p.name),
                    }
                    for p in cluster.procs.values()
                ]
            )
        else:
            console.print(_table(cluster, health))

    run(main())


__all__ = ["SERVICES", "app"]
