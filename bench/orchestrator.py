"""The orchestrator's cost: Execute through the front door against the same
command sent to the broker directly, and the event bus (a publish committed,
then delivered to a subscriber) against the bare echo, all in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
import time

from agent2028.broker.v1 import broker_pb2
from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from bench.broker import alternating
from bench.common import EchoServer, Report, Row, latencies, percentile, throughput
from clients.channel import create_channel
from clients.launcher import LocalCluster
from clients.orchestrator import OrchestratorClient


async def run(report: Report, *, duration_s: float, quick: bool) -> None:
    gc.collect()
    state = tempfile.mkdtemp(prefix="bench-orchestrator-")
    cluster = LocalCluster(
        state,
        env={
            "LOG_LEVEL": "WARNING",
            "REGISTRY_HEARTBEAT_INTERVAL_S": "2",
            "REGISTRY_LEASE_TTL_S": "60",
            # The bench's own events only: the sources' traffic would be noise.
            "ORCHESTRATOR_SUBSCRIBER_QUEUE": "100000",
        },
    )
    await cluster.start()
    try:
        await cluster.spawn_agent("bench-agent", ["echo"], max_concurrency=64)
        async with EchoServer() as echo:
            await _execute(report, cluster, echo, duration_s, quick)
            await _bus(report, cluster, echo, duration_s, quick)
    finally:
        await cluster.stop()


async def _execute(
    report: Report, cluster: LocalCluster, echo: EchoServer, duration_s: float, quick: bool
) -> None:
    # No request ids: each call is a new operation (and a new command).
    direct = broker_pb2.ExecuteDistributedRequest(
        capability="echo", args=["hello"], strategy=broker_pb2.STRATEGY_BEST_FIT
    ).SerializeToString()
    fronted = pb.SubmitRequest(
        execute=pb.ExecuteOperation(capability="echo", args=["hello"])
    ).SerializeToString()
    echo_channel = echo.channel()
    broker_channel = create_channel(cluster.address("broker"), retries=False)
    front_channel = create_channel(cluster.address("orchestrator"), retries=False)
    try:
        echo_call = echo_channel.unary_unary("/bench.Echo/Unary")
        execute = broker_channel.unary_unary(
            "/agent2028.broker.v1.BrokerService/ExecuteDistributed"
        )
        submit = front_channel.unary_unary("/agent2028.orchestrator.v1.OrchestratorService/Submit")
        first = pb.SubmitResponse.FromString(await submit(fronted, timeout=10))
        assert first.operation.status == pb.OPERATION_STATUS_SUCCEEDED, first.operation.message
        n = 200 if quick else 600
        base: list[float] = []
        direct_ms: list[float] = []
        front_ms: list[float] = []
        for _ in range(2):  # in turns, so load from elsewhere weighs on all alike
            base += await latencies(lambda: echo_call(direct, timeout=5), n=n // 2)
            direct_ms += await latencies(lambda: execute(direct, timeout=10), n=n // 2)
            front_ms += await latencies(lambda: submit(fronted, timeout=10), n=n // 2)
        echo_p50 = percentile(base, 0.5)
        broker_p50 = percentile(direct_ms, 0.5)
        front_p50 = percentile(front_ms, 0.5)
        report.add(
            Row(
                "Execute through the orchestrator, p50",
                f"{front_p50:.2f} ms",
                f"broker direct {broker_p50:.2f} ms",
                front_p50 / broker_p50,
                "<= 2",
                f"{front_p50 / echo_p50:.1f}x the echo's p50 ({echo_p50:.3f} ms); one more hop, "
                "and the outcome committed",
            )
        )
        report.add(
            Row(
                "Execute through the orchestrator, p99",
                f"{percentile(front_ms, 0.99):.2f} ms",
                f"broker direct {percentile(direct_ms, 0.99):.2f} ms",
                percentile(front_ms, 0.99) / percentile(direct_ms, 0.99),
                "",
            )
        )
        base_rate, direct_rate = await alternating(
            1,
            lambda: throughput(
                lambda: execute(direct, timeout=10), concurrency=16, duration_s=duration_s
            ),
            lambda: throughput(
                lambda: submit(fronted, timeout=10), concurrency=16, duration_s=duration_s
            ),
        )
        report.add(
            Row(
                "Execute throughput through the orchestrator, 16 in flight",
                f"{direct_rate:,.0f}/s",
                f"broker direct {base_rate:,.0f}/s",
                direct_rate / base_rate,
                "informational",
            )
        )
    finally:
        await front_channel.close()
        await broker_channel.close()
        await echo_channel.close()


async def _bus(
    report: Report, cluster: LocalCluster, echo: EchoServer, duration_s: float, quick: bool
) -> None:
    payload = pb.PublishRequest(type="bench.tick", summary="tick").SerializeToString()
    echo_channel = echo.channel()
    async with OrchestratorClient(cluster.address("orchestrator"), timeout_s=10) as client:
        try:
            echo_call = echo_channel.unary_unary("/bench.Echo/Unary")
            publish = client.channel.unary_unary(
                "/agent2028.orchestrator.v1.OrchestratorService/Publish"
            )
            received = asyncio.Event()
            count = 0
            target = 0

            async def follow() -> None:
                nonlocal count
                async for response in client.subscribe(["bench.tick"]):
                    count += len(response.events)
                    if target and count >= target:
                        received.set()

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0.2)

            # Latency: publish one, until the subscriber has it.
            async def one() -> None:
                nonlocal target
                received.clear()
                target = count + 1
                await publish(payload, timeout=5)
                await asyncio.wait_for(received.wait(), 5)

            n = 200 if quick else 500
            base = await latencies(lambda: echo_call(payload, timeout=5), n=n)
            ours = await latencies(one, n=n)
            echo_p50 = percentile(base, 0.5)
            report.add(
                Row(
                    "event bus: publish → committed → delivered to a subscriber, p50",
                    f"{percentile(ours, 0.5):.2f} ms",
                    f"echo p50 {echo_p50:.3f} ms",
                    percentile(ours, 0.5) / echo_p50,
                    "<= 4",
                    f"p99 {percentile(ours, 0.99):.2f} ms",
                )
            )
            # Throughput: 16 publishers; events delivered per second.
            echo_rate = await throughput(
                lambda: echo_call(payload, timeout=5), concurrency=16, duration_s=duration_s
            )
            target = 0
            start_count = count
            started = time.perf_counter()
            published = await throughput(
                lambda: publish(payload, timeout=5), concurrency=16, duration_s=duration_s
            )
            received.clear()
            target = start_count + int(published * duration_s)
            if count < target:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(received.wait(), 10)
            elapsed = time.perf_counter() - started
            delivered = (count - start_count) / elapsed
            report.add(
                Row(
                    "event bus throughput, 16 publishers → 1 subscriber (delivered)",
                    f"{delivered:,.0f}/s",
                    f"echo {echo_rate:,.0f}/s",
                    delivered / echo_rate,
                    "informational",
                    f"published {published:,.0f}/s, each committed to SQLite first",
                )
            )
            follower.cancel()
        finally:
            await echo_channel.close()
