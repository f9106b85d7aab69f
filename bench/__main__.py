"""python -m bench (make bench): every benchmark, printed as ratios against a
bare gRPC echo measured in the same run. Prints; never asserts.

BENCH_DURATION_S (default 3) sets each measurement's length; BENCH_QUICK=1
skips the largest in-process sizes.
"""

from __future__ import annotations

import os
import platform

import uvloop
from rich.console import Console
from rich.table import Table

from bench import broker, consensus, market, orchestrator, registry, swarm_tier
from bench.common import Report

BENCHES = [registry.run, broker.run, consensus.run, market.run, swarm_tier.run, orchestrator.run]


async def main() -> None:
    duration = float(os.environ.get("BENCH_DURATION_S", "3"))
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    report = Report()
    for bench in BENCHES:
        await bench(report, duration_s=duration, quick=quick)
    table = Table(
        title=f"Agent2028 benchmarks ({platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    for column in ("benchmark", "ours", "baseline (same run)", "ratio", "goal", ""):
        table.add_column(column)
    for row in report.rows:
        table.add_row(
            row.name,
            row.value,
            row.baseline,
            f"{row.ratio:.2f}" if row.ratio is not None else "",
            row.goal,
            row.note,
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    uvloop.run(main())
