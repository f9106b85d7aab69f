"""The swarm tier with real processes: voter agents decide and the hive adopts
it across a kill -9 of the swarm service; walker agents lay the guide's 6.3
trail and follower agents climb to food (6.1); the CLI drives all of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clients.launcher import FAST_FAILURE_DETECTION
from clients.registry import RegistryClient
from clients.stigmergy import StigmergyClient
from clients.swarm import SwarmClient
from services.common.crypto import Identity
from tests.cluster.conftest import dump_logs
from tests.support import eventually

TIER = ["registry", "stigmergy", "swarm"]


async def test_voter_processes_decide_and_the_hive_survives_kill_9(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(FAST_FAILURE_DETECTION, services=TIER)
    await cluster.start()
    async with SwarmClient(cluster.address("swarm")) as swarm:
        pool = await swarm.create_pool("scale_infrastructure", threshold="super", duration_s=600)
        voters = [("voter-1", "approve:0.9"), ("voter-2", "approve:0.8"), ("voter-3", "reject:0.6")]
        for agent_id, spec in voters:
            extra = ["--pool-vote", spec]
            if agent_id == "voter-1":
                extra += ["--belief", "system_overloaded=0.7", "--intend", "notify_admin"]
            await cluster.spawn_agent(agent_id, ["compute"], extra_args=extra, wait=False)

        async def decided() -> bool:
            result = await swarm.get_consensus(pool.pool_id)
            return result.vote_count == 3 and (await swarm.get_hive()).generation >= 2

        await eventually(decided, timeout_s=60, what=f"three votes\n{dump_logs(cluster)}")
        result = await swarm.get_consensus(pool.pool_id)
        assert (result.decision, round(result.confidence, 3)) == ("approve", 0.739)
        before = await swarm.get_hive()
        adopted = await swarm.update_from_vote(pool.pool_id)
        assert adopted.generation > before.generation

    await cluster.kill("swarm")
    await cluster.restart_service("swarm")
    async with SwarmClient(cluster.address("swarm")) as swarm:
        after = await swarm.get_consensus(pool.pool_id)
        assert (after.decision, after.vote_count) == ("approve", 3)
        state = await swarm.get_hive()
        assert state.generation == adopted.generation
        assert {b.name for b in state.beliefs} == {
            "system_overloaded",
            "scale_infrastructure:approve",
        }
        # The voters' watch streams reconnect by themselves and they vote again.
        second = await swarm.create_pool("after_the_restart", duration_s=600)

        async def voted_again() -> bool:
            return (await swarm.get_consensus(second.pool_id)).vote_count == 3

        await eventually(
            voted_again, timeout_s=60, what=f"votes after the restart\n{dump_logs(cluster)}"
        )


async def test_walkers_lay_a_trail_and_followers_climb_to_food(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # The guide's trail settings: slower decay, faster diffusion.
    env = dict(
        FAST_FAILURE_DETECTION,
        STIGMERGY_DECAY_RATE="0.05",
        STIGMERGY_DIFFUSION_RATE="0.1",
        STIGMERGY_TICK_INTERVAL_S="0.5",
    )
    cluster = make_cluster(env, services=TIER)
    await cluster.start()
    scout = Identity.generate("scout")
    async with RegistryClient(cluster.address("registry")) as registry:
        await registry.register(
            scout, address="127.0.0.1:9", capabilities=["compute"], lease_ttl_s=600
        )
    async with StigmergyClient(cluster.address("stigmergy")) as field:
        await field.deposit(scout, 500, 500, "food", 5.0)
        starts = [(440, 500), (560, 470), (500, 420)]
        for i, (x, y) in enumerate(starts):
            await cluster.spawn_agent(
                f"follower-{i}",
                ["compute"],
                extra_args=["--field", f"follow:food@{x},{y}"],
                env={"AGENT_FIELD_STEP_S": "0.05", "AGENT_FIELD_SPEED": "4"},
                wait=False,
            )
        for i in range(10):
            await cluster.spawn_agent(
                f"walker-{i}",
                ["compute"],
                extra_args=["--field", "walk:success_trail@0,0>999,999"],
                env={"AGENT_FIELD_STEP_S": "0.02", "AGENT_FIELD_SPEED": "20"},
                wait=False,
            )

        async def trail_complete() -> bool:
            return (await field.find_nearest(985, 985, "success_trail", radius=30)).found

        await eventually(trail_complete, timeout_s=90, what=f"the trail\n{dump_logs(cluster)}")
        view = await field.sense("success_trail", columns=20, rows=20, aggregation="mean")
        cells = [[view.values[r * 20 + c] for c in range(20)] for r in range(20)]
        on_path = sum(cells[i][i] for i in range(20)) / 20
        elsewhere = [cells[r][c] for r in range(20) for c in range(20) if abs(r - c) > 2]
        assert all(cells[i][i] > 0 for i in range(20))
        assert on_path > 100 * (sum(elsewhere) / len(elsewhere) + 1e-12)

        async def followers_arrived() -> bool:
            near_food = await field.find_nearest(500.5, 500.5, "trail", radius=4)
            return near_food.found

        await eventually(
            followers_arrived, timeout_s=60, what=f"followers at the food\n{dump_logs(cluster)}"
        )
        for x, y in starts:
            assert (await field.find_nearest(x, y, "trail", radius=6)).found


def cli(state_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AGENT2028_STATE_DIR=state_dir, COLUMNS="160")
    for name in ("REGISTRY_ADDR", "STIGMERGY_ADDR", "SWARM_ADDR"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_drives_the_swarm_tier(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = os.path.join(str(tmp_path), "state")
    up = cli(state, "cluster", "up", "--detach", "--agents", "2", "--ephemeral-ports")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        deposit = cli(state, "field", "deposit", "500", "500", "-t", "food", "--agent", "agent-001")
        assert deposit.returncode == 0, deposit.stderr
        gradient = json.loads(
            cli(state, "field", "gradient", "450", "500", "-t", "food", "--json").stdout
        )
        assert gradient["dx"] > 0.99 and not gradient["flat"]
        show = cli(
            state,
            "field",
            "show",
            "-t",
            "food",
            "--region",
            "480,480,520,520",
            "--columns",
            "20",
            "--lines",
            "10",
        )
        assert show.returncode == 0 and "@" in show.stdout and "x 480..520" in show.stdout, (
            show.stdout
        )
        outside = cli(state, "field", "read", "1000", "5", "-t", "food")
        assert (
            outside.returncode == 1
            and "INVALID_ARGUMENT" in outside.stderr
            and "field x" in outside.stderr
        )

        pool = json.loads(
            cli(
                state, "swarm", "pool", "create", "deploy", "--threshold", "simple", "--json"
            ).stdout
        )
        for agent_id, decision in (("agent-001", "approve"), ("agent-002", "approve")):
            voted = cli(
                state,
                "swarm",
                "pool",
                "vote",
                pool["pool_id"],
                decision,
                "--confidence",
                "0.9",
                "--agent",
                agent_id,
            )
            assert voted.returncode == 0, voted.stderr
        result = json.loads(cli(state, "swarm", "pool", "result", pool["pool_id"], "--json").stdout)
        assert (result["decision"], result["status"]) == ("approve", "POOL_STATUS_DECIDED")
        belief = cli(state, "hive", "belief", "system_overloaded", "0.7", "--agent", "agent-002")
        assert belief.returncode == 0, belief.stderr
        conflict = cli(
            state,
            "hive",
            "intend",
            "notify_admin",
            "--agent",
            "agent-001",
            "--expect-generation",
            "0",
        )
        assert conflict.returncode == 1 and "ABORTED" in conflict.stderr
        adopted = json.loads(cli(state, "hive", "adopt", pool["pool_id"], "--json").stdout)
        assert adopted["generation"] == "2" and adopted["changed"]  # int64 is a string in JSON
        hive = cli(state, "hive", "show")
        assert "deploy:approve" in hive.stdout and "generation 2" in hive.stdout

        flock = json.loads(
            cli(
                state, "flock", "create", "100", "--seed", "3", "--world", "250x250", "--json"
            ).stdout
        )
        stepped = cli(state, "flock", "step", flock["flock_id"], "--steps", "100")
        assert stepped.returncode == 0 and "step    100" in stepped.stdout, stepped.stdout
        picture = cli(state, "flock", "show", flock["flock_id"])
        assert picture.returncode == 0 and "order" in picture.stdout
        too_many = cli(state, "flock", "create", "1000000")
        assert too_many.returncode == 1 and "field boids" in too_many.stderr
    finally:
        down = cli(state, "cluster", "down")
    assert down.returncode == 0, down.stderr
