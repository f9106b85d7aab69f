"""The closed loop with every service and agent as its own process: failover
when the routed agent is killed, kill -9 of the broker and the trust service
after acknowledged writes, a failing agent sinking in BEST_FIT, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from clients.broker import BrokerClient, verify_agent_signature, verify_broker_signature
from clients.launcher import FAST_FAILURE_DETECTION, LocalCluster
from clients.registry import RegistryClient
from clients.trust import TrustClient, outcome
from tests.cluster.conftest import dump_logs
from tests.support import eventually

# Registry timings slow enough that a killed agent still looks passing when
# the next command is routed to it: failover, not the registry, must save it.
CALM = {"REGISTRY_HEARTBEAT_INTERVAL_S": "2", "REGISTRY_LEASE_TTL_S": "10"}


async def test_a_command_routed_to_a_killed_agent_succeeds_on_another(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(CALM)
    await cluster.start()
    await cluster.spawn_agents(3, [["compute"]])
    async with BrokerClient(cluster.address("broker")) as broker:
        route = await broker.route("compute", strategy="best_fit")
        victim = route.chosen.agent.agent_id
        await cluster.kill(victim)
        response = await broker.execute(
            "compute", ["fib", "20"], strategy="best_fit", session_id="failover"
        )
        receipt = response.receipt
        assert receipt.success, dump_logs(cluster)
        assert receipt.attempts == 2
        assert receipt.attempt_log[0].agent_id == victim
        assert receipt.attempt_log[0].result == "UNAVAILABLE"
        assert receipt.agent_id != victim
        assert json.loads(response.output)["value"] == "6765"
        identity = await broker.identity()
        assert verify_broker_signature(receipt, identity.public_key)
        assert verify_agent_signature(receipt)
        # The dead agent is now a suspect: the next command goes elsewhere at once.
        again = await broker.execute("compute", ["fib", "10"], strategy="best_fit")
        assert again.receipt.attempts == 1 and again.receipt.agent_id != victim


async def test_kill_9_of_broker_and_trust_loses_nothing_acknowledged(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(FAST_FAILURE_DETECTION)
    await cluster.start()
    await cluster.spawn_agents(2, [["compute"]])
    async with (
        BrokerClient(cluster.address("broker")) as broker,
        TrustClient(cluster.address("trust")) as trust,
    ):
        receipts = await asyncio.gather(
            *(broker.execute("compute", ["sum", str(i)], session_id="durable") for i in range(20))
        )
        observed = await asyncio.gather(
            *(
                trust.observe(
                    f"auditor-{i % 4}",
                    f"agent-00{1 + i % 2}",
                    outcome("success" if i % 3 else "timeout"),
                    request_id=f"audit-{i}",
                )
                for i in range(20)
            )
        )
        assert all(r.receipt.success for r in receipts) and not any(o.duplicate for o in observed)
        # Right after the last acknowledgement: no drain, no flush.
        await cluster.kill("broker")
        await cluster.kill("trust")
    await cluster.restart_service("trust")
    await cluster.restart_service("broker")
    async with (
        BrokerClient(cluster.address("broker")) as broker,
        TrustClient(cluster.address("trust")) as trust,
    ):
        stored = [r async for r in broker.iter_receipts(session_id="durable")]
        assert sorted(r.command_id for r in stored) == sorted(
            r.receipt.command_id for r in receipts
        )
        by_id = {r.receipt.command_id: r.receipt for r in receipts}
        assert all(r == by_id[r.command_id] for r in stored)
        identity = await broker.identity()
        assert all(verify_broker_signature(r, identity.public_key) for r in stored)
        audits = [o async for o in trust.iter_observations()]
        assert {o.request_id for o in audits} >= {f"audit-{i}" for i in range(20)}

        # The broker's reports (stored with its receipts) all reach trust,
        # each exactly once, even those delivered before the crash.
        async def broker_evidence() -> int:
            return sum([(await trust.score("broker", f"agent-00{n}")).observations for n in (1, 2)])

        await eventually(
            lambda: _equals(broker_evidence(), 20), timeout_s=20, what="all 20 broker reports"
        )
        again = await broker_evidence()
        assert again == 20
        # And a retried request after the crash returns the stored receipt.
        first = receipts[0].receipt
        retry = await broker.execute(
            "compute", ["sum", "0"], session_id="durable", request_id=first.command_id
        )
        assert retry.duplicate and retry.receipt == first


async def _equals(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected


def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", AGENT2028_STATE_DIR=cluster.state_dir)
    env.update(cluster.peer_env())
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_failing_agent_sinks_in_best_fit_and_the_cli_shows_it(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(FAST_FAILURE_DETECTION)
    await cluster.start()
    # Equal on paper; ties go by id, so the failing agent is chosen first.
    await cluster.spawn_agent("agent-a-flaky", ["compute"], faults=["fail"])
    await cluster.spawn_agent("agent-b-steady", ["compute"])
    chosen: list[str] = []
    async with (
        BrokerClient(cluster.address("broker")) as broker,
        RegistryClient(cluster.address("registry")) as registry,
        TrustClient(cluster.address("trust")) as trust,
    ):
        before = await registry.get_agent("agent-a-flaky")

        async def steady_chosen() -> bool:
            response = await broker.execute(
                "compute", ["sum", "1"], strategy="best_fit", session_id="sinking"
            )
            chosen.append(response.receipt.agent_id)
            return response.receipt.agent_id == "agent-b-steady"

        await eventually(steady_chosen, timeout_s=20, interval_s=0.1, what="BEST_FIT moving on")
        assert chosen[0] == "agent-a-flaky", chosen
        assert len(chosen) <= 10, chosen
        after = await registry.get_agent("agent-a-flaky")
        steady = await registry.get_agent("agent-b-steady")
        assert after.reliability < before.reliability
        assert after.fitness < before.fitness and after.fitness < steady.fitness
        flaky_trust = await trust.score("broker", "agent-a-flaky")
        assert flaky_trust.score < 0.5 and flaky_trust.negative_evidence > 0
        # It stays behind: the next few commands go to the steady agent.
        for _ in range(3):
            response = await broker.execute("compute", ["sum", "2"], strategy="best_fit")
            assert response.receipt.agent_id == "agent-b-steady"

    # The same story through the command line.
    run = cli(cluster, "exec", "compute", "sum", "20", "22", "--session", "cli", "--json")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["output"]["sum"] == 42.0
    assert body["receipt"]["session_id"] == "cli"
    assert body["receipt"]["verified"] == {"agent_signature": True, "broker_signature": True}
    route = cli(cluster, "route", "compute", "--strategy", "max_reliability", "--json")
    assert route.returncode == 0, route.stderr
    assert json.loads(route.stdout)["chosen"]["agent"]["agent_id"] == "agent-b-steady"
    listed = cli(cluster, "receipts", "list", "--session", "sinking", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["agent_id"] for r in json.loads(listed.stdout)][: len(chosen)] == chosen
    score = cli(cluster, "trust", "score", "broker", "agent-a-flaky", "--json")
    assert json.loads(score.stdout)["score"] < 0.5
    observe = cli(cluster, "trust", "observe", "ops", "agent-b-steady", "success", "--json")
    assert observe.returncode == 0 and json.loads(observe.stdout)["score"]["score"] > 0.79
    conservative = cli(cluster, "trust", "conservative", "agent-b-steady", "--json")
    assert json.loads(conservative.stdout)["observers"] == 2
    transitive = cli(cluster, "trust", "transitive", "ops", "agent-b-steady", "--json")
    assert json.loads(transitive.stdout)["path"] == ["ops", "agent-b-steady"]
    top = cli(cluster, "trust", "top", "-k", "2", "--json")
    assert [s["subject_id"] for s in json.loads(top.stdout)] == ["agent-b-steady", "agent-a-flaky"]
    failed = cli(cluster, "exec", "nothing.here", "x")
    assert (
        failed.returncode == 1 and "NOT_FOUND" in failed.stderr and "nothing.here" in failed.stderr
    )
    bad = cli(cluster, "trust", "observe", "a", "b", "partial_failure", "--error-rate", "2")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "error_rate" in bad.stderr


def test_services_exit_2_naming_a_bad_variable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for module, name, value in (
        ("services.trust", "TRUST_DECAY_FACTOR", "2"),
        ("services.broker", "BROKER_MAX_ATTEMPTS", "99"),
        ("services.broker", "TRUST_ADDR", "not-an-address"),
    ):
        env = dict(os.environ, PORT="0", DATA_DIR=str(tmp_path), **{name: value})
        result = subprocess.run(
            [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert name in result.stderr
