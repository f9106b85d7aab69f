"""Swarm-tier benchmarks: the stigmergy tick of a 1000 x 1000 layer as a ratio
to a plain copy of the same array, signed deposits per second over gRPC as a
ratio to the bare echo, and the time of one step of 10,000 boids."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
import uuid

import numpy as np

from bench.common import EchoServer, Report, Row, best_of, throughput
from clients.channel import create_channel
from clients.launcher import LocalCluster
from clients.registry import RegistryClient
from clients.stigmergy import deposit_request
from services.common.crypto import Identity
from services.stigmergy.core import FieldSettings, PheromoneField
from services.swarm.flock import Flock, FlockRules, World

DEPOSITORS = 16


def _best_ms(fn, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(best, median) milliseconds of ``fn()``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return min(times), statistics.median(times)


def tick_vs_copy(report: Report) -> None:
    """One tick of one fully active 1000 x 1000 layer (every cell non-zero, so
    nothing is skipped) against np.copyto of the same array."""
    field = PheromoneField(FieldSettings(min_intensity=0.0, flush_every=1_000_000))
    rng = np.random.default_rng(1)
    field.layers["trail"] = (rng.random((1000, 1000)) + 0.5).astype(np.float32)
    field.active["trail"] = True
    source = field.layers["trail"]
    target = np.empty_like(source)
    for _ in range(5):
        field.tick()
        np.copyto(target, source)
    copy_best, copy_median = _best_ms(lambda: np.copyto(target, field.layers["trail"]), 50)
    tick_best, tick_median = _best_ms(field.tick, 50)
    report.add(
        Row(
            "stigmergy tick, one 1000x1000 float32 layer",
            f"{tick_best:.2f} ms (median {tick_median:.2f})",
            f"np.copyto {copy_best:.3f} ms",
            tick_best / copy_best,
            "<= 15x copy",
            f"(median ratio {tick_median / copy_median:.1f})",
        )
    )


def boids_per_step(report: Report) -> None:
    for n, world, note in (
        (10_000, World(1000, 1000), "guide's world: ~78 boids within reach of each"),
    ):
        flock = Flock.random(n, FlockRules(), world, 1)
        flock.step(2)
        start_best, start_median = _best_ms(flock.step, 10)
        flock.step(100)
        later_best, later_median = _best_ms(flock.step, 10)
        report.add(
            Row(
                f"flock step, {n:,} boids",
                f"{start_median:.1f} ms at random start, {later_median:.1f} ms after 100 steps",
                ratio=None,
                goal="<= 50 ms",
                note=f"(best {start_best:.1f} / {later_best:.1f} ms; {note})",
            )
        )


async def deposits_over_grpc(report: Report, duration_s: float) -> None:
    state = tempfile.mkdtemp(prefix="bench-stigmergy-")
    cluster = LocalCluster(
        state,
        services=["registry", "stigmergy"],
        env={
            "LOG_LEVEL": "WARNING",
            "REGISTRY_LEASE_TTL_S": "600",
            "STIGMERGY_DEPOSIT_RATE": "1000000000",
            "STIGMERGY_DEPOSIT_BURST": "1000000000",
        },
    )
    await cluster.start()
    try:
        identities = [Identity.generate(f"bench-ant-{i:02d}") for i in range(DEPOSITORS)]
        async with RegistryClient(cluster.address("registry")) as registry:
            for i, identity in enumerate(identities):
                await registry.register(
                    identity,
                    address=f"127.0.0.1:{21000 + i}",
                    capabilities=["compute"],
                    lease_ttl_s=600,
                )
        # Signed once, before measuring, each with its own request id, so the
        # service really verifies and applies every one; both servers get the
        # same bytes and neither client parses the answers.
        rng = np.random.default_rng(3)
        # Enough for two rounds at the rates this machine reaches (beyond that
        # the cycle repeats them: still verified, then recognised as duplicates).
        needed = int(12000 * duration_s) + 2000
        payloads = [
            deposit_request(
                identities[k % DEPOSITORS],
                float(x),
                float(y),
                "trail",
                1.0,
                request_id=uuid.uuid4().hex,
            ).SerializeToString()
            for k, (x, y) in enumerate(rng.random((needed, 2)) * 999)
        ]
        stream = itertools.cycle(payloads)
        channel = create_channel(cluster.address("stigmergy"), retries=False)
        deposit = channel.unary_unary("/agent2028.stigmergy.v1.StigmergyService/Deposit")
        await deposit(next(stream), timeout=5)
        async with EchoServer() as echo:
            echo_channel = echo.channel()
            echo_unary = echo_channel.unary_unary("/bench.Echo/Unary")
            sample = payloads[0]
            for concurrency in (1, 16):
                base = await best_of(
                    2,
                    lambda c=concurrency: throughput(
                        lambda: echo_unary(sample, timeout=5), concurrency=c, duration_s=duration_s
                    ),
                )
                ours = await best_of(
                    2,
                    lambda c=concurrency: throughput(
                        lambda: deposit(next(stream), timeout=5),
                        concurrency=c,
                        duration_s=duration_s,
                    ),
                )
                report.add(
                    Row(
                        f"stigmergy Deposit (signed, verified), {concurrency} in flight",
                        f"{ours:,.0f}/s",
                        f"echo {base:,.0f}/s",
                        ours / base,
                        "",
                        f"({len(payloads):,} distinct signed deposits)",
                    )
                )
            await echo_channel.close()
        await channel.close()
    finally:
        await cluster.stop()


async def run(report: Report, *, duration_s: float, quick: bool) -> None:
    print("swarm tier:", flush=True)
    tick_vs_copy(report)
    boids_per_step(report)
    await deposits_over_grpc(report, duration_s)
    await asyncio.sleep(0)
