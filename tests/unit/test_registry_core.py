"""Registry core: fitness, the ordered index, hysteresis, leases, watch history."""

from __future__ import annotations

import random
import time

import pytest

from services.common import signing
from services.common.crypto import Identity
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from services.registry.core import EventType, Order, RegistryCore, RegistrySettings, Status, fitness


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = time.time()

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def make_core(clock: Clock, **settings: object) -> RegistryCore:
    defaults: dict[str, object] = dict(
        heartbeat_interval_s=1.0, lease_ttl_s=5.0, deregister_critical_after_s=3.0
    )
    defaults.update(settings)
    return RegistryCore(
        RegistrySettings(**defaults), clock=lambda: clock.mono, wall_clock=lambda: clock.wall
    )  # type: ignore[arg-type]


def register(
    core: RegistryCore,
    clock: Clock,
    agent_id: str,
    caps=("compute",),
    *,
    identity: Identity | None = None,
    address: str = "127.0.0.1:9000",
    max_concurrency: int = 10,
    issue_ns: int | None = None,
):  # type: ignore[no-untyped-def]
    identity = identity or Identity.generate(agent_id)
    issue = issue_ns if issue_ns is not None else int(clock.wall * 1e9)
    proof = identity.sign(
        *signing.registration(
            agent_id, address, list(caps), max_concurrency, {}, identity.public_key, issue
        )
    )
    record, refreshed = core.register(
        agent_id=agent_id,
        address=address,
        capabilities=list(caps),
        max_concurrency=max_concurrency,
        metadata={},
        public_key=identity.public_key,
        issue_ns=issue,
        proof=proof,
    )
    return record, identity, refreshed


# --- fitness ----------------------------------------------------------------------


def test_fitness_matches_the_formula() -> None:
    # 0.3*h + 0.3*lw/(1+lat/100) + 0.2*rw*rel + 0.2*clamp(1-load/max)
    value = fitness(0.9, 50.0, 0.95, 20, 100, latency_weight=0.5, reliability_weight=0.5)
    expected = 0.3 * 0.9 + 0.3 * 0.5 / 1.5 + 0.2 * 0.5 * 0.95 + 0.2 * 0.8
    assert value == pytest.approx(expected)


def test_fitness_is_zero_without_the_capability() -> None:
    assert fitness(1.0, 0.0, 1.0, 0, 10, holds_capability=False) == 0.0


def test_fitness_clamps_spare_capacity_and_guards_max_concurrency() -> None:
    overloaded = fitness(1.0, 0.0, 1.0, 500, 100)
    idle = fitness(1.0, 0.0, 1.0, 0, 100)
    assert idle - overloaded == pytest.approx(0.2)
    assert overloaded == pytest.approx(0.3 + 0.15 + 0.1)
    with pytest.raises(InvalidArgument):
        fitness(1.0, 0.0, 1.0, 0, 0)


def test_lower_latency_and_higher_reliability_raise_fitness() -> None:
    assert fitness(1.0, 10.0, 0.9, 0, 10) > fitness(1.0, 40.0, 0.9, 0, 10)
    assert fitness(1.0, 10.0, 0.99, 0, 10) > fitness(1.0, 10.0, 0.95, 0, 10)


# --- registration -------------------------------------------------------------------


def test_register_and_refresh_with_the_same_key() -> None:
    clock = Clock()
    core = make_core(clock)
    record, identity, refreshed = register(core, clock, "agent-1")
    assert not refreshed and record.status is Status.PASSING
    first_lease = record.lease_id
    clock.advance(0.1)
    record2, _, refreshed2 = register(
        core, clock, "agent-1", identity=identity, address="127.0.0.1:9001"
    )
    assert refreshed2 and record2.address == "127.0.0.1:9001"
    assert record2.lease_id != first_lease
    assert [e.type for e in core.retained_events()] == [EventType.REGISTERED, EventType.UPDATED]


def test_same_id_under_another_key_is_refused_and_the_first_keeps_its_entry() -> None:
    clock = Clock()
    core = make_core(clock)
    record, _, _ = register(core, clock, "agent-1", address="127.0.0.1:9000")
    with pytest.raises(AlreadyExists):
        register(core, clock, "agent-1", address="127.0.0.1:6666")
    assert core.get("agent-1").address == "127.0.0.1:9000"
    assert core.get("agent-1").public_key == record.public_key


def test_a_forged_proof_is_unauthenticated() -> None:
    clock = Clock()
    core = make_core(clock)
    real = Identity.generate("agent-1")
    other = Identity.generate("agent-1")
    issue = int(clock.wall * 1e9)
    proof = other.sign(
        *signing.registration("agent-1", "127.0.0.1:1", ["compute"], 1, {}, real.public_key, issue)
    )
    with pytest.raises(Unauthenticated) as err:
        core.register(
            agent_id="agent-1",
            address="127.0.0.1:1",
            capabilities=["compute"],
            max_concurrency=1,
            metadata={},
            public_key=real.public_key,
            issue_ns=issue,
            proof=proof,
        )
    assert err.value.field == "proof_of_possession"
    assert "agent-1" not in core.agents


def test_a_replayed_older_registration_is_refused() -> None:
    clock = Clock()
    core = make_core(clock)
    issue = int(clock.wall * 1e9)
    _, identity, _ = register(core, clock, "agent-1", issue_ns=issue)
    with pytest.raises(PermissionDenied):
        register(core, clock, "agent-1", identity=identity, issue_ns=issue)


def test_registration_far_from_the_registry_clock_is_refused() -> None:
    clock = Clock()
    core = make_core(clock)
    with pytest.raises(InvalidArgument) as err:
        register(core, clock, "agent-1", issue_ns=int((clock.wall - 3600) * 1e9))
    assert err.value.field == "issue_time"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("card.agent_id", {"agent_id": ""}),
        ("card.agent_id", {"agent_id": "x" * 129}),
        ("card.agent_id", {"agent_id": "bad id!"}),
        ("card.address", {"address": "no-port"}),
        ("card.address", {"address": "host:70000"}),
        ("card.address", {"address": "bad host:80"}),
        ("card.capabilities[0]", {"capabilities": ["Bad.Cap"]}),
        ("card.capabilities", {"capabilities": []}),
        ("card.max_concurrency", {"max_concurrency": 0}),
        ("card.public_key", {"public_key": b"short"}),
        ("card.metadata", {"metadata": {f"k{i}": "v" for i in range(40)}}),
    ],
)
def test_bad_registrations_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    clock = Clock()
    core = make_core(clock)
    identity = Identity.generate("agent-1")
    values: dict[str, object] = dict(
        agent_id="agent-1",
        address="127.0.0.1:9000",
        capabilities=["compute"],
        max_concurrency=4,
        metadata={},
        public_key=identity.public_key,
        issue_ns=int(clock.wall * 1e9),
        proof=b"x" * 64,
    )
    values.update(kwargs)
    with pytest.raises(InvalidArgument) as err:
        core.register(**values)  # type: ignore[arg-type]
    assert err.value.field == field
    assert not core.agents


def test_deregister_needs_the_agents_own_signature() -> None:
    clock = Clock()
    core = make_core(clock)
    _, identity, _ = register(core, clock, "agent-1")
    clock.advance(0.01)
    issue = int(clock.wall * 1e9)
    impostor = Identity.generate("agent-1")
    with pytest.raises(Unauthenticated):
        core.deregister("agent-1", issue, impostor.sign(*signing.deregistration("agent-1", issue)))
    assert "agent-1" in core.agents
    core.deregister("agent-1", issue, identity.sign(*signing.deregistration("agent-1", issue)))
    assert "agent-1" not in core.agents
    assert core.retained_events()[-1].type is EventType.DEREGISTERED
    with pytest.raises(NotFound):
        core.get("agent-1")


# --- heartbeats and health ------------------------------------------------------------


def heartbeat(
    core: RegistryCore, record, health: float = 1.0, load: int = 0, latency: float = 10.0
):  # type: ignore[no-untyped-def]
    return core.heartbeat(
        record.agent_id, record.lease_id, load=load, health=health, latency_ms=latency
    )


def test_heartbeat_stream_must_open_with_a_valid_signature() -> None:
    clock = Clock()
    core = make_core(clock)
    record, identity, _ = register(core, clock, "agent-1")
    send = int(clock.wall * 1e9)
    with pytest.raises(Unauthenticated):
        core.open_heartbeat("agent-1", record.lease_id, send, b"\0" * 64)
    with pytest.raises(NotFound):
        core.open_heartbeat(
            "agent-1",
            "not-the-lease",
            send,
            identity.sign(*signing.heartbeat_open("agent-1", "not-the-lease", send)),
        )
    core.open_heartbeat(
        "agent-1",
        record.lease_id,
        send,
        identity.sign(*signing.heartbeat_open("agent-1", record.lease_id, send)),
    )


def test_heartbeat_for_an_unknown_agent_is_not_found() -> None:
    core = make_core(Clock())
    with pytest.raises(NotFound):
        core.heartbeat("ghost", "lease", load=0, health=1.0, latency_ms=0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"health": 1.5}, "health"),
        ({"health": float("nan")}, "health"),
        ({"load": -1}, "load"),
        ({"latency_ms": -3.0}, "observed_latency_ms"),
    ],
)
def test_heartbeat_values_are_validated(kwargs: dict[str, object], field: str) -> None:
    clock = Clock()
    core = make_core(clock)
    record, _, _ = register(core, clock, "agent-1")
    values: dict[str, object] = {"load": 0, "health": 1.0, "latency_ms": 1.0}
    values.update(kwargs)
    with pytest.raises(InvalidArgument) as err:
        core.heartbeat("agent-1", record.lease_id, **values)  # type: ignore[arg-type]
    assert err.value.field == field


def test_hysteresis_unhealthy_reports() -> None:
    clock = Clock()
    core = make_core(clock, failures_before_critical=3, successes_before_passing=2)
    record, _, _ = register(core, clock, "agent-1")
    heartbeat(core, record, health=0.2)
    assert record.status is Status.WARNING
    heartbeat(core, record, health=0.9)  # one good check does not bring it back
    assert record.status is Status.WARNING
    heartbeat(core, record, health=0.9)
    assert record.status is Status.PASSING
    for _ in range(2):
        heartbeat(core, record, health=0.1)
    assert record.status is Status.WARNING
    heartbeat(core, record, health=0.1)
    assert record.status is Status.CRITICAL
    heartbeat(core, record, health=1.0)
    assert record.status is Status.CRITICAL
    heartbeat(core, record, health=1.0)
    assert record.status is Status.PASSING
    changes = [
        (e.previous_status, e.agent.status)
        for e in core.retained_events()
        if e.type is EventType.HEALTH_CHANGED
    ]
    assert changes == [
        (Status.PASSING, Status.WARNING),
        (Status.WARNING, Status.PASSING),
        (Status.PASSING, Status.WARNING),
        (Status.WARNING, Status.CRITICAL),
        (Status.CRITICAL, Status.PASSING),
    ]


def test_missed_heartbeats_then_lease_expiry_then_deregistration() -> None:
    clock = Clock()
    core = make_core(
        clock,
        heartbeat_interval_s=1.0,
        lease_ttl_s=10.0,
        failures_before_critical=3,
        deregister_critical_after_s=3.0,
    )
    record, _, _ = register(core, clock, "agent-1")
    clock.advance(1.2)
    core.sweep()
    assert record.status is Status.PASSING  # within 1.5 intervals: not late yet
    clock.advance(0.4)  # 1.6 intervals: one missed check
    core.sweep()
    assert record.status is Status.WARNING
    clock.advance(2.0)  # 3.6 intervals: three missed checks
    core.sweep()
    assert record.status is Status.CRITICAL
    clock.advance(2.9)
    core.sweep()
    assert "agent-1" in core.agents
    clock.advance(0.2)
    core.sweep()
    assert "agent-1" not in core.agents
    assert core.retained_events()[-1].type is EventType.EXPIRED


def test_lease_ttl_alone_makes_an_agent_critical() -> None:
    clock = Clock()
    core = make_core(
        clock,
        heartbeat_interval_s=1.0,
        lease_ttl_s=2.0,
        failures_before_critical=100,
        deregister_critical_after_s=60.0,
    )
    record, _, _ = register(core, clock, "agent-1")
    clock.advance(2.1)
    core.sweep()
    assert record.status is Status.CRITICAL


def test_one_late_heartbeat_does_not_flap_a_passing_agent() -> None:
    clock = Clock()
    core = make_core(clock, heartbeat_interval_s=1.0, failures_before_critical=3)
    record, _, _ = register(core, clock, "agent-1")
    for _ in range(5):
        clock.advance(1.3)  # late, but within 1.5 intervals
        core.sweep()
        heartbeat(core, record)
    assert record.status is Status.PASSING
    assert not [e for e in core.retained_events() if e.type is EventType.HEALTH_CHANGED]


def test_a_critical_agent_that_heartbeats_again_recovers_without_reregistering() -> None:
    clock = Clock()
    core = make_core(
        clock,
        heartbeat_interval_s=1.0,
        lease_ttl_s=3.0,
        deregister_critical_after_s=30.0,
        successes_before_passing=2,
    )
    record, _, _ = register(core, clock, "agent-1")
    clock.advance(3.5)
    core.sweep()
    assert record.status is Status.CRITICAL
    heartbeat(core, record)
    heartbeat(core, record)
    assert record.status is Status.PASSING


def test_sweep_only_touches_late_agents() -> None:
    clock = Clock()
    core = make_core(clock, heartbeat_interval_s=1.0)
    records = [register(core, clock, f"agent-{i}")[0] for i in range(50)]
    clock.advance(1.6)
    for r in records[10:]:
        heartbeat(core, r)
    core.sweep()
    assert sum(1 for r in records if r.status is Status.WARNING) == 10
    assert all(r.status is Status.PASSING for r in records[10:])


# --- lookup -----------------------------------------------------------------------------


def brute_force(
    core: RegistryCore, capability: str, order: Order, k: int, include_unhealthy: bool = False
) -> list[str]:
    candidates = [
        r
        for r in core.agents.values()
        if capability in r.capabilities and (include_unhealthy or r.status is Status.PASSING)
    ]
    return [r.agent_id for r in sorted(candidates, key=lambda r: r.index_key(order))[:k]]


def test_index_agrees_with_brute_force_under_churn() -> None:
    clock = Clock()
    core = make_core(clock, lease_ttl_s=1000.0, heartbeat_interval_s=100.0)
    rng = random.Random(7)
    records = []
    for i in range(120):
        caps = rng.choice(
            [("database.query",), ("ml.inference",), ("database.query", "ml.inference")]
        )
        records.append(
            register(core, clock, f"agent-{i:03d}", caps, max_concurrency=rng.randint(1, 50))[0]
        )
    for round_ in range(30):
        for r in rng.sample(records, 40):
            if r.agent_id not in core.agents:
                continue
            heartbeat(
                core,
                r,
                health=rng.choice([1.0, 0.95, 0.6, 0.3]),
                load=rng.randint(0, 60),
                latency=rng.uniform(1, 80),
            )
        for r in rng.sample(records, 5):
            if r.agent_id in core.agents:
                core.report_outcome(
                    r.agent_id,
                    success=rng.random() < 0.8,
                    latency_ms=rng.uniform(1, 100),
                    request_id=f"r-{round_}-{r.agent_id}",
                )
        for capability in ("database.query", "ml.inference"):
            for order in Order:
                for include in (False, True):
                    found, total = core.find_by_capability(
                        capability, order=order, top_k=7, include_unhealthy=include
                    )
                    assert [r.agent_id for r, _ in found] == brute_force(
                        core, capability, order, 7, include
                    )
                    assert total == sum(
                        1 for r in core.agents.values() if capability in r.capabilities
                    )


def test_lists_nobody_reads_catch_up_when_first_read() -> None:
    # Only fitness is queried while agents churn, change capabilities and
    # leave; the latency, reliability and load lists are re-keyed lazily and
    # must still agree with brute force the first time they are read.
    clock = Clock()
    core = make_core(clock, lease_ttl_s=1000.0, heartbeat_interval_s=100.0)
    rng = random.Random(11)
    identities = {}
    for i in range(60):
        record, identity, _ = register(
            core, clock, f"agent-{i:02d}", ("compute",), max_concurrency=20
        )
        identities[record.agent_id] = identity
    for round_ in range(25):
        for agent_id in rng.sample(sorted(core.agents), 20):
            r = core.agents[agent_id]
            heartbeat(
                core,
                r,
                health=rng.choice([1.0, 0.9, 0.7]),
                load=rng.randint(0, 30),
                latency=rng.uniform(1, 90),
            )
            core.report_outcome(agent_id, success=rng.random() < 0.7, latency_ms=rng.uniform(1, 90))
        if round_ % 5 == 0:
            moved = rng.choice(sorted(core.agents))
            clock.advance(0.001)
            register(
                core,
                clock,
                moved,
                ("echo",) if round_ % 10 else ("compute", "echo"),
                identity=identities[moved],
                max_concurrency=20,
            )
        found, _ = core.find_by_capability("compute", order=Order.FITNESS, top_k=10)
        assert [r.agent_id for r, _ in found] == brute_force(core, "compute", Order.FITNESS, 10)
    for order in (Order.LATENCY, Order.RELIABILITY, Order.LOAD):
        for capability in ("compute", "echo"):
            found, _ = core.find_by_capability(capability, order=order, top_k=15)
            assert [r.agent_id for r, _ in found] == brute_force(core, capability, order, 15)


def test_find_returns_scores_in_order_and_only_passing_by_default() -> None:
    clock = Clock()
    core = make_core(clock)
    fast, _, _ = register(core, clock, "fast", ("database.query",))
    slow, _, _ = register(core, clock, "slow", ("database.query",))
    sick, _, _ = register(core, clock, "sick", ("database.query",))
    heartbeat(core, fast, latency=5.0)
    heartbeat(core, slow, latency=50.0)
    heartbeat(core, sick, latency=1.0, health=0.1)
    found, total = core.find_by_capability("database.query", order=Order.LATENCY, top_k=5)
    assert [r.agent_id for r, _ in found] == ["fast", "slow"]
    assert [s for _, s in found] == [5.0, 50.0]
    assert total == 3
    found, _ = core.find_by_capability(
        "database.query", order=Order.LATENCY, top_k=5, include_unhealthy=True
    )
    assert [r.agent_id for r, _ in found] == ["sick", "fast", "slow"]


def test_custom_fitness_weights() -> None:
    clock = Clock()
    core = make_core(clock)
    quick, _, _ = register(core, clock, "quick", ("compute",))
    steady, _, _ = register(core, clock, "steady", ("compute",))
    heartbeat(core, quick, latency=1.0)
    heartbeat(core, steady, latency=400.0)
    for i in range(10):
        core.report_outcome("quick", success=i % 2 == 0, latency_ms=1.0)
        core.report_outcome("steady", success=True, latency_ms=400.0)
    by_latency, _ = core.find_by_capability(
        "compute", top_k=2, latency_weight=1.0, reliability_weight=0.0
    )
    by_reliability, _ = core.find_by_capability(
        "compute", top_k=2, latency_weight=0.0, reliability_weight=1.0
    )
    assert by_latency[0][0].agent_id == "quick"
    assert by_reliability[0][0].agent_id == "steady"


def test_unknown_capability_finds_nothing_and_bad_arguments_name_the_field() -> None:
    core = make_core(Clock())
    assert core.find_by_capability("nobody.has.this") == ([], 0)
    with pytest.raises(InvalidArgument) as err:
        core.find_by_capability("compute", top_k=0)
    assert err.value.field == "top_k"
    with pytest.raises(InvalidArgument) as err:
        core.find_by_capability("BAD")
    assert err.value.field == "capability"


def test_measured_outcomes_move_reliability_and_latency_once_per_request_id() -> None:
    clock = Clock()
    core = make_core(clock, reliability_prior=0.9, reliability_alpha=0.2, latency_alpha=0.5)
    register(core, clock, "agent-1")
    record = core.report_outcome("agent-1", success=False, latency_ms=100.0, request_id="req-1")
    assert record.reliability == pytest.approx(0.72)
    assert record.latency_ms == 100.0
    core.report_outcome("agent-1", success=False, latency_ms=100.0, request_id="req-1")
    assert record.reliability == pytest.approx(0.72)
    assert record.outcomes == 1
    core.report_outcome("agent-1", success=True, latency_ms=50.0, request_id="req-2")
    assert record.latency_ms == pytest.approx(75.0)


def test_pagination_walks_every_agent_once() -> None:
    clock = Clock()
    core = make_core(clock)
    for i in range(25):
        register(core, clock, f"agent-{i:02d}", ("compute",) if i % 2 else ("echo",))
    seen: list[str] = []
    token = ""
    while True:
        page, token, total = core.list_agents(page_size=10, page_token=token)
        assert total == 25
        seen += [r.agent_id for r in page]
        if not token:
            break
    assert seen == sorted(f"agent-{i:02d}" for i in range(25))
    page, token, total = core.list_agents(page_size=100, capability="compute")
    assert total == 12 and not token and all("compute" in r.capabilities for r in page)
    with pytest.raises(InvalidArgument) as err:
        core.list_agents(page_size=10, page_token="garbage!!")
    assert err.value.field == "page_token"


# --- watch history ------------------------------------------------------------------------


def test_events_since_and_compaction() -> None:
    clock = Clock()
    core = RegistryCore(
        RegistrySettings(watch_history=10),
        clock=lambda: clock.mono,
        wall_clock=lambda: clock.wall,
        index_start=100,
    )
    for i in range(5):
        register(core, clock, f"agent-{i}")
    assert [e.index for e in core.events_since(100)] == [101, 102, 103, 104, 105]
    assert [e.index for e in core.events_since(103)] == [104, 105]
    assert core.events_since(105) == []
    for i in range(5, 20):
        register(core, clock, f"agent-{i}")
    with pytest.raises(OutOfRange) as err:
        core.events_since(100)
    assert err.value.reason == "INDEX_COMPACTED"
    with pytest.raises(OutOfRange) as err:
        core.events_since(10_000)
    assert err.value.reason == "INDEX_IN_FUTURE"


def test_index_starts_after_any_previous_incarnation() -> None:
    first = RegistryCore()
    time.sleep(0.001)
    second = RegistryCore()
    assert second.index > first.index


def test_status_counts_follow_every_transition() -> None:
    clock = Clock()
    core = make_core(
        clock, heartbeat_interval_s=1.0, deregister_critical_after_s=1.0, lease_ttl_s=2.0
    )
    records = [register(core, clock, f"agent-{i}")[0] for i in range(4)]
    heartbeat(core, records[0], health=0.0)
    assert core.counts() == {Status.PASSING: 3, Status.WARNING: 1, Status.CRITICAL: 0}
    clock.advance(2.5)
    core.sweep()
    assert core.counts()[Status.CRITICAL] == 4
    clock.advance(1.1)
    core.sweep()
    assert core.counts() == {Status.PASSING: 0, Status.WARNING: 0, Status.CRITICAL: 0}
