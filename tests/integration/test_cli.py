"""The agent2028 CLI as a user meets it: one-line errors that keep their text,
one duration syntax, plurals, --json on streams one object per line, streams
against a service that is not up, proposals check, and cluster up refusing to
start over a running cluster. Fast: in-process services, no cluster."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from rich.console import Console

from agent2028.market.v1 import market_pb2
from agent2028.registry.v1 import registry_pb2
from clients.cli.agents import agents_table
from clients.cli.cluster import _launch_error
from clients.cli.common import MAX_DURATION_S, fail, parse_duration, plural
from clients.cli.market import tasks_table
from clients.consensus import ConsensusClient
from clients.launcher import LaunchError
from clients.registry import ORDERS, RegistryClient
from services.common.crypto import Identity
from tests.integration.test_consensus_service import Cluster

HINT = "is the cluster up? (`agent2028 cluster status`)"


def _env(state_dir: str) -> dict[str, str]:
    env = dict(os.environ, AGENT2028_STATE_DIR=state_dir, COLUMNS="200")
    for name in ("REGISTRY", "CONSENSUS", "MARKET", "ORCHESTRATOR", "SWARM", "STIGMERGY"):
        env.pop(f"{name}_ADDR", None)
    return env


def cli(tmp_path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=_env(os.path.join(str(tmp_path), "state")),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def acli(tmp_path, *args: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """The CLI as a subprocess without blocking this loop (in-process servers)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli.main",
        *args,
        env=_env(os.path.join(str(tmp_path), "state")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def stream_lines(tmp_path, count: int, *args: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The first ``count`` lines a streaming command prints, then stop it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli.main",
        *args,
        env=_env(os.path.join(str(tmp_path), "state")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while len(lines) < count:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                lines.append(line.decode())
        # Nothing more comes in a moment: a pretty-printed object would.
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(proc.stdout.readline(), 0.5)  # type: ignore[union-attr]
            lines += [extra.decode()] if extra else []
    finally:
        proc.kill()
        err = await proc.stderr.read()  # type: ignore[union-attr]
        await proc.wait()
    assert len(lines) >= count, err.decode()
    return lines


# --- errors keep their text ------------------------------------------------------


def test_fail_prints_brackets_literally_on_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        fail("agent_id must match [a-z0-9_-]{1,64}, got [bold]x[/bold] " + "y" * 150)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: agent_id must match [a-z0-9_-]{{1,64}}, got [bold]x[/bold] {'y' * 150}\n"


def test_an_error_from_the_command_line_keeps_its_brackets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = cli(tmp_path, "agents", "find", "x", "--order", "[a-z0-9_-]")
    assert result.returncode == 1
    assert "--order '[a-z0-9_-]': expected one of" in result.stderr
    assert "Traceback" not in result.stderr


# --- one duration syntax -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 30 s ", 30.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(text: str, seconds: float) -> None:
    assert parse_duration(text, "--deadline") == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10x", "expected a duration"),
        ("-5s", "expected a duration"),
        ("nan", "expected a duration"),
        ("1e3", "expected a duration"),
        ("", "expected a duration"),
        ("0", "more than zero"),
        ("0ms", "more than zero"),
        (f"{MAX_DURATION_S + 1:.0f}", "at most 3650d"),
    ],
)
def test_parse_duration_refuses_the_rest_in_one_line(text: str, why: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        parse_duration(text, "--window")
    err = capsys.readouterr().err
    assert err.startswith(f"error: --window {text!r}: ") and why in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("exec", "compute", "--deadline", "10s", "--broker"),
        ("swarm", "pool", "create", "T", "--duration", "10s", "--swarm"),
        ("market", "list-task", "--window", "1.5m", "--deadline", "1d", "--market"),
        ("submit", "collective-decision", "T", "--duration", "500ms", "--orchestrator"),
        ("submit", "execute", "compute", "--timeout", "2m", "--orchestrator"),
    ],
)
def test_every_duration_option_takes_the_same_syntax(tmp_path, args: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    # Nothing listens on port 1: the option parsed, so the RPC is what fails.
    result = cli(tmp_path, *args, "127.0.0.1:1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "valid number" not in result.stderr, result.stderr


# --- plurals and columns ----------------------------------------------------------


def test_plural() -> None:
    assert plural(1, "receipt") == "1 receipt"
    assert plural(0, "receipt") == "0 receipts"
    assert plural(2, "process", "processes") == "2 processes"


def test_tasks_table_shows_bids_for_closed_tasks() -> None:
    tasks = [
        market_pb2.Task(task_id="t1", state=market_pb2.TASK_STATE_OPEN, bid_count=2),
        market_pb2.Task(task_id="t2", state=market_pb2.TASK_STATE_COMPLETED, bid_count=3),
        market_pb2.Task(task_id="t3", state=market_pb2.TASK_STATE_FAILED, bid_count=0),
    ]
    table = tasks_table(tasks)
    bids = next(c for c in table.columns if c.header == "bids")
    assert list(bids._cells) == ["2", "3", "0"]


@pytest.mark.parametrize("order", list(ORDERS))
def test_agents_find_shows_each_column_once(order: str) -> None:
    agent = registry_pb2.Agent(card=registry_pb2.AgentCard(agent_id="a1", max_concurrency=4))
    agent.load = 1
    table = agents_table([agent], [0.25], order)
    headers = [str(c.header) for c in table.columns]
    assert len(headers) == len(set(headers)), headers
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    assert "a1" in console.export_text()
    if order == "load":
        assert "load ratio" in headers


# --- streams against a service that is not up ---------------------------------------


@pytest.mark.parametrize(
    ("service", "args"),
    [
        ("orchestrator", ("events", "tail", "--until-caught-up", "--orchestrator")),
        ("orchestrator", ("events", "tail", "-n", "1", "--orchestrator")),
        ("registry", ("registry", "watch", "--registry")),
        ("consensus service", ("proposals", "watch", "--consensus")),
        ("market", ("market", "watch", "--market")),
        ("swarm service", ("hive", "show", "--watch", "--swarm")),
        ("stigmergy service", ("field", "show", "-t", "food", "--watch", "--stigmergy")),
    ],
)
def test_a_stream_to_nothing_exits_at_once_naming_the_address(
    tmp_path,  # type: ignore[no-untyped-def]
    service: str,
    args: tuple[str, ...],
) -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    result = cli(tmp_path, *args, address, timeout=20)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot reach the {service} at {address} (UNAVAILABLE): {HINT}\n"
    )
    assert result.stdout == ""


# --- --json on streams: one compact object per line -------------------------------------


async def test_registry_watch_json_is_one_object_per_line(registry_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with RegistryClient(registry_server.address) as client:
        for i in range(2):
            await client.register(
                Identity.generate(f"watched-{i}"),
                address=f"127.0.0.1:{9100 + i}",
                capabilities=["compute"],
                lease_ttl_s=60,
            )
    lines = await stream_lines(
        tmp_path, 2, "registry", "watch", "--json", "--registry", registry_server.address
    )
    # Every line is a whole object (later lines: health changes of the fakes).
    events = [json.loads(line) for line in lines]
    assert {e["agent"]["card"]["agent_id"] for e in events[:2]} == {"watched-0", "watched-1"}
    assert all(e["snapshot"] for e in events[:2])


@pytest.fixture
async def consensus(registry_server, tmp_path) -> AsyncIterator[Cluster]:  # type: ignore[no-untyped-def]
    c = Cluster(registry_server, str(tmp_path))
    await c.trust.start()
    await c.start_consensus()
    try:
        yield c
    finally:
        await c.stop_consensus()
        await c.trust.stop()


async def test_proposals_watch_json_is_one_object_per_line(consensus: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    voters = await consensus.register(3)
    async with ConsensusClient(consensus.address) as client:
        watch = client.watch(resume=False)
        start = (await anext(watch)).index
        await watch.aclose()
        p = (
            await client.propose("op", proposer_id="t", voter_ids=voters, voting_period_s=60)
        ).proposal
        for voter in voters[:2]:
            await client.vote(consensus.identities[voter], p.proposal_id)
    # After the proposal's own event (--from-index 0 would mean "from now on").
    at = ("--from-index", str(start + 1), "--consensus", consensus.address)
    lines = await stream_lines(tmp_path, 2, "proposals", "watch", "--json", *at)
    # Every line is a whole object (a third may be the decision).
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events[:2]] == ["EVENT_TYPE_VOTE_RECORDED"] * 2
    assert {e["proposal"]["proposal_id"] for e in events} == {p.proposal_id}


# --- proposals check ----------------------------------------------------------------------


async def test_proposals_check_uses_the_proposals_strategy(consensus: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    voters = await consensus.register(10)
    async with ConsensusClient(consensus.address) as client:
        p = (
            await client.propose(
                "op",
                proposer_id="t",
                strategy="simple-majority",
                voter_ids=voters,
                voting_period_s=60,
            )
        ).proposal
        for voter in voters[:6]:
            await client.vote(consensus.identities[voter], p.proposal_id)
    pid = p.proposal_id
    at = ("--consensus", consensus.address)
    code, out, err = await acli(tmp_path, "proposals", "check", pid, *at)
    assert code == 0, err
    assert "consensus: 6 approvals, 6 needed of 10 (simple-majority)" in out
    code, out, err = await acli(tmp_path, "proposals", "check", pid, "--strategy", "byzantine", *at)
    assert code == 0, err
    assert "no consensus: 6 approvals, 7 needed of 10 (byzantine)" in out
    code, out, err = await acli(tmp_path, "proposals", "check", pid, "--total", "5", *at)
    assert code == 1 and out == ""
    assert err == (
        f"error: --total 5 is smaller than the 6 votes already recorded on {pid} (6 approvals)\n"
    )
    code, out, err = await acli(tmp_path, "proposals", "check", pid, "--total", "6", *at)
    assert code == 0 and "consensus: 6 approvals, 4 needed of 6" in out, out + err


# --- cluster up over a running cluster -------------------------------------------------------


def test_cluster_up_refuses_to_start_over_a_running_cluster(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = os.path.join(str(tmp_path), "state")
    os.makedirs(state)
    # A live process that looks like one of ours, as a saved state file names it.
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "services.registry"]
    )
    try:
        with open(os.path.join(state, "cluster.json"), "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "state_dir": state,
                    "services": ["registry"],
                    "procs": [
                        {
                            "name": "registry",
                            "kind": "service",
                            "pid": sleeper.pid,
                            "log_path": "",
                            "address": "127.0.0.1:1",
                        }
                    ],
                },
                fh,
            )
        result = cli(tmp_path, "cluster", "up", "--detach", "--agents", "0")
        assert result.returncode == 1
        assert result.stderr == (
            f"error: a cluster is already running (state in {state}): "
            "stop it with `agent2028 cluster down`\n"
        )
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cluster_up_on_a_taken_default_port_suggests_ephemeral_ports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 50051))  # the registry's default port
    except OSError:
        listener.close()
        pytest.skip("port 50051 is in use here already")
    listener.listen()
    try:
        result = cli(tmp_path, "cluster", "up", "--detach", "--agents", "0")
    finally:
        listener.close()
        cli(tmp_path, "cluster", "down")  # should it have started anything after all
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "already in use" in result.stderr and "--ephemeral-ports" in result.stderr


def test_a_launch_failure_is_one_line_without_the_services_traceback() -> None:
    log_tail = (
        'Traceback (most recent call last):\n  File "bootstrap.py", line 137, in start\n'
        "RuntimeError: Failed to bind to address 127.0.0.1:50051; set GRPC_VERBOSITY=debug "
        "environment variable to see detailed error message.\n"
    )
    message = _launch_error(LaunchError(f"registry exited during start-up:\n{log_tail}"))
    assert message == (
        "registry exited during start-up: cannot bind 127.0.0.1:50051 (already in use?): "
        "pass --ephemeral-ports to bind free ports instead"
    )
    other = _launch_error(LaunchError("trust exited during start-up:\n  File x\nValueError: no\n"))
    assert other == "trust exited during start-up: ValueError: no"
