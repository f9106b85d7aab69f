"""The agent2028 command: one sub-command group per part of the cluster."""

from __future__ import annotations

import logging

import typer

from clients.cli import (
    agents,
    broker,
    cluster,
    consensus,
    field,
    market,
    orchestrator,
    registry,
    swarm,
    trust,
)

app = typer.Typer(
    name="agent2028",
    help="Agent2028: coordinate many software agents over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(cluster.app, name="cluster")
app.add_typer(agents.app, name="agents")
app.add_typer(registry.app, name="registry")
app.command("exec")(broker.exec_command)
app.command("route")(broker.route_command)
app.add_typer(broker.receipts_app, name="receipts")
app.add_typer(trust.app, name="trust")
app.command("propose")(consensus.propose)
app.add_typer(consensus.proposals_app, name="proposals")
app.add_typer(market.app, name="market")
app.add_typer(field.app, name="field")
app.add_typer(swarm.app, name="swarm")
app.add_typer(swarm.hive_app, name="hive")
app.add_typer(swarm.flock_app, name="flock")
app.add_typer(orchestrator.submit_app, name="submit")
app.add_typer(orchestrator.events_app, name="events")
app.add_typer(orchestrator.operations_app, name="operations")
app.command("topology")(orchestrator.topology)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
