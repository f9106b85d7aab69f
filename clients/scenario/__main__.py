"""python -m clients.scenario (make run): the cluster on this machine, narrated."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile

import uvloop

from clients.launcher import FAST_FAILURE_DETECTION, LaunchError, LocalCluster
from clients.scenario import (
    broker_chapter,
    consensus_chapter,
    market_chapter,
    orchestrator_chapter,
    registry_chapter,
    swarm_chapter,
)
from clients.scenario.narrator import Narrator
from clients.scenario.scene import Scene

CHAPTERS = [
    registry_chapter.agents_register,
    registry_chapter.capability_lookup,
    registry_chapter.failure_detection,
    registry_chapter.registry_restart,
    broker_chapter.strategies_and_receipts,
    broker_chapter.trust_moves,
    consensus_chapter.byzantine_consensus,
    market_chapter.market_auctions,
    market_chapter.market_load_balancing,
    market_chapter.market_liar,
    swarm_chapter.swarm_vote,
    swarm_chapter.pheromone_trail,
    swarm_chapter.flock_aligns,
    orchestrator_chapter.event_stream,
]


async def main() -> int:
    narrator = Narrator()
    narrator.title("Agent2028", "a cluster of gRPC services coordinating real agent processes")
    state_dir = tempfile.mkdtemp(prefix="agent2028-run-")
    cluster = LocalCluster(state_dir, ephemeral_ports=True, env=FAST_FAILURE_DETECTION)
    scene = Scene(cluster, narrator)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_interrupt() -> None:
        interrupted.set()
        if main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_interrupt)
    ok = False
    try:
        narrator.chapter("The cluster starts")
        await cluster.start()
        narrator.table(
            "Services",
            ["service", "pid", "gRPC", "metrics"],
            [
                [p.name, str(p.pid), p.address, f"http://127.0.0.1:{p.metrics_port}/metrics"]
                for p in cluster.procs.values()
                if p.kind == "service"
            ],
        )
        await scene.connect()
        narrator.say(
            "The orchestrator is the front door: it routes operations to the individual and"
        )
        narrator.say(
            "swarm tiers, watches every service's health, and streams every service's changes"
        )
        narrator.say("onto its event bus: the │ lines below are that bus, one Subscribe.")
        for chapter in CHAPTERS:
            await chapter(scene)
        ok = True
    except asyncio.CancelledError:
        narrator.warn("interrupted; shutting everything down")
    except (LaunchError, TimeoutError, AssertionError) as exc:
        narrator.warn(f"scenario failed: {exc}")
    finally:
        await scene.close()
        narrator.chapter("Shutdown")
        codes = await asyncio.shield(cluster.stop())
        clean = sum(1 for code in codes.values() if code == 0)
        narrator.ok(f"stopped {len(codes)} processes ({clean} exited 0 after draining)")
        if ok:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            narrator.say(f"logs kept in {os.path.join(state_dir, 'logs')}")
    return 0 if ok else (130 if interrupted.is_set() else 1)


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
