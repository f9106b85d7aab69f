"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from clients.channel import create_channel


@dataclass
class Row:
    name: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    goal: str = ""
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(
            f"  {row.name}: {row.value}  (baseline {row.baseline or '-'}, ratio {ratio}, goal {row.goal or '-'}) {row.note}",
            flush=True,
        )


class EchoServer:
    """The bare echo server, in its own process like the services."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    async def __aenter__(self) -> EchoServer:
        ready = os.path.join(tempfile.mkdtemp(prefix="echo-"), "ready.json")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.echo_server", ready])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.exists(ready):
                with open(ready) as fh:
                    self.address = f"127.0.0.1:{json.load(fh)['port']}"
                return self
            await asyncio.sleep(0.02)
        raise TimeoutError("echo server did not start")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)

    def channel(self) -> grpc.aio.Channel:
        return create_channel(self.address, retries=False)


async def throughput(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.3,
) -> float:
    """Completed calls per second with ``concurrency`` callers in a closed loop."""
    count = 0
    measuring = False
    end = time.monotonic() + warmup_s + duration_s

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < end:
            await call()
            if measuring:
                count += 1

    async def clock() -> None:
        nonlocal measuring
        await asyncio.sleep(warmup_s)
        measuring = True

    await asyncio.gather(clock(), *(worker() for _ in range(concurrency)))
    return count / duration_s


async def latencies(
    call: Callable[[], Awaitable[object]], *, n: int, warmup: int = 50
) -> list[float]:
    """Sequential call latencies in milliseconds."""
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def best_of(rounds: int, measure: Callable[[], Awaitable[float]]) -> float:
    return max([await measure() for _ in range(rounds)])


__all__ = [
    "EchoServer",
    "Report",
    "Row",
    "best_of",
    "latencies",
    "percentile",
    "statistics",
    "throughput",
]
