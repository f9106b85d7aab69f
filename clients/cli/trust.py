"""agent2028 trust observe|score|conservative|transitive|top|decay|observations."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from clients.cli.common import console, fail, plural, print_json, run, service_address, to_dict
from clients.trust import OUTCOMES, TrustClient, outcome

app = typer.Typer(help="Bayesian trust between agents.", no_args_is_help=True)

DAY_S = 86_400.0


def _outcome_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in OUTCOMES:
        fail(f"outcome {name!r}: expected one of {', '.join(OUTCOMES)}")
    return key


@app.command()
def observe(
    observer: str = typer.Argument(..., help="who observed"),
    subject: str = typer.Argument(..., help="who was observed"),
    kind: str = typer.Argument(..., help="success, timeout, partial_failure or complete_failure"),
    error_rate: float = typer.Option(0.0, "--error-rate", help="for partial_failure, in [0, 1]"),
    duration_ms: float = typer.Option(0.0, "--duration-ms"),
    capability: str = typer.Option("", "--capability", "-c"),
    days_ago: float = typer.Option(None, "--days-ago", help="backdate the observation"),
    request_id: str = typer.Option("", "--request-id", help="makes a retry count once"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """Record one outcome OBSERVER saw from SUBJECT."""
    name = _outcome_name(kind)

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            response = await client.observe(
                observer,
                subject,
                outcome(name, error_rate=error_rate, duration_ms=duration_ms),
                capability=capability,
                observed_at=time.time() - days_ago * DAY_S if days_ago is not None else None,
                request_id=request_id,
            )
        if as_json:
            print_json(response)
        else:
            s = response.score
            dup = " (duplicate request: nothing changed)" if response.duplicate else ""
            console.print(
                f"{observer} → {subject}: score {s.score:.3f}, confidence {s.confidence:.3f} "
                f"after {plural(s.observations, 'observation')}{dup}"
            )

    run(main())


@app.command()
def score(
    observer: str = typer.Argument(...),
    subject: str = typer.Argument(...),
    capability: str = typer.Option("", "--capability", "-c"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """OBSERVER's trust in SUBJECT (0.5 with confidence 0 when unknown)."""

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            s = await client.score(observer, subject, capability=capability)
        if as_json:
            print_json(s)
        else:
            console.print(
                f"{observer} → {subject}: score {s.score:.3f}, confidence {s.confidence:.3f} "
                f"(evidence +{s.positive_evidence:.2f} / -{s.negative_evidence:.2f}, "
                f"{plural(s.observations, 'observation')})"
            )

    run(main())


@app.command()
def conservative(
    subject: str = typer.Argument(...),
    capability: str = typer.Option("", "--capability", "-c"),
    level: float = typer.Option(0.0, "--level", help="credible level; 0 means 0.95"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """The lower end of SUBJECT's credible interval, observers weighted by standing."""

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            c = await client.conservative_score(
                subject, capability=capability, credible_level=level
            )
        if as_json:
            print_json(c)
        else:
            console.print(
                f"{subject}: conservative {c.lower_bound:.3f} (mean {c.mean:.3f}, confidence "
                f"{c.confidence:.3f}, {plural(c.observers, 'observer')}; evidence vouched "
                f"{c.vouched_evidence:.2f}, unvouched {c.unvouched_evidence:.2f})"
            )

    run(main())


@app.command()
def transitive(
    from_id: str = typer.Argument(..., metavar="FROM"),
    to_id: str = typer.Argument(..., metavar="TO"),
    max_depth: int = typer.Option(5, "--max-depth"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """The best trust path from FROM to TO (product of edge scores)."""

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            result = await client.transitive_trust(from_id, to_id, max_depth=max_depth)
        if as_json:
            print_json(result)
        elif result.path:
            console.print(f"{result.trust:.3f} via {' → '.join(result.path)}")
        else:
            console.print(f"0 (no path within {max_depth} hops)")

    run(main())


@app.command()
def top(
    capability: str = typer.Option("", "--capability", "-c"),
    k: int = typer.Option(10, "-k", "--top"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """The most trusted subjects by conservative score."""

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            result = await client.top_trusted(capability=capability, k=k)
        if as_json:
            print_json([to_dict(s) for s in result.subjects])
            return
        table = Table(title=f"Most trusted{' for ' + capability if capability else ''}")
        for column in ("subject", "conservative", "mean", "observers"):
            table.add_column(column)
        for s in result.subjects:
            table.add_row(s.subject_id, f"{s.lower_bound:.3f}", f"{s.mean:.3f}", str(s.observers))
        console.print(table)

    run(main())


@app.command()
def decay(
    max_age_days: float = typer.Argument(..., help="discount evidence older than this"),
    request_id: str = typer.Option("", "--request-id"),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """Discount evidence older than MAX_AGE_DAYS toward the prior."""

    async def main() -> None:
        async with TrustClient(service_address("trust", trust)) as client:
            result = await client.decay_old_scores(max_age_days, request_id=request_id)
        if as_json:
            print_json(result)
        else:
            console.print(f"decayed {plural(result.edges_decayed, 'edge')}")

    run(main())


@app.command()
def observations(
    observer: str = typer.Option("", "--observer"),
    subject: str = typer.Option("", "--subject"),
    capability: str = typer.Option("", "--capability", "-c"),
    limit: int = typer.Option(100, "--limit", "-n", min=1, max=1_000_000),
    as_json: bool = typer.Option(False, "--json"),
    trust: str = typer.Option(None, help="trust service address"),
) -> None:
    """The recorded evidence, oldest first."""

    async def main() -> None:
        rows = []
        async with TrustClient(service_address("trust", trust)) as client:
            async for o in client.iter_observations(
                observer_id=observer, subject_id=subject, capability=capability
            ):
                rows.append(o)
                if len(rows) >= limit:
                    break
        if as_json:
            print_json([to_dict(o) for o in rows])
            return
        table = Table(title="Observations")
        for column in ("#", "observer", "subject", "capability", "outcome", "weight", "signed"):
            table.add_column(column)
        for o in rows:
            table.add_row(
                str(o.sequence),
                o.observer_id,
                o.subject_id,
                o.capability or "-",
                to_dict(o.outcome)["kind"].removeprefix("OUTCOME_KIND_").lower(),
                f"{o.weight:.2f}",
                "✓" if o.signed else "",
            )
        console.print(table)

    run(main())
