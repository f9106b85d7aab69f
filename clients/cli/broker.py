"""agent2028 exec|route and agent2028 receipts list|get: commands through the broker."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from agent2028.broker.v1 import broker_pb2
from clients.broker import (
    STRATEGIES,
    STRATEGY_NAMES,
    BrokerClient,
    verify_agent_signature,
    verify_broker_signature,
)
from clients.cli.common import (
    console,
    fail,
    parse_duration,
    plural,
    print_json,
    run,
    service_address,
    to_dict,
)

receipts_app = typer.Typer(help="The broker's signed execution receipts.", no_args_is_help=True)

STRATEGY_HELP = "min_latency, max_reliability, best_fit, least_loaded or round_robin"


def _strategy(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        fail(f"--strategy {name!r}: expected one of {STRATEGY_HELP}")
    return key


def _tick(ok: bool) -> str:
    return "[green]✓ verifies[/green]" if ok else "[red]✗ does not verify[/red]"


def receipt_dict(
    receipt: broker_pb2.ExecutionReceipt, broker_key: bytes | None = None
) -> dict[str, Any]:
    """The receipt as JSON, with what the signatures say."""
    out = to_dict(receipt)
    out["verified"] = {
        "agent_signature": verify_agent_signature(receipt),
        "broker_signature": verify_broker_signature(receipt, broker_key)
        if broker_key is not None
        else None,
    }
    return out


def print_receipt(
    receipt: broker_pb2.ExecutionReceipt, output: str, broker_key: bytes, duplicate: bool = False
) -> None:
    state = "[green]success[/green]" if receipt.success else "[red]failure[/red]"
    table = Table(show_header=False, title="Execution receipt", title_justify="left")
    table.add_column("field", style="dim")
    table.add_column("value")
    rows = [
        (
            "command",
            receipt.command_id + (" (duplicate: the first call's receipt)" if duplicate else ""),
        ),
        ("session", receipt.session_id or "-"),
        ("agent", receipt.agent_id),
        ("capability", receipt.capability),
        ("strategy", STRATEGY_NAMES.get(receipt.strategy, str(receipt.strategy))),
        ("result", state + (f": {escape(receipt.error)}" if receipt.error else "")),
        (
            "duration",
            f"{receipt.duration_ms:.2f} ms (agent: {receipt.agent_receipt.duration_ms:.2f} ms)",
        ),
        ("attempts", " → ".join(f"{a.agent_id} {a.result}" for a in receipt.attempt_log)),
        ("agent signature", _tick(verify_agent_signature(receipt))),
        ("broker signature", _tick(verify_broker_signature(receipt, broker_key))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if output:
        try:
            pretty = json.dumps(json.loads(output), indent=2)
        except ValueError:
            pretty = output
        console.print(escape(pretty[:4000]))


def exec_command(
    capability: str = typer.Argument(..., help="e.g. database.query"),
    args: list[str] = typer.Argument(None, help="the command's arguments"),
    strategy: str = typer.Option("best_fit", "--strategy", "-s", help=STRATEGY_HELP),
    session: str = typer.Option("", "--session", help="session id, echoed in the receipt"),
    request_id: str = typer.Option(
        None, "--request-id", help="makes a retry return the first receipt"
    ),
    deadline: str = typer.Option(
        None, "--deadline", help="for the whole execution, e.g. 10s, 500ms or 2m (bare: seconds)"
    ),
    attempts: int = typer.Option(0, "--attempts", min=0, max=10, help="agents to try at most"),
    as_json: bool = typer.Option(False, "--json"),
    broker: str = typer.Option(None, help="broker address"),
) -> None:
    """Run a command on the best agent for CAPABILITY and show its signed receipt.
    Exits 1 when the command failed."""
    key = _strategy(strategy)
    deadline_s = parse_duration(deadline, "--deadline") if deadline is not None else None

    async def main() -> broker_pb2.ExecuteDistributedResponse:
        async with BrokerClient(service_address("broker", broker)) as client:
            identity = await client.identity()
            response = await client.execute(
                capability,
                args or [],
                session_id=session,
                strategy=key,
                deadline_s=deadline_s,
                request_id=request_id,
                max_attempts=attempts,
            )
        if as_json:
            output: Any = response.output
            try:
                output = json.loads(response.output) if response.output else None
            except ValueError:
                pass
            print_json(
                {
                    "receipt": receipt_dict(response.receipt, identity.public_key),
                    "output": output,
                    "duplicate": response.duplicate,
                }
            )
        else:
            print_receipt(
                response.receipt, response.output, identity.public_key, response.duplicate
            )
        return response

    response = run(main())
    if not response.receipt.success:
        raise SystemExit(1)


def route_command(
    capability: str = typer.Argument(..., help="e.g. database.query"),
    strategy: str = typer.Option("best_fit", "--strategy", "-s", help=STRATEGY_HELP),
    exclude: list[str] = typer.Option([], "--exclude", help="agent ids to leave out"),
    as_json: bool = typer.Option(False, "--json"),
    broker: str = typer.Option(None, help="broker address"),
) -> None:
    """Which agent a strategy picks for CAPABILITY now, and why (runs nothing)."""
    key = _strategy(strategy)

    async def main() -> None:
        async with BrokerClient(service_address("broker", broker)) as client:
            route = await client.route(capability, strategy=key, exclude=exclude)
        if as_json:
            print_json(route)
            return
        console.print(
            f"[bold]{route.chosen.agent.agent_id}[/bold] at {route.chosen.agent.address}: "
            f"{escape(route.reason)}"
        )
        table = Table(title=f"{key} ranking for {capability}", title_justify="left")
        for column in ("agent", "score", "latency ms", "reliability", "fitness", "in flight"):
            table.add_column(column)
        for c in route.ranking:
            table.add_row(
                c.agent.agent_id,
                f"{c.score:.3f}",
                f"{c.latency_ms:.1f}",
                f"{c.reliability:.3f}",
                f"{c.fitness:.3f}",
                f"{c.broker_inflight}/{c.max_concurrency}",
            )
        console.print(table)

    run(main())


@receipts_app.command("list")
def list_receipts(
    session: str = typer.Option("", "--session", help="only this session's receipts"),
    agent: str = typer.Option("", "--agent", help="only receipts from this agent"),
    limit: int = typer.Option(100, "--limit", "-n", min=1, max=100_000),
    as_json: bool = typer.Option(False, "--json"),
    broker: str = typer.Option(None, help="broker address"),
) -> None:
    """Receipts in the order they were made (pages through the broker's list)."""

    async def main() -> None:
        async with BrokerClient(service_address("broker", broker)) as client:
            identity = await client.identity()
            receipts = []
            async for receipt in client.iter_receipts(session_id=session, agent_id=agent):
                receipts.append(receipt)
                if len(receipts) >= limit:
                    break
        if as_json:
            print_json([receipt_dict(r, identity.public_key) for r in receipts])
            return
        table = Table(title="Receipts", title_justify="left")
        for column in (
            "command",
            "session",
            "agent",
            "capability",
            "ok",
            "ms",
            "attempts",
            "signed",
        ):
            table.add_column(column)
        for r in receipts:
            signed = verify_broker_signature(r, identity.public_key) and (
                verify_agent_signature(r) or not r.success
            )
            table.add_row(
                r.command_id,
                r.session_id or "-",
                r.agent_id,
                r.capability,
                "[green]yes[/green]" if r.success else "[red]no[/red]",
                f"{r.duration_ms:.1f}",
                str(r.attempts),
                "✓" if signed else "[red]✗[/red]",
            )
        console.print(table)
        console.print(plural(len(receipts), "receipt"))

    run(main())


@receipts_app.command("get")
def get_receipt(
    command_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    broker: str = typer.Option(None, help="broker address"),
) -> None:
    """One receipt by command id, with its output."""

    async def main() -> None:
        async with BrokerClient(service_address("broker", broker)) as client:
            identity = await client.identity()
            got = await client.get_receipt(command_id)
        if as_json:
            print_json(
                {"receipt": receipt_dict(got.receipt, identity.public_key), "output": got.output}
            )
        else:
            print_receipt(got.receipt, got.output, identity.public_key)

    run(main())
