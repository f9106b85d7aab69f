"""agent2028 field deposit|read|gradient|nearest|show: the pheromone field."""

from __future__ import annotations

import asyncio

import typer

from clients.cli.common import (
    console,
    fail,
    plural,
    print_json,
    print_json_line,
    require_reachable,
    run,
    service_address,
)
from clients.cli.heatmap import heatmap
from clients.cli.signer import load_identity
from clients.stigmergy import AGGREGATIONS, StigmergyClient, region

app = typer.Typer(help="The pheromone field (stigmergy).", no_args_is_help=True)

TYPE_OPTION = typer.Option(..., "--type", "-t", help="pheromone type, e.g. food")


def _region(text: str | None) -> tuple[int, int, int, int]:
    if not text:
        return (0, 0, 0, 0)
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        fail(f"--region {text!r}: expected X_MIN,Y_MIN,X_MAX,Y_MAX")
    return x0, y0, x1, y1


@app.command()
def deposit(
    x: float = typer.Argument(...),
    y: float = typer.Argument(...),
    pheromone_type: str = TYPE_OPTION,
    amount: float = typer.Option(0.0, help="intensity to add (0: the service's default)"),
    agent: str = typer.Option(..., "--agent", "-a", help="the registered agent depositing"),
    key_file: str = typer.Option(None, help="the agent's key (default: its key in the state dir)"),
    as_json: bool = typer.Option(False, "--json"),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """Deposit pheromone at (X, Y), signed as AGENT."""
    identity = load_identity(agent, key_file)

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            response = await client.deposit(identity, x, y, pheromone_type, amount)
        if as_json:
            print_json(response)
        else:
            capped = " (capped)" if response.capped else ""
            console.print(
                f"{pheromone_type} at ({x:g}, {y:g}) is now {response.intensity:.4g}{capped}"
            )

    run(main())


@app.command()
def read(
    x: float = typer.Argument(...),
    y: float = typer.Argument(...),
    pheromone_type: str = TYPE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """The intensity at (X, Y)."""

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            value = await client.read(x, y, pheromone_type)
        if as_json:
            print_json({"intensity": value})
        else:
            console.print(f"{pheromone_type} at ({x:g}, {y:g}): {value:.6g}")

    run(main())


@app.command()
def gradient(
    x: float = typer.Argument(...),
    y: float = typer.Argument(...),
    pheromone_type: str = TYPE_OPTION,
    radius: int = typer.Option(0, min=0, help="sensing radius in cells (0: the service's)"),
    negate: bool = typer.Option(False, "--away", help="the direction away (to avoid danger)"),
    as_json: bool = typer.Option(False, "--json"),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """The unit direction of increasing intensity at (X, Y); (0, 0) where flat."""

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            g = await client.gradient(x, y, pheromone_type, radius=radius)
        dx, dy = (-g.dx, -g.dy) if negate and not g.flat else (g.dx, g.dy)
        if as_json:
            print_json({"dx": dx, "dy": dy, "magnitude": g.magnitude, "flat": g.flat})
        elif g.flat:
            console.print(f"{pheromone_type} is flat at ({x:g}, {y:g}): (0, 0)")
        else:
            console.print(
                f"{pheromone_type} at ({x:g}, {y:g}): {'away ' if negate else ''}"
                f"({dx:.3f}, {dy:.3f}), slope {g.magnitude:.4g}"
            )

    run(main())


@app.command()
def nearest(
    x: float = typer.Argument(...),
    y: float = typer.Argument(...),
    pheromone_type: str = TYPE_OPTION,
    radius: int = typer.Option(0, min=0, help="search radius in cells (0: the service's)"),
    above: float = typer.Option(0.0, min=0.0, help="only cells with intensity above this"),
    as_json: bool = typer.Option(False, "--json"),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """The closest cell carrying the pheromone."""

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            found = await client.find_nearest(
                x, y, pheromone_type, radius=radius, min_intensity=above
            )
        if as_json:
            print_json(found)
        elif found.found:
            console.print(
                f"nearest {pheromone_type}: cell ({found.x}, {found.y}), intensity "
                f"{found.intensity:.4g}, {found.distance:.1f} cells away"
            )
        else:
            console.print(f"no {pheromone_type} within reach of ({x:g}, {y:g})")

    run(main())


@app.command()
def show(
    pheromone_type: str = TYPE_OPTION,
    columns: int = typer.Option(80, min=1, max=400, help="characters across"),
    lines: int = typer.Option(25, min=1, max=200, help="lines down"),
    region_text: str = typer.Option(None, "--region", help="X_MIN,Y_MIN,X_MAX,Y_MAX (cells)"),
    aggregation: str = typer.Option("max", help="mean, max or sum per character"),
    linear: bool = typer.Option(False, help="linear colour scale (default: logarithmic)"),
    watch: bool = typer.Option(False, "--watch", "-w", help="keep redrawing as the field changes"),
    as_json: bool = typer.Option(
        False, "--json", help="the view as JSON (with --watch: one object per line)"
    ),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """Draw a layer as a heatmap in the terminal (y grows upward)."""
    if aggregation not in AGGREGATIONS:
        fail(f"--aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    area = region(*_region(region_text))

    def draw(view) -> None:  # type: ignore[no-untyped-def]
        r = view.region
        console.print(heatmap(list(view.values), view.columns, view.rows, log_scale=not linear))
        console.print(
            f"{pheromone_type}: cells x {r.x_min}..{r.x_max}, y {r.y_min}..{r.y_max}; "
            f"max {view.maximum:.4g}, total {view.total:.4g}, tick {view.tick}"
        )

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            if not watch:
                view = await client.sense(
                    pheromone_type,
                    area=area,
                    columns=columns,
                    rows=lines,
                    aggregation=aggregation,
                )
                if as_json:
                    print_json(view)
                else:
                    draw(view)
                return
            await require_reachable(client, "stigmergy")
            async for view in client.watch_field(
                pheromone_type, area=area, columns=columns, rows=lines, aggregation=aggregation
            ):
                if as_json:
                    print_json_line(view)
                    continue
                console.clear()
                draw(view)
                await asyncio.sleep(0)

    run(main())


@app.command()
def info(
    as_json: bool = typer.Option(False, "--json"),
    stigmergy: str = typer.Option(None, help="stigmergy address"),
) -> None:
    """The grid, its rates and every layer's total."""

    async def main() -> None:
        async with StigmergyClient(service_address("stigmergy", stigmergy)) as client:
            field = await client.get_field()
        if as_json:
            print_json(field)
            return
        console.print(
            f"{field.width} x {field.height} cells, decay {field.decay_rate:g}, diffusion "
            f"{field.diffusion_rate:g} per tick, {plural(field.ticks, 'tick')}, {plural(field.deposits, 'deposit')}"
        )
        for layer in field.layers:
            console.print(
                f"  {layer.pheromone_type}: total {layer.total:.4g}, max {layer.maximum:.4g}"
                + ("" if layer.active else " (decayed away)")
            )

    run(main())
