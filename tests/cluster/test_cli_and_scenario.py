"""The CLI and the make-run scenario, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clients.launcher import SERVICES, LocalCluster

pytestmark = pytest.mark.cluster


def cli(state_dir: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AGENT2028_STATE_DIR=state_dir, COLUMNS="200")
    env.pop("REGISTRY_ADDR", None)
    env.pop("CONSENSUS_ADDR", None)
    env.pop("ORCHESTRATOR_ADDR", None)
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_detached_cluster_through_the_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = os.path.join(str(tmp_path), "state")
    up = cli(state, "cluster", "up", "--detach", "--agents", "3", "--ephemeral-ports")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        again = cli(state, "cluster", "up", "--detach", "--agents", "3", "--ephemeral-ports")
        assert again.returncode == 1 and "Traceback" not in again.stderr
        assert again.stderr == (
            f"error: a cluster is already running (state in {state}): "
            "stop it with `agent2028 cluster down`\n"
        )
        status = json.loads(cli(state, "cluster", "status", "--json").stdout)
        agents = {"agent-001", "agent-002", "agent-003"}
        assert {p["name"] for p in status} == set(SERVICES) | agents
        assert all(p["alive"] for p in status)
        assert {p["health"] for p in status if p["kind"] == "service"} == {"SERVING"}

        found = cli(state, "agents", "find", "compute", "--top", "5", "--json")
        assert found.returncode == 0, found.stderr
        holders = {a["card"]["agent_id"] for a in json.loads(found.stdout)["agents"]}
        # The default mix: agent-001 database.query+compute, agent-002
        # ml.inference+compute, agent-003 database.query+ml.inference.
        assert holders == {"agent-001", "agent-002"}
        spawned = cli(state, "agents", "spawn", "2", "--capability", "echo", "--prefix", "extra")
        assert spawned.returncode == 0, spawned.stderr
        listed = json.loads(cli(state, "agents", "list", "--json", "--capability", "echo").stdout)
        assert {"extra-001", "extra-002"} <= {a["card"]["agent_id"] for a in listed}

        # Issue 4's "done when": the database.query agents (001, 003) decide.
        decided = cli(
            state,
            "propose",
            "deploy_production_v2.0",
            "--strategy",
            "byzantine",
            "--electorate-capability",
            "database.query",
            "--wait",
            "--json",
        )
        assert decided.returncode == 0, decided.stderr + decided.stdout
        certificate = json.loads(decided.stdout)["certificate"]
        assert {v["voter_id"] for v in certificate["votes"]} == {"agent-001", "agent-003"}

        # Issue 7: the front door, its topology and its event bus.
        topology = json.loads(cli(state, "topology", "--json").stdout)
        assert {n["name"]: n["status"] for n in topology["services"]} == {
            name: "SERVING" for name in SERVICES
        }
        submitted = cli(state, "submit", "execute", "compute", "fib", "10", "--json")
        assert submitted.returncode == 0, submitted.stderr + submitted.stdout
        operation = json.loads(submitted.stdout)["operation"]
        assert operation["status"] == "succeeded" and '"55"' in operation["execute"]["output"]
        tail = cli(
            state,
            "events",
            "tail",
            "-t",
            "agent.joined,operation.*",
            "--from-oldest",
            "--until-caught-up",
            "--json",
        )
        assert tail.returncode == 0, tail.stderr
        seen = [json.loads(line) for line in tail.stdout.splitlines()]
        assert {"agent-001", "agent-002", "agent-003"} <= {
            e["subject"] for e in seen if e["type"] == "agent.joined"
        }
        assert operation["request_id"] in {e["subject"] for e in seen}
        unknown = cli(state, "events", "tail", "-t", "agent.exploded")
        assert unknown.returncode == 1 and "types[0]" in unknown.stderr

        bad = cli(state, "agents", "find", "Not A Capability")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "capability" in bad.stderr
    finally:
        down = cli(state, "cluster", "down")
    assert down.returncode == 0, down.stderr
    cluster = LocalCluster.load(state)
    assert cluster is None  # state removed
    pids = [p["pid"] for p in status] if "status" in locals() else []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] == "Z"
    except OSError:
        return True


def test_make_run_scenario_tells_the_story_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients.scenario"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, COLUMNS="120"),
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    for expected in (
        "agents registered",
        "receipt signature verifies",
        "removed",
        "re-registered",
        "deploy_production_v2.0 approved; certificate verifies",
        "agent-009 signed both choices",
        "never voted: agent-008",
        "tasks auctioned, run on their winners through the broker and completed",
        "settled on the market by its winner's signed receipt",
        "and the same receipts reached trust",
        "spread over 3 compute agents",
        "after the liar failed it",
        "consensus: approve with confidence 0.739",
        "the bridge adopted it (UpdateFromVote): hive generation",
        "trail from (0, 0) to (999, 999)",
        "the flock aligned",
        "exited 0 after draining",
        "the agent's signature and the broker's, and both verify",
        "was free",
        "trust in db-flaky fell",
        "BEST_FIT now picks",
        "registry is serving again",
        "ExecuteWithConsensus",
        "then, through the broker:",
        "Signal (swarm tier): walker-1 marked (999, 999)",
        "events through the orchestrator's Subscribe, from every service",
        "replayed in order",
    ):
        assert expected in out, f"missing {expected!r} in:\n{out[-3000:]}"
