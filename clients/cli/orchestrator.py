"""agent2028 submit ... | events tail|publish|types | operations show|list | topology:
the cluster through its front door, the orchestrator."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from clients.cli.broker import STRATEGY_HELP, _strategy, print_receipt
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
from clients.cli.signer import load_identity
from clients.consensus import CHOICE_NAMES, certificate_problems
from clients.consensus import STRATEGIES as CONSENSUS_STRATEGIES
from clients.orchestrator import (
    KIND_NAMES,
    SERVING_NAMES,
    STATUS_NAMES,
    TIER_NAMES,
    OrchestratorClient,
)
from clients.stigmergy import deposit_request
from clients.swarm import THRESHOLDS

submit_app = typer.Typer(
    help="Run an operation through the orchestrator (exits 1 unless it succeeded).",
    no_args_is_help=True,
)
events_app = typer.Typer(help="The orchestrator's event bus.", no_args_is_help=True)
operations_app = typer.Typer(help="Operations the orchestrator ran.", no_args_is_help=True)

ORCHESTRATOR = typer.Option(None, "--orchestrator", help="orchestrator address")
STATUS_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "rejected": "yellow",
    "expired": "yellow",
    "no_consensus": "yellow",
    "running": "cyan",
}
SERVING_STYLES = {"SERVING": "green", "NOT_SERVING": "yellow", "UNREACHABLE": "red"}


def _address(override: str | None) -> str:
    return service_address("orchestrator", override)


def _status_text(status: int) -> str:
    name = STATUS_NAMES.get(status, str(status))
    style = STATUS_STYLES.get(name)
    return f"[{style}]{name}[/{style}]" if style else name


def _broker_key(receipt: Any) -> bytes:
    # The key the receipt names: its signature is checked for consistency
    # (``agent2028 receipts get`` checks it against the broker's own key).
    return bytes(receipt.broker_signature.public_key)


def print_operation(op: pb.Operation, duplicate: bool = False) -> None:
    table = Table(show_header=False, title="Operation", title_justify="left")
    table.add_column("field", style="dim")
    table.add_column("value")
    table.add_row(
        "request", op.request_id + (" (duplicate: the first outcome)" if duplicate else "")
    )
    table.add_row(
        "kind", f"{KIND_NAMES.get(op.kind, op.kind)} ({TIER_NAMES.get(op.tier, '?')} tier)"
    )
    table.add_row("route", " → ".join(op.services))
    table.add_row("status", _status_text(op.status))
    table.add_row("outcome", escape(op.message))
    if op.HasField("finish_time"):
        took = (op.finish_time.ToNanoseconds() - op.submit_time.ToNanoseconds()) / 1e9
        table.add_row("took", f"{took:.2f} s")
    which = op.WhichOneof("result")
    if which == "execute_with_consensus":
        result = op.execute_with_consensus
        p = result.proposal
        problems = certificate_problems(p) if p.certificate.votes else ["no certificate"]
        table.add_row(
            "proposal",
            f"{p.proposal_id} {p.operation}: {p.tally.approvals} approve, {p.tally.rejections} "
            f"reject of {p.tally.electorate_size}, quorum {p.tally.quorum}",
        )
        table.add_row(
            "certificate",
            ", ".join(
                f"{v.voter_id} {CHOICE_NAMES.get(v.choice, '?')}" for v in p.certificate.votes
            )
            + (
                "  [green]✓ verifies[/green]"
                if not problems
                else f"  [red]{escape('; '.join(problems))}[/red]"
            ),
        )
        if result.HasField("coordinator_trust"):
            t = result.coordinator_trust
            table.add_row(
                "trust",
                f"{t.observer_id} → {t.subject_id}: {t.score:.3f} "
                f"(confidence {t.confidence:.2f}, {plural(t.observations, 'observation')})",
            )
        if result.observation_error:
            table.add_row("observation", f"[yellow]{escape(result.observation_error)}[/yellow]")
    elif which == "collective_decision":
        result = op.collective_decision
        table.add_row(
            "tally",
            ", ".join(
                f"{escape(t.decision)} {t.score:.2f} ({plural(t.votes, 'vote')})"
                for t in result.pool.tallies
            )
            or "no votes",
        )
        if result.HasField("adopted"):
            d = result.adopted
            table.add_row(
                "hive",
                f"belief {d.topic}:{d.decision} = {d.confidence:.3f} "
                f"(generation {result.hive_generation})",
            )
    elif which == "allocate":
        t = op.allocate.task
        table.add_row(
            "task",
            f"{t.task_id}: "
            + "; ".join(
                f"attempt {a.attempt} {a.agent_id} (score {a.bid.score:.4f})" for a in t.assignments
            ),
        )
    elif which == "signal":
        table.add_row("intensity", f"{op.signal.deposit.intensity:.4g}")
    console.print(table)
    if which == "execute":
        print_receipt(op.execute.receipt, op.execute.output, _broker_key(op.execute.receipt))
    elif which == "execute_with_consensus" and op.execute_with_consensus.HasField("receipt"):
        print_receipt(
            op.execute_with_consensus.receipt,
            op.execute_with_consensus.output,
            _broker_key(op.execute_with_consensus.receipt),
        )
    elif which == "allocate" and op.allocate.HasField("receipt"):
        print_receipt(op.allocate.receipt, op.allocate.output, _broker_key(op.allocate.receipt))


def _finish(response: pb.SubmitResponse, as_json: bool) -> None:
    if as_json:
        out = to_dict(response)
        out["operation"]["status"] = STATUS_NAMES.get(response.operation.status, "?")
        print_json(out)
    else:
        print_operation(response.operation, response.duplicate)
    if response.operation.status != pb.OPERATION_STATUS_SUCCEEDED:
        raise SystemExit(1)


def _submit(request: pb.SubmitRequest, timeout: str | None, orchestrator: str | None) -> Any:
    if timeout:
        request.timeout.FromNanoseconds(int(parse_duration(timeout, "--timeout") * 1e9))

    async def main() -> pb.SubmitResponse:
        async with OrchestratorClient(_address(orchestrator)) as client:
            return await client.submit(request)

    return run(main())


TIMEOUT = typer.Option(None, "--timeout", help="the whole operation, e.g. 30s (default 30s)")
REQUEST_ID = typer.Option("", "--request-id", help="makes a retry return the first outcome")
JSON = typer.Option(False, "--json")


@submit_app.command("execute")
def submit_execute(
    capability: str = typer.Argument(..., help="e.g. database.query"),
    args: list[str] = typer.Argument(None, help="the command's arguments"),
    strategy: str = typer.Option("best_fit", "--strategy", "-s", help=STRATEGY_HELP),
    session: str = typer.Option("", "--session"),
    agent: str = typer.Option("", "--agent", help="run on this agent only"),
    timeout: str = TIMEOUT,
    request_id: str = REQUEST_ID,
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """A command through the broker (individual tier)."""
    from clients.broker import strategy_value

    op = pb.ExecuteOperation(
        capability=capability,
        args=args or [],
        strategy=strategy_value(_strategy(strategy)),
        session_id=session,
        agent_id=agent,
    )
    _finish(
        _submit(pb.SubmitRequest(request_id=request_id, execute=op), timeout, orchestrator), as_json
    )


@submit_app.command("execute-with-consensus")
def submit_with_consensus(
    capability: str = typer.Argument(..., help="what runs once approved"),
    args: list[str] = typer.Argument(None, help="the command's arguments"),
    operation: str = typer.Option("", "--operation", help="what is voted on (default: CAPABILITY)"),
    coordinator: str = typer.Option("", "--coordinator", help="proposer and trust observer"),
    consensus: str = typer.Option(
        "byzantine", "--consensus", help="simple-majority, byzantine or unanimous"
    ),
    voters: str = typer.Option("", "--voters", help="comma list of voter ids"),
    electorate: str = typer.Option(
        "", "--electorate-capability", help="vote among the holders of this (default CAPABILITY)"
    ),
    voting_period: str = typer.Option("", "--voting-period", help="e.g. 5s"),
    strategy: str = typer.Option("best_fit", "--strategy", "-s", help=STRATEGY_HELP),
    session: str = typer.Option("", "--session"),
    timeout: str = TIMEOUT,
    request_id: str = REQUEST_ID,
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """The guide's 8.1 in one call: consensus, then the broker, then trust."""
    from clients.broker import strategy_value

    key = consensus.strip().lower().replace("_", "-")
    if key not in CONSENSUS_STRATEGIES:
        fail(f"--consensus {consensus!r}: expected one of {', '.join(CONSENSUS_STRATEGIES)}")
    op = pb.ExecuteWithConsensusOperation(
        capability=capability,
        args=args or [],
        strategy=strategy_value(_strategy(strategy)),
        session_id=session,
        operation=operation,
        coordinator_id=coordinator,
        consensus_strategy=CONSENSUS_STRATEGIES[key],
        voter_ids=[v.strip() for v in voters.split(",") if v.strip()],
        electorate_capability=electorate,
    )
    if voting_period:
        op.voting_period.FromNanoseconds(
            int(parse_duration(voting_period, "--voting-period") * 1e9)
        )
    request = pb.SubmitRequest(request_id=request_id, execute_with_consensus=op)
    _finish(_submit(request, timeout, orchestrator), as_json)


@submit_app.command("collective-decision")
def submit_collective(
    topic: str = typer.Argument(..., help="e.g. scale_infrastructure"),
    duration: str = typer.Option(..., "--duration", help="how long the pool takes votes, e.g. 3s"),
    threshold: str = typer.Option("simple", "--threshold", help="simple, super or unanimous"),
    min_votes: int = typer.Option(0, "--min-votes", min=0),
    adopt: bool = typer.Option(False, "--adopt", help="write the decision into the hive mind"),
    settle_early: bool = typer.Option(False, "--settle-early", help="answer once DECIDED"),
    timeout: str = TIMEOUT,
    request_id: str = REQUEST_ID,
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """A swarm voting pool: the agents vote, the result comes back (swarm tier)."""
    if threshold not in THRESHOLDS:
        fail(f"--threshold {threshold!r}: expected one of {', '.join(THRESHOLDS)}")
    op = pb.CollectiveDecisionOperation(
        topic=topic,
        threshold=THRESHOLDS[threshold],
        min_votes=min_votes,
        adopt=adopt,
        settle_early=settle_early,
    )
    op.duration.FromNanoseconds(int(parse_duration(duration, "--duration") * 1e9))
    request = pb.SubmitRequest(request_id=request_id, collective_decision=op)
    _finish(_submit(request, timeout, orchestrator), as_json)


@submit_app.command("allocate")
def submit_allocate(
    capability: str = typer.Argument(..., help="the capability that runs the task"),
    args: list[str] = typer.Argument(None, help="the task's arguments"),
    requirement: list[str] = typer.Option(
        [], "--requirement", "-r", help="another capability bidders must hold (repeatable)"
    ),
    task_id: str = typer.Option("", "--task-id"),
    window: str = typer.Option("1s", "--window", help="bidding window"),
    max_attempts: int = typer.Option(1, "--max-attempts", min=1, max=100),
    priority: int = typer.Option(0, min=0, max=100),
    reward: float = typer.Option(0.0, min=0.0),
    trust: bool = typer.Option(False, "--trust", help="trust-adjusted auction"),
    timeout: str = TIMEOUT,
    request_id: str = REQUEST_ID,
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """A task auctioned on the market, run on the winner through the broker (swarm tier)."""
    op = pb.AllocateOperation(
        task_id=task_id,
        requirements=[capability, *[r for r in requirement if r != capability]],
        capability=capability,
        args=args or [],
        priority=priority,
        reward=reward,
        max_attempts=max_attempts,
        scoring=2 if trust else 1,
    )
    op.bidding_window.FromNanoseconds(int(parse_duration(window, "--window") * 1e9))
    _finish(
        _submit(pb.SubmitRequest(request_id=request_id, allocate=op), timeout, orchestrator),
        as_json,
    )


@submit_app.command("signal")
def submit_signal(
    x: float = typer.Argument(...),
    y: float = typer.Argument(...),
    pheromone_type: str = typer.Option(..., "--type", "-t", help="pheromone type, e.g. food"),
    amount: float = typer.Option(0.0, help="intensity to add (0: the service's default)"),
    agent: str = typer.Option(..., "--agent", "-a", help="the registered agent depositing"),
    key_file: str = typer.Option(None, help="the agent's key (default: its key in the state dir)"),
    timeout: str = TIMEOUT,
    request_id: str = REQUEST_ID,
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """A pheromone deposit signed as AGENT, through the orchestrator (swarm tier)."""
    identity = load_identity(agent, key_file)
    deposit = deposit_request(identity, x, y, pheromone_type, amount)
    request = pb.SubmitRequest(request_id=request_id, signal=pb.SignalOperation(deposit=deposit))
    _finish(_submit(request, timeout, orchestrator), as_json)


# --- operations ----------------------------------------------------------------------


@operations_app.command("show")
def show_operation(
    request_id: str = typer.Argument(...), as_json: bool = JSON, orchestrator: str = ORCHESTRATOR
) -> None:
    """One operation by request id (RUNNING while it runs)."""

    async def main() -> None:
        async with OrchestratorClient(_address(orchestrator)) as client:
            op = await client.get_operation(request_id)
        if as_json:
            print_json(op)
        else:
            print_operation(op)

    run(main())


@operations_app.command("list")
def list_operations(
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=10_000),
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """Finished operations, newest first."""

    async def main() -> None:
        ops: list[pb.Operation] = []
        async with OrchestratorClient(_address(orchestrator)) as client:
            token = ""
            while len(ops) < limit:
                page = await client.list_operations(page_size=min(limit, 1000), page_token=token)
                ops.extend(page.operations)
                token = page.next_page_token
                if not token:
                    break
        ops = ops[:limit]
        if as_json:
            print_json([to_dict(op) for op in ops])
            return
        table = Table(title="Operations", title_justify="left")
        for column in ("request", "kind", "status", "outcome"):
            table.add_column(column)
        for op in ops:
            table.add_row(
                op.request_id,
                KIND_NAMES.get(op.kind, str(op.kind)),
                _status_text(op.status),
                escape(op.message[:100]),
            )
        console.print(table)

    run(main())


# --- topology --------------------------------------------------------------------------


def topology(as_json: bool = JSON, orchestrator: str = ORCHESTRATOR) -> None:
    """Every service, its address, tier and health; what each operation needs."""
    address = _address(orchestrator)

    async def main() -> None:
        async with OrchestratorClient(address) as client:
            topo = await client.topology()
        for node in topo.services:
            if node.name == "orchestrator" and not node.address:
                node.address = address
        if as_json:
            out = to_dict(topo)
            for node in out["services"]:
                node["status"] = node["status"].removeprefix("SERVING_STATUS_")
            print_json(out)
            return
        table = Table(title="Services", title_justify="left")
        for column in ("service", "tier", "address", "health", "since"):
            table.add_column(column)
        for node in topo.services:
            status = SERVING_NAMES.get(node.status, "?")
            style = SERVING_STYLES.get(status)
            since = time.strftime("%H:%M:%S", time.localtime(node.change_time.seconds))
            table.add_row(
                node.name,
                TIER_NAMES.get(node.tier, "front door"),
                node.address,
                f"[{style}]{status}[/{style}]" if style else status,
                since if node.change_time.seconds else "",
            )
        console.print(table)
        routes = Table(title="Operations", title_justify="left")
        for column in ("operation", "tier", "through", "available"):
            routes.add_column(column)
        for r in topo.routes:
            routes.add_row(
                KIND_NAMES.get(r.kind, str(r.kind)),
                TIER_NAMES.get(r.tier, "?"),
                " → ".join(r.services),
                "[green]yes[/green]" if r.available else "[red]no[/red]",
            )
        console.print(routes)
        console.print(
            f"agents: {topo.agents_passing} passing, {topo.agents_warning} warning, "
            f"{topo.agents_critical} critical; events: cursor {topo.event_cursor} "
            f"(retained from {topo.oldest_event_cursor})"
        )

    run(main())


# --- events ------------------------------------------------------------------------------


def _types(values: list[str]) -> list[str]:
    return [t.strip() for value in values for t in value.split(",") if t.strip()]


def event_line(e: pb.Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e.event_time.seconds))
    return f"[dim]{e.cursor:>6} {stamp}[/dim] [bold]{e.type:<24}[/bold] {escape(e.summary)}"


@events_app.command("tail")
def tail(
    types: list[str] = typer.Option(
        [], "--types", "-t", help="types, namespaces (market.*) or *; comma list or repeated"
    ),
    from_cursor: int = typer.Option(0, "--from-cursor", min=0, help="resume after this cursor"),
    from_oldest: bool = typer.Option(False, "--from-oldest", help="every retained event first"),
    count: int = typer.Option(0, "--count", "-n", min=0, help="stop after this many events"),
    until_caught_up: bool = typer.Option(
        False, "--until-caught-up", help="stop once the retained backlog is shown"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """Follow the bus (Ctrl-C stops): the services' events, as they happen."""
    wanted = _types(types)

    async def main() -> None:
        seen = 0
        async with OrchestratorClient(_address(orchestrator)) as client:
            await require_reachable(client, "orchestrator")
            async for response in client.events(
                wanted, from_cursor=from_cursor, from_oldest=from_oldest
            ):
                if response.HasField("lag") and not as_json:
                    console.print(
                        f"[yellow]fell behind at cursor {response.lag.resume_cursor}; "
                        f"caught up from history ({response.lag.missed} no longer retained)[/yellow]"
                    )
                for e in response.events:
                    if as_json:
                        print_json_line(e)
                    else:
                        console.print(event_line(e))
                    seen += 1
                    if count and seen >= count:
                        return
                if until_caught_up and response.caught_up:
                    return

    run(main())


@events_app.command("publish")
def publish(
    event_type: str = typer.Argument(..., help="e.g. app.deployed (not a system namespace)"),
    attr: list[str] = typer.Option([], "--attr", "-a", help="key=value (repeatable)"),
    summary: str = typer.Option("", "--summary", "-m"),
    subject: str = typer.Option("", "--subject"),
    source: str = typer.Option("cli", "--source"),
    request_id: str = typer.Option("", "--request-id"),
    as_json: bool = JSON,
    orchestrator: str = ORCHESTRATOR,
) -> None:
    """Publish an application event on the bus."""
    attributes = {}
    for item in attr:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--attr {item!r}: expected key=value")
        attributes[key] = value

    async def main() -> None:
        async with OrchestratorClient(_address(orchestrator)) as client:
            response = await client.publish(
                event_type,
                attributes=attributes,
                summary=summary,
                subject=subject,
                source=source,
                request_id=request_id,
            )
        if as_json:
            print_json(response)
        else:
            console.print(
                f"cursor {response.event.cursor}" + (" (duplicate)" if response.duplicate else "")
            )

    run(main())


@events_app.command("types")
def event_types(as_json: bool = JSON, orchestrator: str = ORCHESTRATOR) -> None:
    """The system event types and what each means."""

    async def main() -> None:
        async with OrchestratorClient(_address(orchestrator)) as client:
            response = await client.event_types()
        if as_json:
            print_json(response)
            return
        table = Table(title="Event types", title_justify="left")
        for column in ("type", "from", "meaning"):
            table.add_column(column)
        for t in response.types:
            table.add_row(t.type, t.source, t.description)
        console.print(table)
        console.print("reserved namespaces: " + ", ".join(response.reserved_namespaces))

    run(main())
