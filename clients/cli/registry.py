"""agent2028 registry watch."""

from __future__ import annotations

import typer
from rich.markup import escape

from clients.cli.common import (
    console,
    health_text,
    plural,
    print_json_line,
    require_reachable,
    run,
    service_address,
    to_dict,
)
from clients.registry import RegistryClient

app = typer.Typer(help="The registry's change stream.", no_args_is_help=True)

EVENT_NAMES = {1: "registered", 2: "updated", 3: "health", 4: "deregistered", 5: "expired"}


@app.command()
def watch(
    from_index: int = typer.Option(
        0, "--from-index", min=0, help="0: snapshot first, then changes"
    ),
    capability: str = typer.Option("", "--capability", "-c"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    registry: str = typer.Option(None, help="registry address"),
) -> None:
    """Follow registry changes until Ctrl-C (resumes by itself after interruptions)."""

    async def main() -> None:
        async with RegistryClient(service_address("registry", registry)) as client:
            await require_reachable(client, "registry")
            async for response in client.watch(from_index=from_index, capability=capability):
                if as_json:
                    for event in response.events:
                        print_json_line({**to_dict(event), "snapshot": response.snapshot})
                    continue
                if response.snapshot:
                    console.print(
                        f"[dim]snapshot at index {response.index}: {plural(len(response.events), 'agent')}[/dim]"
                    )
                for event in response.events:
                    a = event.agent
                    what = EVENT_NAMES.get(event.type, str(event.type))
                    extra = (
                        f" {health_text(event.previous_status)} -> {health_text(a.status)}"
                        if event.type == 3
                        else ""
                    )
                    caps = escape("[" + ", ".join(a.card.capabilities) + "]")
                    console.print(
                        f"[dim]#{event.index}[/dim] [bold]{what}[/bold] {a.card.agent_id} {a.card.address} {caps}{extra}"
                    )

    run(main())


__all__ = ["app", "to_dict"]
