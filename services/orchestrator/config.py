"""Orchestrator settings from the environment (ORCHESTRATOR_*, every
<PEER>_ADDR, DB_SYNCHRONOUS), validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.config import ConfigError, env_addr, env_bool, env_float, env_int, env_str
from services.common.errors import InvalidArgument
from services.common.validation import require_id

DEFAULT_PORT = 50050

# Every service the orchestrator reaches, with its default port.
PEERS: dict[str, int] = {
    "registry": 50051,
    "broker": 50052,
    "consensus": 50053,
    "trust": 50054,
    "market": 50055,
    "stigmergy": 50056,
    "swarm": 50057,
}


@dataclass(frozen=True)
class OrchestratorConfig:
    # service name -> host:port
    addresses: dict[str, str]
    # Who the orchestrator is to the other services: the default coordinator
    # of ExecuteWithConsensus and the signer of its own trust observations.
    orchestrator_id: str = "orchestrator"
    # None: DATA_DIR/orchestrator.key.
    key_file: str | None = None
    # Events the bus keeps (in memory and on disk) for resuming subscribers.
    event_history: int = 10_000
    # Events a subscriber may have queued before it is told it lagged.
    subscriber_queue: int = 1024
    default_timeout_s: float = 30.0
    max_timeout_s: float = 600.0
    # Finished operations kept for GetOperation and retries.
    operation_history: int = 100_000
    # How often open voting pools are checked for their close (the swarm's
    # pool stream announces openings only).
    pool_poll_s: float = 0.5
    # How often the pheromone field's layers are summarised into events.
    field_poll_s: float = 2.0
    # A layer's total must move by this fraction to make a layer_updated event.
    field_change: float = 0.25
    # Market tasks the bridge runs through the broker at once.
    bridge_concurrency: int = 16
    # The bridge adopts every pool that closes decided, not only the ones a
    # CollectiveDecision asked it to.
    adopt_all_pools: bool = True
    # Deadline of one call to another service (operations pass on less when
    # their own time is shorter).
    call_timeout_s: float = 5.0
    # Delay before reconnecting a watch or health stream.
    retry_s: float = 0.5
    db_synchronous: str = "NORMAL"
    sources: tuple[str, ...] = field(
        default=("registry", "trust", "consensus", "market", "swarm", "hive", "stigmergy")
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrchestratorConfig:
        orchestrator_id = env_str("ORCHESTRATOR_ID", "orchestrator", env=env) or "orchestrator"
        try:
            require_id(orchestrator_id, "ORCHESTRATOR_ID")
        except InvalidArgument as exc:
            raise ConfigError(f"ORCHESTRATOR_ID={orchestrator_id!r}: {exc}") from None
        default_timeout = env_float(
            "ORCHESTRATOR_DEFAULT_TIMEOUT_S", 30.0, lo=1.0, hi=3600.0, env=env
        )
        max_timeout = env_float("ORCHESTRATOR_MAX_TIMEOUT_S", 600.0, lo=1.0, hi=86_400.0, env=env)
        if default_timeout > max_timeout:
            raise ConfigError(
                "ORCHESTRATOR_DEFAULT_TIMEOUT_S must not exceed ORCHESTRATOR_MAX_TIMEOUT_S"
            )
        all_sources = ("registry", "trust", "consensus", "market", "swarm", "hive", "stigmergy")
        sources_text = env_str("ORCHESTRATOR_SOURCES", ",".join(all_sources), env=env) or ""
        sources = tuple(s.strip() for s in sources_text.split(",") if s.strip())
        unknown = [s for s in sources if s not in all_sources]
        if unknown:
            raise ConfigError(
                f"ORCHESTRATOR_SOURCES: unknown {', '.join(unknown)}; "
                f"expected some of {', '.join(all_sources)}"
            )
        return cls(
            addresses={
                name: env_addr(f"{name.upper()}_ADDR", f"127.0.0.1:{port}", env=env)
                for name, port in PEERS.items()
            },
            orchestrator_id=orchestrator_id,
            key_file=env_str("ORCHESTRATOR_KEY_FILE", env=env),
            event_history=env_int(
                "ORCHESTRATOR_EVENT_HISTORY", 10_000, lo=10, hi=10_000_000, env=env
            ),
            subscriber_queue=env_int(
                "ORCHESTRATOR_SUBSCRIBER_QUEUE", 1024, lo=1, hi=1_000_000, env=env
            ),
            default_timeout_s=default_timeout,
            max_timeout_s=max_timeout,
            operation_history=env_int(
                "ORCHESTRATOR_OPERATION_HISTORY", 100_000, lo=10, hi=100_000_000, env=env
            ),
            pool_poll_s=env_float("ORCHESTRATOR_POOL_POLL_S", 0.5, lo=0.01, hi=60.0, env=env),
            field_poll_s=env_float("ORCHESTRATOR_FIELD_POLL_S", 2.0, lo=0.05, hi=3600.0, env=env),
            field_change=env_float("ORCHESTRATOR_FIELD_CHANGE", 0.25, lo=0.0, hi=100.0, env=env),
            bridge_concurrency=env_int(
                "ORCHESTRATOR_BRIDGE_CONCURRENCY", 16, lo=1, hi=10_000, env=env
            ),
            adopt_all_pools=env_bool("ORCHESTRATOR_ADOPT_ALL_POOLS", True, env=env),
            call_timeout_s=env_float("ORCHESTRATOR_CALL_TIMEOUT_S", 5.0, lo=0.1, hi=300.0, env=env),
            retry_s=env_float("ORCHESTRATOR_RETRY_S", 0.5, lo=0.01, hi=60.0, env=env),
            db_synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
            sources=sources,
        )
