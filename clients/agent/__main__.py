"""python -m clients.agent: run one agent process with built-in handlers.

Flags override the environment: AGENT_ID, AGENT_CAPABILITIES (comma list),
REGISTRY_ADDR, AGENT_KEY_FILE, AGENT_DATA_DIR, AGENT_MAX_CONCURRENCY,
AGENT_BIND_HOST, AGENT_ADVERTISE_HOST, AGENT_PORT, AGENT_FAULTS, AGENT_METADATA
(k=v,k=v), AGENT_LEASE_TTL_S, READY_FILE, AGENT2028_PARENT_PID, LOG_LEVEL,
MARKET_ADDR (bid on the market's tasks when set) and AGENT_BID_POLICY.
Swarm tier (each off unless given): STIGMERGY_ADDR with AGENT_FIELD (see
clients/agent/pheromones.py), SWARM_ADDR with AGENT_POOL_VOTE (swarm_voting.py),
AGENT_BELIEFS and AGENT_INTENTIONS (hive.py).
Voting: CONSENSUS_ADDR (unset: the agent does not vote), AGENT_VOTE_POLICY.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvloop

from clients.agent.bidding import POLICIES, MarketBehaviour
from clients.agent.faults import FaultPlan
from clients.agent.runtime import Agent
from clients.agent.voting import POLICY_HELP, Voting
from services.common.config import TlsConfig
from services.common.logs import setup_logging
from services.common.validation import require_address


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m clients.agent", description="Run one Agent2028 agent process."
    )
    p.add_argument(
        "--id",
        default=env.get("AGENT_ID") or f"agent-{socket.gethostname()}",
        help="agent id (default agent-<hostname>)",
    )
    p.add_argument(
        "--capability", action="append", default=None, help="a capability to hold (repeatable)"
    )
    p.add_argument("--registry", default=env.get("REGISTRY_ADDR", "127.0.0.1:50051"))
    p.add_argument("--key-file", default=env.get("AGENT_KEY_FILE"))
    p.add_argument("--data-dir", default=env.get("AGENT_DATA_DIR"))
    p.add_argument(
        "--max-concurrency", type=int, default=int(env.get("AGENT_MAX_CONCURRENCY", "8"))
    )
    p.add_argument("--bind-host", default=env.get("AGENT_BIND_HOST", "127.0.0.1"))
    p.add_argument("--advertise-host", default=env.get("AGENT_ADVERTISE_HOST"))
    p.add_argument("--port", type=int, default=int(env.get("AGENT_PORT", "0")))
    p.add_argument(
        "--fault",
        action="append",
        default=None,
        help="a fault mode for tests (repeatable): "
        + ", ".join(("crash", "slow:MS", "fail", "unhealthy", "forge-receipts", "lie-bids")),
    )
    p.add_argument("--metadata", action="append", default=None, help="key=value (repeatable)")
    p.add_argument("--lease-ttl", type=float, default=float(env.get("AGENT_LEASE_TTL_S", "0")))
    p.add_argument("--ready-file", default=env.get("READY_FILE"))
    p.add_argument("--metrics-port", type=int, default=int(env.get("METRICS_PORT", "-1")))
    p.add_argument(
        "--market",
        default=env.get("MARKET_ADDR"),
        help="market address: watch its open tasks and bid (default MARKET_ADDR)",
    )
    p.add_argument(
        "--bid-policy",
        default=env.get("AGENT_BID_POLICY", "balanced"),
        choices=POLICIES,
        help="how to bid on market tasks",
    )
    p.add_argument("--stigmergy", default=env.get("STIGMERGY_ADDR", "127.0.0.1:50056"))
    p.add_argument("--swarm", default=env.get("SWARM_ADDR", "127.0.0.1:50057"))
    p.add_argument(
        "--field",
        default=env.get("AGENT_FIELD"),
        help="live on the pheromone field: forage[:TYPE] | follow:TYPE[@X,Y] | walk:TYPE@X,Y>X,Y",
    )
    p.add_argument(
        "--pool-vote",
        default=env.get("AGENT_POOL_VOTE"),
        help="vote in swarm pools: DECISION[:CONFIDENCE[:WEIGHT]] or random",
    )
    p.add_argument(
        "--belief", action="append", default=None, help="NAME=CONFIDENCE for the hive (repeatable)"
    )
    p.add_argument(
        "--intend", action="append", default=None, help="an intention for the hive (repeatable)"
    )
    p.add_argument(
        "--consensus",
        default=env.get("CONSENSUS_ADDR"),
        help="consensus address; the agent votes on proposals only when it is set",
    )
    p.add_argument(
        "--vote-policy",
        default=env.get("AGENT_VOTE_POLICY") or "approve",
        help=f"how to vote: {POLICY_HELP} (default approve)",
    )
    args = p.parse_args(argv)
    args.capability = args.capability or _split(env.get("AGENT_CAPABILITIES")) or ["compute"]
    args.fault = args.fault or _split(env.get("AGENT_FAULTS"))
    args.metadata = args.metadata or _split(env.get("AGENT_METADATA"))
    args.belief = args.belief or _split(env.get("AGENT_BELIEFS"))
    args.intend = args.intend or _split(env.get("AGENT_INTENTIONS"))
    return args


def add_swarm_tier(agent: Agent, args: argparse.Namespace) -> None:
    """The swarm-tier behaviours the flags ask for (ValueError for a bad spec)."""
    from clients.agent import hive, pheromones, swarm_voting

    if args.field:
        policy = pheromones.FieldPolicy.parse(
            args.field,
            step_s=float(os.environ.get("AGENT_FIELD_STEP_S", "0.1")),
            speed=float(os.environ.get("AGENT_FIELD_SPEED", "10")),
        )
        agent.add_behaviour(pheromones.behaviour(policy, args.stigmergy))
    if args.pool_vote:
        agent.add_behaviour(
            swarm_voting.behaviour(swarm_voting.VotePolicy.parse(args.pool_vote), args.swarm)
        )
    if args.belief or args.intend:
        agent.add_behaviour(
            hive.behaviour(
                hive.parse_beliefs(args.belief), hive.parse_intentions(args.intend), args.swarm
            )
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging("agent", os.environ.get("LOG_LEVEL", "INFO"))
    try:
        metadata = dict(item.split("=", 1) for item in args.metadata)
        agent = Agent(
            args.id,
            registry=args.registry,
            capabilities=args.capability,
            key_file=args.key_file,
            max_concurrency=args.max_concurrency,
            metadata=metadata,
            bind_host=args.bind_host,
            advertise_host=args.advertise_host,
            port=args.port,
            data_dir=args.data_dir,
            faults=FaultPlan.parse(args.fault),
            lease_ttl_s=args.lease_ttl,
            metrics_port=args.metrics_port,
            tls=TlsConfig.from_env(),
        )
        if args.market and args.bid_policy != "off":
            agent.add_behaviour(MarketBehaviour(args.market, args.bid_policy))
        add_swarm_tier(agent, args)
        if args.consensus and args.vote_policy != "none":
            require_address(args.consensus, "--consensus")
            agent.add_behaviour(Voting(args.consensus, args.vote_policy))
    except (ValueError, OSError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # InvalidArgument from validation of the id or capabilities
        print(f"agent: {exc}", file=sys.stderr)
        sys.exit(2)
    parent = int(os.environ.get("AGENT2028_PARENT_PID", "0") or 0) or None
    uvloop.run(agent.run_until_signalled(ready_file=args.ready_file, parent_pid=parent))
    sys.exit(0)


if __name__ == "__main__":
    main()
