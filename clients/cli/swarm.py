"""agent2028 swarm pool create|vote|result|list, agent2028 hive show|belief|intend|adopt,
agent2028 flock create|step|show|list|delete."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from agent2028.swarm.v1 import swarm_pb2
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
from clients.cli.heatmap import bar, flock_picture
from clients.cli.signer import load_identity
from clients.swarm import STATUS_NAMES, THRESHOLDS, SwarmClient

app = typer.Typer(help="Collective decisions: voting pools.", no_args_is_help=True)
pool_app = typer.Typer(help="Voting pools.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
hive_app = typer.Typer(help="The hive mind: beliefs, intentions, decisions.", no_args_is_help=True)
flock_app = typer.Typer(help="Flocks of boids.", no_args_is_help=True)

STATUS_STYLES = {1: "yellow", 2: "green", 3: "red"}
THRESHOLD_NAMES = {1: "simple majority", 2: "super majority", 3: "unanimous"}


def _status(status: int) -> str:
    name = STATUS_NAMES.get(status, str(status))
    style = STATUS_STYLES.get(status)
    return f"[{style}]{name}[/{style}]" if style else name


def _print_pool(pool: swarm_pb2.Pool) -> None:
    state = "closed" if pool.closed else f"open until {pool.close_time.ToDatetime():%H:%M:%S} UTC"
    console.print(
        f"[bold]{pool.pool_id}[/bold] {escape(pool.topic)} "
        f"({THRESHOLD_NAMES.get(pool.threshold, pool.threshold)}, "
        f"min {plural(pool.min_votes, 'vote')}, {state})"
    )
    decision = pool.decision or "-"
    console.print(
        f"  {_status(pool.status)}: {escape(decision)} with confidence {pool.confidence:.3f} "
        f"from {plural(pool.vote_count, 'vote')}"
    )
    for tally in pool.tallies:
        console.print(
            f"    {escape(tally.decision):<16} score {tally.score:.3f} "
            f"({plural(tally.votes, 'vote')})"
        )


# --- pools -------------------------------------------------------------------------------


@pool_app.command("create")
def pool_create(
    topic: str = typer.Argument(..., help="what is decided, e.g. scale_infrastructure"),
    threshold: str = typer.Option("simple", help="simple (> 1/2), super (>= 2/3) or unanimous"),
    duration: str = typer.Option(
        "1h", help="voting window, e.g. 90, 30s, 5m, 2h or 1d (a bare number is seconds)"
    ),
    min_votes: int = typer.Option(0, min=0, help="votes needed before a result counts"),
    request_id: str = typer.Option("", help="makes a retried create return the same pool"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Open a voting pool."""
    if threshold not in THRESHOLDS:
        fail(f"--threshold {threshold!r}: expected one of {', '.join(THRESHOLDS)}")
    duration_s = parse_duration(duration, "--duration")

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            pool = await client.create_pool(
                topic,
                threshold=threshold,
                duration_s=duration_s,
                min_votes=min_votes,
                request_id=request_id,
            )
        if as_json:
            print_json(pool)
        else:
            _print_pool(pool)

    run(main())


@pool_app.command("vote")
def pool_vote(
    pool_id: str = typer.Argument(...),
    decision: str = typer.Argument(..., help="e.g. approve"),
    confidence: float = typer.Option(1.0, help="in [0, 1]"),
    weight: float = typer.Option(1.0, help=">= 0"),
    agent: str = typer.Option(..., "--agent", "-a", help="the registered agent voting"),
    key_file: str = typer.Option(None, help="the agent's key (default: its key in the state dir)"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Vote in a pool, signed as AGENT (a later vote replaces it)."""
    identity = load_identity(agent, key_file)

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            response = await client.vote(identity, pool_id, decision, confidence, weight)
        if as_json:
            print_json(response)
        else:
            what = "replaced its vote" if response.replaced else "voted"
            console.print(f"{agent} {what}: {escape(decision)} ({confidence:g} x {weight:g})")
            _print_pool(response.pool)

    run(main())


@pool_app.command("result")
def pool_result(
    pool_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """The pool's decision and confidence (PENDING, DECIDED or NO_CONSENSUS)."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            result = await client.get_consensus(pool_id)
        if as_json:
            print_json(result)
        else:
            _print_pool(result.pool)

    run(main())


@pool_app.command("list")
def pool_list(
    open_only: bool = typer.Option(False, "--open", help="only pools still taking votes"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Every pool, oldest first."""

    async def main() -> None:
        pools: list[swarm_pb2.Pool] = []
        async with SwarmClient(service_address("swarm", swarm)) as client:
            token = ""
            while True:
                page = await client.list_pools(page_token=token, open_only=open_only)
                pools.extend(page.pools)
                token = page.next_page_token
                if not token:
                    break
        if as_json:
            print_json([to_dict(p) for p in pools])
            return
        table = Table()
        for column in ("pool", "topic", "threshold", "status", "decision", "confidence", "votes"):
            table.add_column(column)
        for p in pools:
            table.add_row(
                p.pool_id,
                escape(p.topic),
                THRESHOLD_NAMES.get(p.threshold, str(p.threshold)),
                _status(p.status) + ("" if p.closed else " (open)"),
                escape(p.decision or "-"),
                f"{p.confidence:.3f}",
                str(p.vote_count),
            )
        console.print(table)

    run(main())


# --- the hive ----------------------------------------------------------------------------


def _print_hive(state: swarm_pb2.HiveState) -> None:
    console.print(f"[bold]Hive mind[/bold] at generation {state.generation}")
    console.print("  Beliefs:")
    for b in state.beliefs:
        console.print(
            f"    {escape(b.name):<32} {b.confidence:.3f}  [dim]{escape(b.source)} @{b.generation}[/dim]"
        )
    console.print("  Intentions:")
    for i in state.intentions:
        console.print(f"    - {escape(i.text)}  [dim]{escape(i.source)} @{i.generation}[/dim]")
    console.print("  Decisions:")
    for d in state.decisions:
        final = "" if d.final else " (pool still open)"
        console.print(
            f"    {escape(d.topic)} -> {escape(d.decision)} ({d.confidence:.3f}) "
            f"[dim]{d.pool_id}{final}[/dim]"
        )


@hive_app.command("show")
def hive_show(
    watch: bool = typer.Option(False, "--watch", "-w", help="then follow every change"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """The collective state: beliefs, intentions, decisions, generation."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            if not watch:
                state = await client.get_hive()
                if as_json:
                    print_json(state)
                else:
                    _print_hive(state)
                return
            await require_reachable(client, "swarm")
            async for response in client.watch_hive():
                if response.HasField("snapshot"):
                    if as_json:
                        print_json_line({"snapshot": to_dict(response.snapshot)})
                    else:
                        _print_hive(response.snapshot)
                for event in response.events:
                    if as_json:
                        print_json_line(event)
                        continue
                    kind = swarm_pb2.HiveEventKind.Name(event.kind).removeprefix("HIVE_EVENT_KIND_")
                    what = (
                        f"{event.belief.name}={event.belief.confidence:.3f}"
                        if event.HasField("belief")
                        else event.intention.text
                    )
                    console.print(f"[dim]@{event.generation}[/dim] {kind.lower()} {escape(what)}")

    run(main())


@hive_app.command("belief")
def hive_belief(
    name: str = typer.Argument(..., help="e.g. system_overloaded"),
    confidence: float = typer.Argument(..., help="in [0, 1]"),
    agent: str = typer.Option(..., "--agent", "-a", help="the registered agent proposing"),
    expect_generation: int = typer.Option(
        None, "--expect-generation", help="apply only if the hive is still at this generation"
    ),
    key_file: str = typer.Option(None, help="the agent's key (default: its key in the state dir)"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Propose a belief (signed as AGENT)."""
    identity = load_identity(agent, key_file)

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            response = await client.propose_belief(
                identity, name, confidence, expected_generation=expect_generation
            )
        if as_json:
            print_json(response)
        else:
            change = "set" if response.changed else "unchanged"
            console.print(f"belief {escape(name)} {change}; generation {response.generation}")

    run(main())


@hive_app.command("intend")
def hive_intend(
    intention: str = typer.Argument(..., help="e.g. notify_admin"),
    agent: str = typer.Option(..., "--agent", "-a", help="the registered agent proposing"),
    expect_generation: int = typer.Option(
        None, "--expect-generation", help="apply only if the hive is still at this generation"
    ),
    key_file: str = typer.Option(None, help="the agent's key (default: its key in the state dir)"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Propose an intention (signed as AGENT; duplicates are ignored)."""
    identity = load_identity(agent, key_file)

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            response = await client.propose_intention(
                identity, intention, expected_generation=expect_generation
            )
        if as_json:
            print_json(response)
        else:
            change = "added" if response.changed else "already held"
            console.print(f"intention {change}; generation {response.generation}")

    run(main())


@hive_app.command("adopt")
def hive_adopt(
    pool_id: str = typer.Argument(..., help="a DECIDED pool"),
    expect_generation: int = typer.Option(None, "--expect-generation"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Write a decided pool's result into the hive (UpdateFromVote)."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            response = await client.update_from_vote(pool_id, expected_generation=expect_generation)
        if as_json:
            print_json(response)
        else:
            d = response.decision
            change = "adopted" if response.changed else "already adopted"
            console.print(
                f"{change}: {escape(d.topic)}:{escape(d.decision)} = {d.confidence:.3f}; "
                f"generation {response.generation}"
            )

    run(main())


# --- flocks ----------------------------------------------------------------------------


def _world(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        width, height = (float(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--world {text!r}: expected WIDTHxHEIGHT, e.g. 250x250")
    return width, height


def _print_flock(flock: swarm_pb2.Flock) -> None:
    console.print(
        f"[bold]{flock.flock_id}[/bold] {plural(flock.boids, 'boid')} in {flock.world.width:g} x "
        f"{flock.world.height:g}, step {flock.steps}, seed {flock.seed}"
    )
    console.print(f"  order {bar(flock.order_parameter)} {flock.order_parameter:.3f}")


@flock_app.command("create")
def flock_create(
    boids: int = typer.Argument(..., min=1),
    seed: int = typer.Option(0, min=0),
    world: str = typer.Option(None, help="WIDTHxHEIGHT (default 1000x1000)"),
    max_neighbors: int = typer.Option(None, help="neighbours each boid perceives (default 7)"),
    request_id: str = typer.Option("", help="makes a retried create return the same flock"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Start a flock at random (seeded) positions and headings, with the guide's rules."""
    rules = {} if max_neighbors is None else {"max_neighbors": max_neighbors}

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            flock = await client.create_flock(
                boids, seed=seed, world=_world(world), rules=rules, request_id=request_id
            )
        if as_json:
            print_json(flock)
        else:
            _print_flock(flock)

    run(main())


@flock_app.command("step")
def flock_step(
    flock_id: str = typer.Argument(...),
    steps: int = typer.Option(1, "--steps", "-k", min=1),
    every: int = typer.Option(0, min=0, help="print the order parameter every N steps"),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Advance a flock; prints how its order parameter moved."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            before = (await client.get_flock(flock_id)).flock
            response = await client.step_flock(flock_id, steps)
        if as_json:
            print_json(response)
            return
        orders = list(response.order_parameters)
        stride = every or max(len(orders) // 10, 1)
        console.print(
            f"step {before.steps:>6}  {bar(before.order_parameter)} {before.order_parameter:.3f}"
        )
        for i in range(stride - 1, len(orders), stride):
            console.print(f"step {before.steps + i + 1:>6}  {bar(orders[i])} {orders[i]:.3f}")
        _print_flock(response.flock)

    run(main())


@flock_app.command("show")
def flock_show(
    flock_id: str = typer.Argument(...),
    columns: int = typer.Option(60, min=10, max=300),
    lines: int = typer.Option(20, min=5, max=150),
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Draw the flock: every boid as an arrow along its heading."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            response = await client.get_flock(flock_id, include_boids=True)
        if as_json:
            print_json(response)
            return
        f, b = response.flock, response.boids
        console.print(
            flock_picture(
                b.x, b.y, b.vx, b.vy, f.world.width, f.world.height, columns=columns, rows=lines
            )
        )
        _print_flock(f)

    run(main())


@flock_app.command("list")
def flock_list(
    as_json: bool = typer.Option(False, "--json"),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Every flock."""

    async def main() -> None:
        flocks: list[swarm_pb2.Flock] = []
        async with SwarmClient(service_address("swarm", swarm)) as client:
            token = ""
            while True:
                page = await client.list_flocks(page_token=token)
                flocks.extend(page.flocks)
                token = page.next_page_token
                if not token:
                    break
        if as_json:
            print_json([to_dict(f) for f in flocks])
        else:
            for flock in flocks:
                _print_flock(flock)

    run(main())


@flock_app.command("delete")
def flock_delete(
    flock_id: str = typer.Argument(...),
    swarm: str = typer.Option(None, help="swarm address"),
) -> None:
    """Delete a flock."""

    async def main() -> None:
        async with SwarmClient(service_address("swarm", swarm)) as client:
            await client.delete_flock(flock_id)
        console.print(f"deleted {flock_id}")

    run(main())
