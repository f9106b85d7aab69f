"""agent2028 propose, and agent2028 proposals list|show|watch|check|evidence."""

from __future__ import annotations

import asyncio
import time
import uuid

import typer
from rich.markup import escape
from rich.table import Table

from agent2028.consensus.v1 import consensus_pb2
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
from clients.consensus import (
    CHOICE_NAMES,
    STATUS_NAMES,
    STATUSES,
    STRATEGIES,
    STRATEGY_NAMES,
    ConsensusClient,
    certificate_problems,
    strategy_value,
    vote_verifies,
)

proposals_app = typer.Typer(help="Consensus proposals: list, show, watch.", no_args_is_help=True)

STATUS_STYLES = {"open": "yellow", "approved": "green", "rejected": "red", "expired": "dim"}
EVENT_NAMES = {1: "proposed", 2: "vote", 3: "equivocation", 4: "decided"}
# Exit status of `propose --wait` when the proposal was not approved.
NOT_APPROVED = 3


def status_text(status: int) -> str:
    name = STATUS_NAMES.get(status, str(status))
    style = STATUS_STYLES.get(name)
    return f"[{style}]{name}[/{style}]" if style else name


def _when(ts) -> str:  # type: ignore[no-untyped-def]
    if not ts.seconds and not ts.nanos:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ts.seconds)) + f".{ts.nanos // 1_000_000:03d}"


def _tally(p: consensus_pb2.Proposal) -> str:
    t = p.tally
    extra = f", {t.excluded} excluded" if t.excluded else ""
    return (
        f"{t.approvals} approve / {t.rejections} reject of {t.electorate_size} "
        f"(quorum {t.quorum}{extra})"
    )


def print_decision(p: consensus_pb2.Proposal) -> None:
    """The decision, the signed votes that made it, and whether they verify."""
    console.print(
        f"[bold]{escape(p.operation)}[/bold] ({p.proposal_id}): {status_text(p.status)}, "
        f"{STRATEGY_NAMES.get(p.strategy, p.strategy)}: {_tally(p)}"
    )
    if p.status not in (
        consensus_pb2.PROPOSAL_STATUS_APPROVED,
        consensus_pb2.PROPOSAL_STATUS_REJECTED,
    ):
        return
    keys = {v.voter_id: v.public_key for v in p.electorate}
    table = Table(title="quorum certificate", title_justify="left")
    for column in ("voter", "choice", "received", "signature", ""):
        table.add_column(column)
    for vote in p.certificate.votes:
        ok = vote.voter_id in keys and vote_verifies(vote, keys[vote.voter_id])
        table.add_row(
            vote.voter_id,
            CHOICE_NAMES.get(vote.choice, "?"),
            _when(vote.receive_time),
            vote.signature.hex()[:16] + "...",
            "[green]verifies[/green]" if ok else "[red]DOES NOT VERIFY[/red]",
        )
    console.print(table)
    for evidence_id in p.certificate.evidence_ids:
        console.print(f"  excluded by evidence {evidence_id}")
    problems = certificate_problems(p)
    if problems:
        console.print("[red]certificate problems:[/red] " + escape("; ".join(problems)))
    else:
        console.print(
            f"[green]certificate verifies[/green]: "
            f"{plural(len(p.certificate.votes), 'signed vote')} "
            "checked against the keys the electorate was snapshotted with"
        )


def propose(
    operation: str = typer.Argument(..., help="what to decide, e.g. deploy_production_v2.0"),
    strategy: str = typer.Option(
        "byzantine", "--strategy", "-s", help="byzantine, simple-majority or unanimous"
    ),
    capability: str = typer.Option(
        "",
        "--electorate-capability",
        "-c",
        help="the electorate: every passing agent holding this capability",
    ),
    voters: list[str] = typer.Option(
        [], "--voters", "-v", help="the electorate: agent ids (comma list, repeatable)"
    ),
    deadline: str = typer.Option("30s", "--deadline", "-d", help="voting period, e.g. 10s"),
    proposer: str = typer.Option("cli", "--proposer", help="the proposer's id"),
    proposal_id: str = typer.Option("", "--id", help="choose the proposal id"),
    wait: bool = typer.Option(False, "--wait", "-w", help="wait for the decision"),
    as_json: bool = typer.Option(False, "--json"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """Propose an operation to an electorate of agents.

    With --wait, print the decision and its quorum certificate; exit 0 when
    approved, 3 when rejected or expired."""
    try:
        strategy_value(strategy)
    except ValueError as exc:
        fail(str(exc))
    voter_ids = [v.strip() for item in voters for v in item.split(",") if v.strip()]
    if bool(capability) == bool(voter_ids):
        fail("give the electorate as --electorate-capability C or as --voters ids (one of them)")
    period = parse_duration(deadline, "--deadline")
    pid = proposal_id or str(uuid.uuid4())

    async def main() -> int:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            watch = None
            if wait:
                await require_reachable(client, "consensus")
                # Subscribed before proposing, so even an instant decision is seen.
                watch = client.watch(
                    proposal_id=pid, types=[consensus_pb2.EVENT_TYPE_DECIDED], resume=True
                )
                await anext(watch)
            response = await client.propose(
                operation,
                proposer_id=proposer,
                strategy=strategy,
                voter_ids=voter_ids,
                capability=capability,
                voting_period_s=period,
                proposal_id=pid,
                request_id=f"cli-{pid}",
            )
            p = response.proposal
            if watch is None:
                if as_json:
                    print_json(p)
                else:
                    console.print(
                        f"proposed {p.proposal_id}: {escape(p.operation)} to "
                        f"{plural(p.tally.electorate_size, 'voter')} "
                        f"({STRATEGY_NAMES[p.strategy]}, "
                        f"quorum {p.tally.quorum}), voting closes in {period:g}s"
                    )
                return 0
            if not as_json:
                console.print(
                    f"proposed {p.proposal_id} to {plural(p.tally.electorate_size, 'voter')} "
                    f"(quorum {p.tally.quorum}); waiting for the decision..."
                )
            try:
                async with asyncio.timeout(period + 10):
                    async for update in watch:
                        if update.events:
                            break
            except TimeoutError:
                fail(f"no decision on {pid} within {period + 10:g}s")
            finally:
                await watch.aclose()
            decided = await client.get_proposal(pid)
            if as_json:
                print_json(decided)
            else:
                print_decision(decided)
            return 0 if decided.status == consensus_pb2.PROPOSAL_STATUS_APPROVED else NOT_APPROVED

    code = run(main())
    if code:
        raise SystemExit(code)


@proposals_app.command("list")
def list_proposals(
    status: list[str] = typer.Option(
        [], "--status", help="open, approved, rejected or expired (repeatable)"
    ),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=100_000),
    as_json: bool = typer.Option(False, "--json"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """Proposals, newest first."""
    for s in status:
        if s not in STATUSES:
            fail(f"--status {s!r}: expected one of {', '.join(STATUSES)}")

    async def main() -> None:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            found = []
            async for p in client.iter_proposals(statuses=status, page_size=min(limit, 500)):
                found.append(p)
                if len(found) >= limit:
                    break
        if as_json:
            print_json([to_dict(p) for p in found])
            return
        table = Table()
        for column in ("proposal", "operation", "strategy", "status", "tally", "created"):
            table.add_column(column)
        for p in found:
            table.add_row(
                p.proposal_id,
                escape(p.operation),
                STRATEGY_NAMES.get(p.strategy, str(p.strategy)),
                status_text(p.status),
                _tally(p),
                _when(p.create_time),
            )
        console.print(table)
        console.print(plural(len(found), "proposal"))

    run(main())


@proposals_app.command()
def show(
    proposal_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """One proposal: its tally, every vote, and its certificate checked."""

    async def main() -> None:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            p = await client.get_proposal(proposal_id)
        if as_json:
            print_json(p)
            return
        print_decision(p)
        console.print(
            f"proposed by {escape(p.proposer_id)} at {_when(p.create_time)}, voting "
            f"{'open until' if p.accepting_votes else 'closed at'} {_when(p.deadline_time)}; "
            f"electorate: "
            + (
                f"passing holders of {p.electorate_capability}"
                if p.electorate_capability
                else "ids"
            )
        )
        table = Table(title="votes", title_justify="left")
        for column in ("voter", "choice", "received", "counted"):
            table.add_column(column)
        excluded = set(p.excluded_voter_ids)
        for vote in p.votes:
            table.add_row(
                vote.voter_id,
                CHOICE_NAMES.get(vote.choice, "?"),
                _when(vote.receive_time),
                "[red]no (equivocated)[/red]" if vote.voter_id in excluded else "yes",
            )
        console.print(table)
        silent = sorted({v.voter_id for v in p.electorate} - {v.voter_id for v in p.votes})
        if silent:
            console.print(f"not voted: {', '.join(silent)}")

    run(main())


@proposals_app.command()
def watch(
    from_index: int = typer.Option(0, "--from-index", min=0, help="0: from now on"),
    proposal_id: str = typer.Option("", "--proposal", "-p", help="only this proposal"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """Follow proposals, votes and decisions until Ctrl-C (resumes by itself)."""

    async def main() -> None:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            await require_reachable(client, "consensus")
            async for response in client.watch(from_index=from_index, proposal_id=proposal_id):
                for e in response.events:
                    if as_json:
                        print_json_line(e)
                        continue
                    p = e.proposal
                    what = EVENT_NAMES.get(e.type, str(e.type))
                    if e.type == consensus_pb2.EVENT_TYPE_VOTE_RECORDED:
                        detail = (
                            f"{e.vote.voter_id} {CHOICE_NAMES.get(e.vote.choice, '?')} "
                            f"({_tally(p)})"
                        )
                    elif e.type == consensus_pb2.EVENT_TYPE_EQUIVOCATION:
                        detail = f"{e.evidence.voter_id} signed both choices: excluded"
                    elif e.type == consensus_pb2.EVENT_TYPE_DECIDED:
                        detail = f"{status_text(p.status)} ({_tally(p)})"
                    else:
                        detail = (
                            f"{escape(p.operation)} by {escape(p.proposer_id)} to "
                            f"{plural(p.tally.electorate_size, 'voter')}"
                        )
                    console.print(
                        f"[dim]#{e.index}[/dim] [bold]{what}[/bold] {p.proposal_id[:8]} {detail}"
                    )

    run(main())


@proposals_app.command()
def check(
    proposal_id: str = typer.Argument(...),
    total: int = typer.Option(0, "--total", "-n", min=0, help="n; 0: the electorate size"),
    strategy: str = typer.Option(
        None,
        "--strategy",
        "-s",
        help=f"{', '.join(STRATEGIES)} (default: the proposal's own strategy)",
    ),
    as_json: bool = typer.Option(False, "--json"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """The guide's has_consensus(proposal, n): do the valid approvals meet the quorum?"""
    if strategy is not None:
        try:
            strategy_value(strategy)
        except ValueError as exc:
            fail(str(exc))

    async def main() -> None:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            p = await client.get_proposal(proposal_id)
            # n cannot be fewer than the voters already heard from.
            voted = max(len({v.voter_id for v in p.votes}), p.tally.approvals + p.tally.rejections)
            if total and total < voted:
                fail(
                    f"--total {total} is smaller than the {plural(voted, 'vote')} already "
                    f"recorded on {proposal_id} ({plural(p.tally.approvals, 'approval')})"
                )
            name = strategy or STRATEGY_NAMES.get(p.strategy, "byzantine")
            result = await client.has_consensus(proposal_id, total, name)
        if as_json:
            print_json(result)
        else:
            console.print(
                f"{'[green]consensus[/green]' if result.reached else '[red]no consensus[/red]'}: "
                f"{plural(result.approvals, 'approval')}, {result.quorum} needed of "
                f"{result.total_agents} ({STRATEGY_NAMES.get(result.strategy, name)})"
            )

    run(main())


@proposals_app.command()
def evidence(
    voter: str = typer.Option("", "--voter", help="only evidence against this agent"),
    proposal_id: str = typer.Option("", "--proposal", "-p"),
    as_json: bool = typer.Option(False, "--json"),
    consensus: str = typer.Option(None, help="consensus address"),
) -> None:
    """Equivocation evidence: both signed votes of each voter caught."""

    async def main() -> None:
        async with ConsensusClient(service_address("consensus", consensus)) as client:
            found = (await client.list_evidence(voter_id=voter, proposal_id=proposal_id)).evidence
        if as_json:
            print_json([to_dict(e) for e in found])
            return
        for e in found:
            console.print(
                f"{e.evidence_id}: {e.voter_id} on {e.proposal_id} signed "
                f"{CHOICE_NAMES.get(e.first_vote.choice)} then "
                f"{CHOICE_NAMES.get(e.conflicting_vote.choice)}; "
                f"{'reported to trust' if e.reported_to_trust else 'report to trust pending'}"
            )
        console.print(plural(len(found), "piece of evidence", "pieces of evidence"))

    run(main())
