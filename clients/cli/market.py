"""agent2028 market list-task|tasks|task|bids|auction|relist|load|watch."""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from agent2028.market.v1 import market_pb2
from clients.cli.common import (
    console,
    fail,
    parse_duration,
    plural,
    print_json,
    print_json_line,
    require_reachable,
    run,
    service_address,
    to_dict,
)
from clients.market import EVENT_NAMES, EVENT_TYPES, STATE_NAMES, STATES, MarketClient

app = typer.Typer(help="The task market: list tasks, see bids, run auctions.", no_args_is_help=True)

STATE_STYLES = {"open": "cyan", "assigned": "yellow", "completed": "green", "failed": "red"}


def state_text(state: int) -> str:
    name = STATE_NAMES.get(state, str(state))
    style = STATE_STYLES.get(name)
    return f"[{style}]{name}[/{style}]" if style else name


def tasks_table(tasks: list[market_pb2.Task]) -> Table:
    table = Table()
    for column in ("task", "type", "requirements", "state", "attempt", "bids", "agent", "score"):
        table.add_column(column)
    for t in tasks:
        table.add_row(
            t.task_id,
            t.task_type,
            escape(", ".join(t.requirements)),
            state_text(t.state),
            str(t.attempt),
            # The market counts a closed task's bids too: shown whatever the state.
            str(t.bid_count),
            t.assigned_agent_id,
            f"{t.winning_bid.score:.4f}" if t.assigned_agent_id else "",
        )
    return table


@app.command("list-task")
def list_task(
    task_id: str = typer.Argument("", help="the task's id (default: the market makes one)"),
    task_type: str = typer.Option("compute", "--type", "-t", help="free text, e.g. ml_inference"),
    requirement: list[str] = typer.Option(
        [], "--requirement", "-r", help="a capability bidders must hold (repeatable)"
    ),
    capability: str = typer.Option("", help="the requirement whose handler runs the task"),
    arg: list[str] = typer.Option(
        [], "--arg", "-a", help="an argument for the handler (repeatable)"
    ),
    priority: int = typer.Option(0, min=0, max=100),
    reward: float = typer.Option(0.0, min=0.0),
    deadline: str = typer.Option("", help="how long from now, e.g. 2h (default: none)"),
    window: str = typer.Option(
        "", help="bidding window, e.g. 2s: the market auctions when it closes (default: never)"
    ),
    max_attempts: int = typer.Option(1, min=1, max=100, help="re-list after a failure until this"),
    trust: bool = typer.Option(False, "--trust", help="the market's auction uses trust"),
    request_id: str = typer.Option("", help="makes a retry safe when the market picks the id"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """List (announce) a task for agents to bid on."""
    requirements = requirement or [task_type]
    deadline_at = time.time() + parse_duration(deadline, "--deadline") if deadline else None
    window_s = parse_duration(window, "--window") if window else 0.0

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            response = await client.list_task(
                task_type,
                requirements,
                task_id=task_id,
                capability=capability,
                args=arg,
                priority=priority,
                reward=reward,
                deadline=deadline_at,
                bidding_window_s=window_s,
                max_attempts=max_attempts,
                scoring="trust" if trust else "plain",
                request_id=request_id,
            )
        if as_json:
            print_json(response)
            return
        verb = "listed" if response.created else "already listed"
        console.print(f"[green]{verb}[/green] {response.task.task_id}")

    run(main())


@app.command()
def tasks(
    state: list[str] = typer.Option([], "--state", "-s", help=f"{', '.join(STATES)} (repeatable)"),
    agent: str = typer.Option("", help="only tasks assigned to (or last won by) this agent"),
    task_type: str = typer.Option("", "--type", "-t"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """Every task, in listing order."""
    for s in state:
        if s not in STATES:
            fail(f"--state {s!r}: expected one of {', '.join(STATES)}")

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            found = [
                t
                async for t in client.iter_tasks(states=state, agent_id=agent, task_type=task_type)
            ]
        if as_json:
            print_json([to_dict(t) for t in found])
        else:
            console.print(tasks_table(found))
            console.print(plural(len(found), "task"))

    run(main())


@app.command()
def task(
    task_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """One task with its assignment history."""

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            found = await client.get_task(task_id)
        if as_json:
            print_json(found)
            return
        console.print(tasks_table([found]))
        for a in found.assignments:
            console.print(
                f"  attempt {a.attempt}: {a.agent_id} (score {a.bid.score:.4f}, load {a.bid.load}) "
                f"-> {state_text(a.outcome)} {escape(a.error)}"
            )
        if found.output:
            console.print(f"  output: {escape(found.output[:500])}")

    run(main())


@app.command()
def bids(
    task_id: str = typer.Argument(...),
    attempt: int = typer.Option(0, min=0, help="0: the current attempt"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """A task's bids, earliest first, each scored with the market's load now."""

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            found = [b async for b in client.iter_bids(task_id, attempt=attempt)]
        if as_json:
            print_json([to_dict(b) for b in found])
            return
        table = Table()
        for column in ("#", "agent", "price", "est. s", "confidence", "load", "score"):
            table.add_column(column)
        best = min(found, key=lambda b: (b.score, b.sequence)) if found else None
        for b in found:
            mark = "[bold green]" if b is best else ""
            table.add_row(
                str(b.sequence),
                f"{mark}{b.agent_id}",
                f"{b.price:g}",
                f"{b.estimated_completion_seconds:g}",
                f"{b.confidence:.2f}",
                str(b.load),
                f"{b.score:.4f}",
            )
        console.print(table)
        console.print(plural(len(found), "bid"))

    run(main())


@app.command()
def auction(
    task_id: str = typer.Argument(...),
    trust: bool = typer.Option(False, "--trust", help="divide scores by conservative trust"),
    request_id: str = typer.Option("", help="a retry with the same id returns the first result"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """Run a task's auction (once): the lowest score wins and gets the task."""

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            result = await client.run_auction(
                task_id, scoring="trust" if trust else "plain", request_id=request_id
            )
        if as_json:
            print_json(result)
            return
        w = result.winning_bid
        console.print(f"Auction winner: [bold]{w.agent_id}[/bold]")
        console.print(f"  Bid price: ${w.price:.2f}")
        console.print(f"  Est. completion: {w.estimated_completion_seconds:g}s")
        console.print(f"  Confidence: {w.confidence:.2f}")
        console.print(f"  Current load: {w.load} (the market's count)")
        console.print(f"  Score: {w.score:.4f} of {plural(result.bids_considered, 'bid')}")

    run(main())


@app.command()
def relist(
    task_id: str = typer.Argument(...),
    deadline: str = typer.Option("", help="a new deadline from now, e.g. 1h"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """Open a failed or expired task again, without the agents that failed it."""
    deadline_at = time.time() + parse_duration(deadline, "--deadline") if deadline else None

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            response = await client.relist_task(task_id, deadline=deadline_at)
        if as_json:
            print_json(response)
        else:
            console.print(f"[green]re-listed[/green] {task_id} (attempt {response.task.attempt})")

    run(main())


@app.command()
def load(
    agent: str = typer.Argument("", help="one agent (default: every agent the market knows)"),
    as_json: bool = typer.Option(False, "--json"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """Each agent's load as the market counts it, and its record."""

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            if agent:
                loads = [await client.get_agent_load(agent)]
            else:
                loads = [x async for x in client.iter_agent_loads()]
        if as_json:
            print_json([to_dict(x) for x in loads])
            return
        table = Table()
        for column in ("agent", "load", "won", "completed", "failed", "expired"):
            table.add_column(column)
        for x in loads:
            table.add_row(
                x.agent_id,
                str(x.load),
                str(x.won),
                str(x.completed),
                str(x.failed),
                str(x.expired),
            )
        console.print(table)

    run(main())


@app.command()
def watch(
    event_type: list[str] = typer.Option(
        [], "--type", "-t", help=f"{', '.join(EVENT_TYPES)} (repeatable)"
    ),
    agent: str = typer.Option("", help="only events about this agent"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    market: str = typer.Option(None, help="market address"),
) -> None:
    """Follow market events until Ctrl-C."""
    for t in event_type:
        if t not in EVENT_TYPES:
            fail(f"--type {t!r}: expected one of {', '.join(EVENT_TYPES)}")

    async def main() -> None:
        async with MarketClient(service_address("market", market)) as client:
            await require_reachable(client, "market")
            async for response in client.watch(types=event_type, agent_id=agent):
                for e in response.events:
                    if as_json:
                        print_json_line(e)
                        continue
                    what = EVENT_NAMES.get(e.type, str(e.type))
                    extra = ""
                    if e.type == market_pb2.EVENT_TYPE_BID_PLACED:
                        extra = f" {e.bid.price:g} for {e.bid.estimated_completion_seconds:g}s"
                    elif e.type == market_pb2.EVENT_TYPE_AUCTION_WON:
                        extra = f" score {e.bid.score:.4f}"
                    console.print(
                        f"[dim]#{e.index}[/dim] [bold]{what}[/bold] {e.task.task_id} {e.agent_id}{extra}"
                    )

    run(main())
