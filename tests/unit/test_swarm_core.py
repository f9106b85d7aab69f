"""Voting pools and the hive mind without sockets: the guide's 5.1 and 5.2,
thresholds, revotes, closing, compare-and-set, replays and bad input."""

from __future__ import annotations

import math

import pytest

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from services.swarm.core import (
    Hive,
    HiveEventKind,
    Pool,
    Pools,
    PoolStatus,
    SwarmSettings,
    Threshold,
)


class Wall:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    @property
    def ns(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def pools(wall: Wall) -> Pools:
    return Pools(SwarmSettings(), wall_clock=wall)


@pytest.fixture
def hive(wall: Wall) -> Hive:
    return Hive(SwarmSettings(hive_history=100), wall_clock=wall)


_sig = iter(range(10**9))


def sig() -> bytes:
    return next(_sig).to_bytes(64, "big")


def vote(
    pools: Pools,
    wall: Wall,
    pool: Pool,
    agent: str,
    decision: str,
    confidence: float,
    weight: float = 1.0,
    *,
    issue_ns: int | None = None,
    signature: bytes | None = None,
):  # type: ignore[no-untyped-def]
    wall.now += 0.001  # every vote is issued a little later than the one before
    return pools.vote(
        pool.pool_id,
        agent,
        decision,
        confidence,
        weight,
        wall.ns if issue_ns is None else issue_ns,
        signature or sig(),
    )


# --- the guide's 5.1 -----------------------------------------------------------------------


def test_guide_5_1_super_majority_vote_approves_with_confidence_0_739(
    pools: Pools, wall: Wall
) -> None:
    pool, created = pools.create(
        topic="scale_infrastructure",
        threshold=Threshold.SUPER_MAJORITY,
        duration_s=3600,
        min_votes=0,
    )
    assert created and pool.min_votes == 1
    vote(pools, wall, pool, "agent-001", "approve", 0.9)
    vote(pools, wall, pool, "agent-002", "approve", 0.8)
    vote(pools, wall, pool, "agent-003", "reject", 0.6)
    result = pool.consensus(wall())
    assert result.decision == "approve"
    assert result.confidence > 0.7
    assert result.confidence == pytest.approx(1.7 / 2.3)
    assert round(result.confidence, 3) == 0.739
    assert result.status is PoolStatus.DECIDED and not result.closed
    assert [(t.decision, t.votes) for t in result.tallies] == [("approve", 2), ("reject", 1)]
    assert result.tallies[0].score == pytest.approx(1.7)


# --- thresholds, min_votes, closing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "votes", "status"),
    [
        # More than half: 0.6 of the score decides, exactly half does not.
        (Threshold.SIMPLE_MAJORITY, [("a", 0.6), ("b", 0.4)], PoolStatus.DECIDED),
        (Threshold.SIMPLE_MAJORITY, [("a", 0.5), ("b", 0.5)], PoolStatus.PENDING),
        # At least two thirds: exactly 2 of 3 equal votes decide; 0.65 does not.
        (Threshold.SUPER_MAJORITY, [("a", 1.0), ("a", 1.0), ("b", 1.0)], PoolStatus.DECIDED),
        (Threshold.SUPER_MAJORITY, [("a", 0.1), ("a", 0.1), ("b", 0.1)], PoolStatus.DECIDED),
        (Threshold.SUPER_MAJORITY, [("a", 0.65), ("b", 0.35)], PoolStatus.PENDING),
        # Every vote the same way, whatever the confidences; one dissent is enough to block.
        (Threshold.UNANIMOUS, [("a", 0.2), ("a", 1.0)], PoolStatus.DECIDED),
        (Threshold.UNANIMOUS, [("a", 1.0), ("a", 1.0), ("b", 0.01)], PoolStatus.PENDING),
    ],
)
def test_thresholds(pools: Pools, wall: Wall, threshold, votes, status) -> None:  # type: ignore[no-untyped-def]
    pool, _ = pools.create(topic="t", threshold=threshold, duration_s=60, min_votes=1)
    for i, (decision, confidence) in enumerate(votes):
        vote(pools, wall, pool, f"agent-{i}", decision, confidence)
    assert pool.consensus(wall()).status is status


def test_a_tie_has_no_leader_and_no_votes_no_result(pools: Pools, wall: Wall) -> None:
    pool, _ = pools.create(topic="t", threshold=1, duration_s=60, min_votes=1)
    empty = pool.consensus(wall())
    assert (empty.decision, empty.confidence, empty.status) == ("", 0.0, PoolStatus.PENDING)
    vote(pools, wall, pool, "x", "a", 0.5)
    vote(pools, wall, pool, "y", "b", 0.5)
    tied = pool.consensus(wall())
    assert tied.decision == "" and tied.confidence == pytest.approx(0.5)
    # Zero confidence or weight counts as a vote but scores nothing.
    pool2, _ = pools.create(topic="t2", threshold=1, duration_s=60, min_votes=1)
    vote(pools, wall, pool2, "x", "a", 0.0)
    vote(pools, wall, pool2, "y", "b", 1.0, 0.0)
    assert pool2.consensus(wall()).decision == "" and pool2.consensus(wall()).votes == 2


def test_min_votes_then_the_close_makes_it_final(pools: Pools, wall: Wall) -> None:
    pool, _ = pools.create(topic="deploy", threshold=1, duration_s=10, min_votes=3)
    vote(pools, wall, pool, "a1", "approve", 1.0)
    vote(pools, wall, pool, "a2", "approve", 1.0)
    assert pool.consensus(wall()).status is PoolStatus.PENDING
    vote(pools, wall, pool, "a3", "reject", 0.5)
    assert pool.consensus(wall()).status is PoolStatus.DECIDED
    wall.now += 10
    final = pool.consensus(wall())
    assert final.closed and final.status is PoolStatus.DECIDED
    short, _ = pools.create(topic="never", threshold=3, duration_s=1, min_votes=1)
    vote(pools, wall, short, "a1", "approve", 1.0)
    vote(pools, wall, short, "a2", "reject", 1.0)
    wall.now += 1
    assert short.consensus(wall()).status is PoolStatus.NO_CONSENSUS


def test_closed_pools_refuse_votes(pools: Pools, wall: Wall) -> None:
    pool, _ = pools.create(topic="t", threshold=1, duration_s=5, min_votes=1)
    vote(pools, wall, pool, "early", "approve", 1.0)
    wall.now += 5
    with pytest.raises(FailedPrecondition) as info:
        vote(pools, wall, pool, "late", "reject", 1.0)
    assert (info.value.field, info.value.reason) == ("pool_id", "POOL_CLOSED")
    assert list(pool.votes) == ["early"]


def test_a_revote_replaces_and_an_older_vote_cannot(pools: Pools, wall: Wall) -> None:
    pool, _ = pools.create(topic="t", threshold=1, duration_s=60, min_votes=1)
    first = vote(pools, wall, pool, "agent-1", "reject", 0.9)
    vote(pools, wall, pool, "agent-2", "approve", 0.5)
    assert pool.consensus(wall()).decision == "reject"
    again = vote(pools, wall, pool, "agent-1", "approve", 0.7)
    assert again.replaced == first.vote and not again.duplicate
    result = pool.consensus(wall())
    assert (result.decision, result.votes, result.confidence) == ("approve", 2, 1.0)
    # The same signed vote again changes nothing...
    same = pools.vote(
        pool.pool_id, "agent-1", "approve", 0.7, 1.0, again.vote.issue_ns, again.vote.signature
    )
    assert same.duplicate
    # ...and a replay of the first one cannot undo the second.
    with pytest.raises(Aborted) as info:
        pools.vote(pool.pool_id, "agent-1", "reject", 0.9, 1.0, first.vote.issue_ns, sig())
    assert info.value.reason == "SUPERSEDED_VOTE"
    assert pool.votes["agent-1"].decision == "approve"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"confidence": 1.1}, "confidence"),
        ({"confidence": -0.1}, "confidence"),
        ({"confidence": math.nan}, "confidence"),
        ({"weight": -1.0}, "weight"),
        ({"weight": math.inf}, "weight"),
        ({"decision": ""}, "decision"),
        ({"decision": "not a word!"}, "decision"),
        ({"agent": "bad id"}, "agent_id"),
        ({"issue_ns": 0}, "issue_time"),
    ],
)
def test_bad_votes_name_the_field(pools: Pools, wall: Wall, kwargs, field) -> None:  # type: ignore[no-untyped-def]
    pool, _ = pools.create(topic="t", threshold=1, duration_s=60, min_votes=1)
    args = {"agent": "agent-1", "decision": "approve", "confidence": 0.5, "weight": 1.0}
    args.update(kwargs)
    issue_ns = args.pop("issue_ns", None)
    with pytest.raises(InvalidArgument) as info:
        vote(
            pools,
            wall,
            pool,
            args["agent"],
            args["decision"],
            args["confidence"],
            args["weight"],
            issue_ns=issue_ns,
        )  # type: ignore[arg-type]
    assert info.value.field == field
    assert not pool.votes


def test_unknown_pools(pools: Pools, wall: Wall) -> None:
    with pytest.raises(NotFound) as info:
        pools.vote("pool-nope", "a", "approve", 1.0, 1.0, wall.ns, sig())
    assert info.value.field == "pool_id"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"duration_s": 0.0}, "duration"),
        ({"duration_s": -5.0}, "duration"),
        ({"duration_s": math.inf}, "duration"),
        ({"topic": ""}, "topic"),
        ({"topic": "x" * 65}, "topic"),
        ({"threshold": 9}, "threshold"),
        ({"min_votes": -1}, "min_votes"),
        ({"request_id": "bad id"}, "request_id"),
    ],
)
def test_bad_pools_name_the_field(pools: Pools, kwargs, field) -> None:  # type: ignore[no-untyped-def]
    args = {"topic": "t", "threshold": 1, "duration_s": 60.0, "min_votes": 1}
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as info:
        pools.create(**args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert not pools.pools


def test_create_is_idempotent_by_request_id_and_paginates(pools: Pools, wall: Wall) -> None:
    pool, created = pools.create(
        topic="t", threshold=1, duration_s=60, min_votes=1, request_id="r-1"
    )
    again, created_again = pools.create(
        topic="t", threshold=1, duration_s=60, min_votes=1, request_id="r-1"
    )
    assert created and not created_again and again is pool
    with pytest.raises(AlreadyExists):
        pools.create(topic="other", threshold=1, duration_s=60, min_votes=1, request_id="r-1")
    for i in range(4):
        wall.now += 1
        pools.create(topic=f"t{i}", threshold=1, duration_s=2.5, min_votes=1)
    seen, token = [], ""
    while True:
        page, token, total = pools.list(page_size=2, page_token=token)
        seen += [p.pool_id for p in page]
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == total == 5
    # t0 closed 2.5s after it opened; the later ones are still open.
    assert [p.topic for p in pools.list(page_size=10, open_only=True)[0]] == ["t", "t1", "t2", "t3"]
    with pytest.raises(InvalidArgument):
        pools.list(page_size=2, page_token="garbage!")


def test_open_pools_are_bounded_and_old_ones_expire(wall: Wall) -> None:
    pools = Pools(SwarmSettings(max_open_pools=2, pool_retention_s=100), wall_clock=wall)
    pools.create(topic="a", threshold=1, duration_s=10, min_votes=1)
    pools.create(topic="b", threshold=1, duration_s=10, min_votes=1)
    with pytest.raises(ResourceExhausted):
        pools.create(topic="c", threshold=1, duration_s=10, min_votes=1)
    wall.now += 10
    pools.create(topic="c", threshold=1, duration_s=10, min_votes=1)  # the others closed
    wall.now += 101
    expired = pools.expired()
    assert sorted(p.topic for p in expired) == ["a", "b"]
    pools.forget(p.pool_id for p in expired)
    assert [p.topic for p in pools.pools.values()] == ["c"]


# --- the hive mind (the guide's 5.2) -------------------------------------------------------------


def test_guide_5_2_generation_increases_with_every_change_and_after_update_from_vote(
    pools: Pools, hive: Hive, wall: Wall
) -> None:
    for name, confidence in (
        ("system_overloaded", 0.7),
        ("scale_up_needed", 0.8),
        ("cost_acceptable", 0.6),
    ):
        wall.now += 0.01
        hive.propose_belief("agent-1", name, confidence, issue_ns=wall.ns, signature=sig())
    for intention in ("increase_capacity_by_20%", "notify_admin"):
        wall.now += 0.01
        hive.propose_intention("agent-1", intention, issue_ns=wall.ns, signature=sig())
    state_generation = hive.generation
    assert state_generation == 5
    assert list(hive.state.intentions) == ["increase_capacity_by_20%", "notify_admin"]

    pool, _ = pools.create(topic="scale_infrastructure", threshold=2, duration_s=3600, min_votes=1)
    vote(pools, wall, pool, "agent-001", "approve", 0.9)
    vote(pools, wall, pool, "agent-002", "approve", 0.8)
    vote(pools, wall, pool, "agent-003", "reject", 0.6)
    write = hive.update_from_vote(pool, now_wall=wall())
    assert hive.generation > state_generation
    assert write.event is not None and write.event.kind is HiveEventKind.DECISION_ADOPTED
    belief = hive.state.beliefs["scale_infrastructure:approve"]
    assert belief.confidence == pytest.approx(1.7 / 2.3) and belief.source == f"pool:{pool.pool_id}"
    decision = hive.state.decisions["scale_infrastructure"]
    assert (decision.decision, decision.final) == ("approve", False)
    # Adopting the same result again is not a change.
    assert hive.update_from_vote(pool, now_wall=wall()).event is None
    assert hive.generation == state_generation + 1


def test_a_later_decision_on_the_topic_replaces_the_earlier_belief(
    pools: Pools, hive: Hive, wall: Wall
) -> None:
    first, _ = pools.create(topic="deploy", threshold=1, duration_s=60, min_votes=1)
    vote(pools, wall, first, "a", "approve", 1.0)
    hive.update_from_vote(first, now_wall=wall())
    second, _ = pools.create(topic="deploy", threshold=1, duration_s=60, min_votes=1)
    vote(pools, wall, second, "a", "reject", 1.0)
    write = hive.update_from_vote(second, now_wall=wall())
    assert write.event is not None and write.event.removed_belief == "deploy:approve"
    assert "deploy:approve" not in hive.state.beliefs and "deploy:reject" in hive.state.beliefs
    assert hive.state.decisions["deploy"].pool_id == second.pool_id


def test_update_from_an_undecided_pool_is_refused(pools: Pools, hive: Hive, wall: Wall) -> None:
    pool, _ = pools.create(topic="t", threshold=3, duration_s=60, min_votes=1)
    with pytest.raises(FailedPrecondition) as info:
        hive.update_from_vote(pool, now_wall=wall())
    assert info.value.reason == "POOL_NOT_DECIDED" and info.value.metadata["status"] == "PENDING"
    assert hive.generation == 0


def test_only_changes_move_the_generation(hive: Hive, wall: Wall) -> None:
    def belief(name: str, confidence: float):  # type: ignore[no-untyped-def]
        wall.now += 0.01
        return hive.propose_belief("agent-1", name, confidence, issue_ns=wall.ns, signature=sig())

    def intend(text: str):  # type: ignore[no-untyped-def]
        wall.now += 0.01
        return hive.propose_intention("agent-1", text, issue_ns=wall.ns, signature=sig())

    assert belief("hot", 0.5).generation == 1
    assert belief("hot", 0.5).event is None and hive.generation == 1
    assert belief("hot", 0.6).generation == 2
    assert intend("notify_admin").generation == 3
    assert intend("  notify_admin ").event is None and hive.generation == 3  # deduplicated
    assert [e.generation for e in hive.events_since(0)] == [1, 2, 3]
    assert [e.kind for e in hive.events_since(2)] == [HiveEventKind.INTENTION_ADDED]


def test_compare_and_set_conflicts_are_aborted_and_change_nothing(hive: Hive, wall: Wall) -> None:
    hive.propose_belief("a", "x", 0.1, issue_ns=wall.ns, signature=sig())
    wall.now += 1
    ok = hive.propose_belief(
        "b", "x", 0.2, issue_ns=wall.ns, signature=sig(), expected_generation=1
    )
    assert ok.generation == 2
    wall.now += 1
    with pytest.raises(Aborted) as info:
        hive.propose_belief("c", "x", 0.9, issue_ns=wall.ns, signature=sig(), expected_generation=1)
    assert (
        info.value.reason == "GENERATION_MISMATCH"
        and info.value.metadata["current_generation"] == "2"
    )
    with pytest.raises(Aborted):
        hive.propose_intention("c", "go", issue_ns=wall.ns, signature=sig(), expected_generation=0)
    assert hive.generation == 2 and hive.state.beliefs["x"].confidence == 0.2
    assert "c" not in hive.writers  # a refused write leaves no trace


def test_replayed_hive_writes_change_nothing(hive: Hive, wall: Wall) -> None:
    first_sig = sig()
    first = hive.propose_belief("a", "x", 0.3, issue_ns=wall.ns, signature=first_sig)
    assert first.writer == ("a", wall.ns, first_sig)
    again = hive.propose_belief("a", "x", 0.3, issue_ns=wall.ns, signature=first_sig)
    assert again.duplicate and hive.generation == 1
    wall.now += 1
    hive.propose_belief("a", "x", 0.8, issue_ns=wall.ns, signature=sig())
    with pytest.raises(Aborted) as info:
        hive.propose_belief("a", "x", 0.3, issue_ns=wall.ns - 10**9, signature=sig())
    assert info.value.reason == "SUPERSEDED_WRITE"
    assert hive.state.beliefs["x"].confidence == 0.8


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda h, w: h.propose_belief("a", "x", 1.5, issue_ns=w.ns, signature=b"s"), "confidence"),
        (
            lambda h, w: h.propose_belief("a", "x", -0.1, issue_ns=w.ns, signature=b"s"),
            "confidence",
        ),
        (
            lambda h, w: h.propose_belief("a", "x", math.nan, issue_ns=w.ns, signature=b"s"),
            "confidence",
        ),
        (
            lambda h, w: h.propose_belief("a", "no spaces", 0.5, issue_ns=w.ns, signature=b"s"),
            "name",
        ),
        (lambda h, w: h.propose_belief("", "x", 0.5, issue_ns=w.ns, signature=b"s"), "agent_id"),
        (lambda h, w: h.propose_belief("a", "x", 0.5, issue_ns=0, signature=b"s"), "issue_time"),
        (
            lambda h, w: h.propose_belief(
                "a", "x", 0.5, issue_ns=w.ns, signature=b"s", expected_generation=-1
            ),
            "expected_generation",
        ),
        (lambda h, w: h.propose_intention("a", "", issue_ns=w.ns, signature=b"s"), "intention"),
        (
            lambda h, w: h.propose_intention("a", "x" * 257, issue_ns=w.ns, signature=b"s"),
            "intention",
        ),
        (
            lambda h, w: h.propose_intention("a", "bell\x07", issue_ns=w.ns, signature=b"s"),
            "intention",
        ),
    ],
)
def test_bad_hive_writes_name_the_field(hive: Hive, wall: Wall, call, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as info:
        call(hive, wall)
    assert info.value.field == field
    assert hive.generation == 0


def test_the_hive_is_bounded_and_its_history_compacts(wall: Wall) -> None:
    hive = Hive(SwarmSettings(max_beliefs=2, max_intentions=1, hive_history=10), wall_clock=wall)
    for i in range(2):
        wall.now += 1
        hive.propose_belief("a", f"b{i}", 0.5, issue_ns=wall.ns, signature=sig())
    wall.now += 1
    with pytest.raises(ResourceExhausted):
        hive.propose_belief("a", "b2", 0.5, issue_ns=wall.ns, signature=sig())
    hive.propose_belief("a", "b0", 0.9, issue_ns=wall.ns, signature=sig())  # an update fits
    for i in range(12):
        wall.now += 1
        hive.propose_belief("a", "b1", i / 20, issue_ns=wall.ns, signature=sig())
    with pytest.raises(OutOfRange) as info:
        hive.events_since(1)
    assert info.value.field == "from_generation"
    assert hive.events_since(hive.generation) == []


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SWARM_MAX_BOIDS": "0"}, "SWARM_MAX_BOIDS"),
        ({"SWARM_MAX_BOIDS": "1000000"}, "SWARM_MAX_BOIDS"),
        ({"SWARM_CLOCK_SKEW_S": "x"}, "SWARM_CLOCK_SKEW_S"),
        ({"SWARM_MAX_INTENTIONS": "100000"}, "SWARM_MAX_INTENTIONS"),
        ({"DB_SYNCHRONOUS": "OFF"}, "DB_SYNCHRONOUS"),
        ({"REGISTRY_ADDR": "host:99999"}, "REGISTRY_ADDR"),
    ],
)
def test_bad_configuration_names_the_variable(env, variable) -> None:  # type: ignore[no-untyped-def]
    from services.common.config import ConfigError
    from services.swarm.config import SwarmConfig

    with pytest.raises(ConfigError, match=variable):
        SwarmConfig.from_env(env)
    assert SwarmConfig.from_env({}).flocks.max_boids == 20_000
