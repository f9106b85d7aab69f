"""agent2028 cluster up|down|status: the local cluster as processes."""

from __future__ import annotations

import asyncio
import signal

import typer
from rich.table import Table

from clients.cli.common import console, fail, print_json, run, state_dir
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
    if LocalCluster.load(state_dir()) is not None:
        existing = LocalCluster.load(state_dir())
        if existing and any(p.alive() for p in existing.procs.values()):
            fail(
                f"a detached cluster is already running (state in {state_dir()}); run 'agent2028 cluster down' first"
            )

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
                await cluster.spawn_agents(agents, DEFAULT_MIX)
        except (LaunchError, TimeoutError) as exc:
            await cluster.stop()
            fail(str(exc))
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
        console.print(f"Stopped {len(codes)} processes.")

    run(main())


@app.command()
def down() -> None:
    """Stop a detached cluster (agents first, then services)."""
    cluster = LocalCluster.load(state_dir())
    if cluster is None:
        fail(f"no detached cluster found in {state_dir()}")

    async def main() -> None:
        codes = await cluster.stop()
        console.print(f"Stopped {len(codes)} processes.")

    run(main())


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show each process of a detached cluster and each service's health."""
    cluster = LocalCluster.load(state_dir())
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
