"""The cluster in containers, end to end: it comes up healthy, a user drives
the guide's scenario through the published port, every perturbation of the
manifest leaves the invariants holding, agents scale with unique ids, and
SIGTERM drains every container to exit 0. The tests share one testnet and run
in file order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from clients.errors import NotFound
from clients.launcher import SERVICES
from clients.registry import RegistryClient
from tests.compose.invariants import HEALED, INVARIANTS, PERTURBED, check_all
from tests.compose.perturbations import PERTURBATIONS
from tests.compose.testnet import ROOT, Manifest, Testnet
from tests.support import eventually

pytestmark = pytest.mark.compose

MANIFEST = Manifest.load()
CASES = MANIFEST.cases()


async def cli(*args: str) -> str:
    """The agent2028 command, run from the host like a user would."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"agent2028 {' '.join(args)}: {err.decode()}"
    return out.decode()


def test_manifest_matches_compose(testnet: Testnet) -> None:
    """docker-compose.yml runs every service the launcher knows, as the
    launcher does, and the manifest perturbs each: a service cannot land on
    main without its container and its perturbations."""
    services = testnet.config()["services"]
    assert set(services) == {"agent"} | set(SERVICES)
    assert {s.name for s in testnet.manifest.services} == set(SERVICES)
    for name, spec in SERVICES.items():
        node = testnet.manifest.service(name)
        assert services[name]["command"] == ["python", "-m", spec.module], name
        port = spec.default_port
        assert int(services[name]["environment"]["PORT"]) == port == node.port, name
        assert node.metrics_port == port + 1000, name
        # Every container finds every service at its compose name (x-peers).
        for user in services:
            assert services[user]["environment"][spec.addr_env] == f"{name}:{port}", user
        assert services[name]["healthcheck"]["test"][-2:] == ["-m", "clients.health_check"]
        assert any(v["target"] == "/data" for v in services[name].get("volumes", [])), name
    for target, perturbation in CASES:
        assert perturbation in PERTURBATIONS, f"{target}: unknown perturbation {perturbation}"


async def test_cluster_comes_up_healthy(testnet: Testnet, notes: list[str]) -> None:
    agents = testnet.agents()
    assert len(agents) == testnet.manifest.agents
    hostnames = {testnet.hostname(c) for c in agents}
    assert len(hostnames) == len(agents), "agent containers share a hostname"
    for container in agents + [testnet.service_container(s.name) for s in MANIFEST.services]:
        container.reload()
        assert container.attrs["State"]["Health"]["Status"] == "healthy", container.name
        # The image runs everything as its non-root user.
        assert container.attrs["Config"]["User"] == "agent2028", container.name
    notes.append(f"`docker compose up --wait` took {testnet.started_s:.1f}s")
    notes += await check_all(testnet, HEALED)


async def test_guide_scenario_from_outside(testnet: Testnet, tmp_path, notes) -> None:  # type: ignore[no-untyped-def]
    registry = testnet.registry_address
    expected = {testnet.agent_id(c): testnet.agent_address(c) for c in testnet.agents()}

    # Registration and capability lookup through the published port, with the CLI.
    listed = json.loads(await cli("agents", "list", "--json", "--registry", registry))
    assert {a["card"]["agent_id"]: a["card"]["address"] for a in listed} == expected
    assert {a["status"] for a in listed} == {"HEALTH_STATUS_PASSING"}
    found = json.loads(
        await cli(
            "agents", "find", "database.query", "--top", "3", "--json", "--registry", registry
        )
    )
    assert len(found["agents"]) == 3
    assert set(a["card"]["agent_id"] for a in found["agents"]) <= set(expected)
    assert found["scores"] == sorted(found["scores"], reverse=True)
    assert int(found["total_with_capability"]) == len(expected)

    # An agent outside the containers registers through the same port, is
    # found by its capability, and leaves on SIGTERM.
    outside = f"outside-{os.getpid()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.agent",
        "--id",
        outside,
        "--capability",
        "guide.outside",
        "--registry",
        registry,
        "--data-dir",
        str(tmp_path / outside),
        env={**os.environ, "AGENT2028_PARENT_PID": str(os.getpid()), "LOG_LEVEL": "WARNING"},
        cwd=ROOT,
    )
    async with RegistryClient(registry) as client:
        try:

            async def found_outside() -> bool:
                result = await client.find_by_capability("guide.outside", top_k=5)
                return [a.card.agent_id for a in result.agents] == [outside]

            await eventually(found_outside, timeout_s=30, what="the outside agent registering")
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

        async def gone() -> bool:
            try:
                await client.get_agent(outside)
            except NotFound:
                return True
            return False

        await eventually(gone, timeout_s=testnet.timing.reflect_within_s, what="outside agent gone")

    # Inside the network the best database.query agent runs a real query on
    # its SQLite database and signs a receipt that verifies.
    result = testnet.probe(
        testnet.service_container("registry"),
        "execute",
        f"registry:{MANIFEST.service('registry').port}",
        "database.query",
        "SELECT count(*) AS users FROM users",
    )
    assert result["success"] and result["verified"], result
    assert result["agent_id"] in expected
    answer = json.loads(result["output"])
    assert (answer["columns"], answer["rows"]) == (["users"], [[200]]), answer
    notes.append(f"{result['agent_id']} ran the query at {result['address']}")

    # Prometheus metrics on the published metrics port.
    metrics_url = (
        f"http://{testnet.published('registry', MANIFEST.service('registry').metrics_port)}/metrics"
    )
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url, timeout=10).read())
    assert b'agent2028_serving{service="registry"} 1.0' in body


async def test_guide_through_the_front_door(testnet: Testnet, notes) -> None:  # type: ignore[no-untyped-def]
    """The guide's story through the one port docker-compose.yml publishes by
    default: the topology, a routed command, the guide's 8.1 (consensus among
    the agent containers, then execution, then trust) and the event stream
    that saw it, all with the CLI a user has on the host."""
    front = ("--orchestrator", testnet.orchestrator_address)
    expected = {testnet.agent_id(c) for c in testnet.agents()}

    topology = json.loads(await cli("topology", "--json", *front))
    assert {n["name"]: n["status"] for n in topology["services"]} == {
        name: "SERVING" for name in SERVICES
    }
    assert all(route["available"] for route in topology["routes"]), topology["routes"]
    assert topology["agents_passing"] == len(expected)

    executed = json.loads(
        await cli("submit", "execute", "echo", "through", "the", "front", "door", "--json", *front)
    )
    op = executed["operation"]
    assert op["status"] == "succeeded", op
    receipt = op["execute"]["receipt"]
    assert receipt["success"] and receipt["agent_id"] in expected, receipt

    decided = json.loads(
        await cli(
            "submit",
            "execute-with-consensus",
            "echo",
            "deploy",
            "--operation",
            "guide.deploy",
            "--consensus",
            "byzantine",
            "--json",
            *front,
        )
    )
    op = decided["operation"]
    assert op["status"] == "succeeded", op
    result = op["execute_with_consensus"]
    proposal = result["proposal"]
    certificate = proposal["certificate"]
    assert proposal["status"] == certificate["outcome"] == "PROPOSAL_STATUS_APPROVED"
    n = certificate["electorate_size"]
    assert n == len(expected)
    assert len(certificate["votes"]) >= certificate["quorum"] == (n + (n - 1) // 3) // 2 + 1
    assert {v["voter_id"] for v in certificate["votes"]} <= expected
    assert result["receipt"]["success"] and result["receipt"]["agent_id"] in expected
    assert 0.5 < result["coordinator_trust"]["score"] <= 1.0, result["coordinator_trust"]

    # The bus saw the decision, and only the types asked for are shown.
    lines = await cli(
        "events",
        "tail",
        "--types",
        "consensus.*",
        "--from-oldest",
        "--until-caught-up",
        "--json",
        *front,
    )
    events = [json.loads(line) for line in lines.splitlines() if line.strip()]
    assert events and all(e["type"].startswith("consensus.") for e in events)
    reached = [e for e in events if e["type"] == "consensus.reached"]
    assert proposal["proposal_id"] in {e["subject"] for e in reached}, reached
    notes.append(
        f"8.1 through the front door: {len(certificate['votes'])} of {n} signed votes "
        f"(quorum {certificate['quorum']}), ran on {result['receipt']['agent_id']}"
    )

    # The orchestrator's metrics on its published side port.
    metrics_url = (
        f"http://{testnet.published('orchestrator', MANIFEST.service('orchestrator').metrics_port)}"
        "/metrics"
    )
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url, timeout=10).read())
    assert b'agent2028_serving{service="orchestrator"} 1.0' in body


def test_only_the_front_door_is_published_by_default(testnet: Testnet) -> None:
    """docker-compose.yml alone publishes the orchestrator and its metrics and
    nothing else; deploy/compose.publish-all.yml adds every other service."""
    config = subprocess.run(
        ["docker", "compose", "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    alone = json.loads(config.stdout)["services"]
    published = {name: {p["target"] for p in spec.get("ports", [])} for name, spec in alone.items()}
    orchestrator = MANIFEST.service("orchestrator")
    assert published.pop("orchestrator") == {orchestrator.port, orchestrator.metrics_port}
    assert all(not ports for ports in published.values()), published


@pytest.mark.parametrize(("target", "perturbation"), CASES, ids=[f"{t}-{p}" for t, p in CASES])
async def test_perturbation(testnet: Testnet, target: str, perturbation: str, notes) -> None:  # type: ignore[no-untyped-def]
    container = testnet.next_agent() if target == "agent" else testnet.service_container(target)
    action = PERTURBATIONS[perturbation]
    for invariant in INVARIANTS:
        await invariant.before(testnet)
    out_since = time.time()
    action.apply(testnet, container)
    try:
        assert not testnet.is_up(container)
        during = await check_all(testnet, PERTURBED)
    finally:
        action.heal(testnet, container)
    after = await check_all(testnet, HEALED)
    if target == "registry":
        # The registry is soft state: what it lists now, every agent told it
        # again by itself after it came back.
        async with RegistryClient(testnet.registry_address) as client:
            stale = [
                a.card.agent_id
                async for a in client.iter_agents()
                if a.register_time.ToSeconds() < out_since
            ]
        assert not stale, f"registered before the registry went down: {stale}"
    notes.append(f"while out ({perturbation}): {'; '.join(during) or 'nothing to check'}")
    notes.append(f"after healing: {'; '.join(after)}")


async def test_scale_up_gives_unique_agents(testnet: Testnet, notes: list[str]) -> None:
    n = testnet.manifest.scale_to
    testnet.compose_command("up", "--detach", "--wait", "--no-recreate", "--scale", f"agent={n}")
    agents = testnet.agents()
    assert len(agents) == n
    assert len({testnet.agent_id(c) for c in agents}) == n
    notes += await check_all(testnet, HEALED)


def test_sigterm_drains_every_container(testnet: Testnet) -> None:
    testnet.compose_command("stop", "--timeout", "30")
    every = testnet.agents() + [testnet.service_container(s.name) for s in MANIFEST.services]
    for container in every:
        container.reload()
        state = container.attrs["State"]
        assert state["Status"] == "exited", f"{container.name} is {state['Status']}"
        assert state["ExitCode"] == 0, f"{container.name} exited {state['ExitCode']}"
        assert not state["OOMKilled"], f"{container.name} was killed for memory"
