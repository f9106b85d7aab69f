"""agent2028 agents spawn|list|find."""

from __future__ import annotations

import typer
from rich.table import Table

from agent2028.registry.v1 import registry_pb2
from clients.cli.common import (
    console,
    fail,
    health_text,
    plural,
    print_json,
    run,
    service_address,
    state_dir,
    to_dict,
)
from clients.launcher import LaunchError, LocalCluster, Proc
from clients.registry import ORDERS, STATUSES, RegistryClient

app = typer.Typer(help="Spawn agent processes and look them up.", no_args_is_help=True)


def agents_table(
    agents: list[registry_pb2.Agent], scores: list[float] | None = None, order: str = ""
) -> Table:
    """Agents, and with ``scores`` the registry's score for ``order``. The
    score of fitness, latency and reliability is that column already, so it
    is not shown twice; the load order's score (the load ratio) gets its own."""
    if order != "load":
        scores = None
    table = Table()
    for column in (
        "agent",
        "status",
        "capabilities",
        "address",
        "load",
        "latency ms",
        "reliability",
        "fitness",
    ):
        table.add_column(column)
    if scores is not None:
        table.add_column("load ratio")
    for i, a in enumerate(agents):
        row = [
            a.card.agent_id,
            health_text(a.status),
            ", ".join(a.card.capabilities),
            a.card.address,
            f"{a.load}/{a.card.max_concurrency}",
            f"{a.latency_ms:.1f}",
            f"{a.reliability:.3f}",
            f"{a.fitness:.3f}",
        ]
        if scores is not None:
            row.append(f"{scores[i]:.3f}")
        table.add_row(*row)
    return table


@app.command()
def spawn(
    count: int = typer.Argument(..., min=1, max=500, help="how many agent processes"),
    capability: list[str] = typer.Option(
        ["compute"], "--capability", "-c", help="a capability every new agent holds (repeatable)"
    ),
    prefix: str = typer.Option("agent", help="ids are PREFIX-NNN"),
    fault: list[str] = typer.Option([], "--fault", help="a fault mode for tests (repeatable)"),
    max_concurrency: int = typer.Option(8, min=1),
    registry: str = typer.Option(
        None, help="registry address (default: the detached cluster's, or REGISTRY_ADDR)"
    ),
) -> None:
    """Start COUNT agent processes that keep running after this command."""

    async def main() -> None:
        cluster = LocalCluster.load(state_dir()) or LocalCluster(
            state_dir(), services=[], attached=False
        )
        cluster.attached = False
        if "registry" not in cluster.procs or registry:
            cluster.procs["registry"] = Proc(
                name="registry",
                kind="external",
                pid=0,
                log_path="",
                address=service_address("registry", registry),
            )
        taken = {p.name for p in cluster.procs.values()}
        start = 1
        while any(f"{prefix}-{i:03d}" in taken for i in range(start, start + count)):
            start += 1
        try:
            procs = await cluster.spawn_agents(
                count,
                [capability],
                prefix=prefix,
                start_index=start,
                faults=fault,
                max_concurrency=max_concurrency,
            )
        except (LaunchError, TimeoutError) as exc:
            fail(str(exc))
        cluster.save()
        for proc in procs:
            console.print(f"[green]started[/green] {proc.name} at {proc.address} (pid {proc.pid})")

    run(main())


@app.command("list")
def list_agents(
    capability: str = typer.Option(
        "", "--capability", "-c", help="only agents holding this capability"
    ),
    status: list[str] = typer.Option(
        [], "--status", help="passing, warning or critical (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json"),
    registry: str = typer.Option(None, help="registry address"),
) -> None:
    """Every registered agent."""
    for s in status:
        if s not in STATUSES:
            fail(f"--status {s!r}: expected one of {', '.join(STATUSES)}")

    async def main() -> None:
        async with RegistryClient(service_address("registry", registry)) as client:
            agents = [a async for a in client.iter_agents(capability=capability, statuses=status)]
        if as_json:
            print_json([to_dict(a) for a in agents])
        else:
            console.print(agents_table(agents))
            console.print(plural(len(agents), "agent"))

    run(main())


@app.command()
def find(
    capability: str = typer.Argument(..., help="e.g. database.query"),
    top: int = typer.Option(5, "--top", "-k", min=1, max=1000),
    order: str = typer.Option("fitness", help="fitness, latency, reliability or load"),
    include_unhealthy: bool = typer.Option(False, "--include-unhealthy"),
    as_json: bool = typer.Option(False, "--json"),
    registry: str = typer.Option(None, help="registry address"),
) -> None:
    """The best agents for a capability, from the registry's index."""
    if order not in ORDERS:
        fail(f"--order {order!r}: expected one of {', '.join(ORDERS)}")

    async def main() -> None:
        async with RegistryClient(service_address("registry", registry)) as client:
            found = await client.find_by_capability(
                capability, order=order, top_k=top, include_unhealthy=include_unhealthy
            )
        if as_json:
            print_json(found)
        else:
            console.print(agents_table(list(found.agents), list(found.scores), order))
            console.print(
                f"{len(found.agents)} of {plural(found.total_with_capability, 'agent')} "
                f"holding {capability}"
            )

    run(main())
