"""The market's core without sockets: the guide's examples, once-only
auctions, exact load accounting, who may bid, expiry, re-listing, bad input
and restoring from storage. Bids are really signed and verified."""

from __future__ import annotations

import math
import statistics
import time

import pytest

from services.common import signing
from services.common.crypto import Identity
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from services.market.core import (
    Bidder,
    EventType,
    MarketCore,
    MarketSettings,
    Scoring,
    TaskState,
    auction_score,
)
from services.market.store import MarketStore


class Clock:
    def __init__(self, start: float = 1_900_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Agents:
    """Identities with their registry entries, signing like real agents."""

    def __init__(self) -> None:
        self.ids: dict[str, Identity] = {}
        self.bidders: dict[str, Bidder] = {}

    def add(self, agent_id: str, *capabilities: str, healthy: bool = True) -> Identity:
        identity = Identity.generate(agent_id)
        self.ids[agent_id] = identity
        self.bidders[agent_id] = Bidder(
            agent_id, identity.public_key, frozenset(capabilities), healthy
        )
        return identity


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> MarketCore:
    return MarketCore(MarketSettings(max_bids_per_task=50), wall_clock=clock)


@pytest.fixture
def agents() -> Agents:
    return Agents()


def bid(
    core: MarketCore,
    agents: Agents,
    clock: Clock,
    task_id: str,
    agent_id: str,
    price: float,
    ect: float,
    confidence: float,
    *,
    attempt: int = 0,
    issue_ns: int | None = None,
    signer: Identity | None = None,
):  # type: ignore[no-untyped-def]
    issue_ns = issue_ns if issue_ns is not None else int(clock() * 1e9)
    identity = signer or agents.ids[agent_id]
    signature = identity.sign(
        *signing.bid(task_id, attempt, agent_id, price, ect, confidence, issue_ns)
    )
    return core.place_bid(
        task_id=task_id,
        agent_id=agent_id,
        price=price,
        estimated_completion_s=ect,
        confidence=confidence,
        issue_ns=issue_ns,
        signature=signature,
        bidder=agents.bidders.get(agent_id),
        attempt=attempt,
    )


def outcome(
    core: MarketCore,
    agents: Agents,
    task_id: str,
    attempt: int,
    agent_id: str,
    *,
    success: bool,
    text: str = "",
    request_id: str = "",
):  # type: ignore[no-untyped-def]
    import hashlib

    issue_ns = time.time_ns()
    output, error = (text, "") if success else ("", text)
    signature = agents.ids[agent_id].sign(
        *signing.task_outcome(
            task_id,
            attempt,
            agent_id,
            success,
            hashlib.sha256(output.encode()).digest(),
            error,
            issue_ns,
        )
    )
    common = dict(
        task_id=task_id,
        attempt=attempt,
        agent_id=agent_id,
        issue_ns=issue_ns,
        signature=signature,
        request_id=request_id,
    )
    if success:
        return core.complete(output=output, **common)
    return core.fail(error=error, **common)


def list_compute(core: MarketCore, task_id: str, **kwargs):  # type: ignore[no-untyped-def]
    return core.list_task(task_id=task_id, task_type="compute", requirements=["compute"], **kwargs)


# --- the guide's section 7 -----------------------------------------------------------------


GUIDE_BIDS = [
    # agent, price, estimated completion (s), confidence, the guide's claimed current_load
    ("ml-agent-001", 15.0, 3600.0, 0.95, 20),
    ("ml-agent-002", 12.0, 4200.0, 0.85, 50),
    ("ml-agent-003", 18.0, 3000.0, 0.90, 10),
]


def test_score_formula_is_the_guides() -> None:
    assert auction_score(15.0, 0, 3600, 0.95) == pytest.approx(15 * 3.6 / 1.05)
    assert auction_score(18.0, 10, 3000, 0.9) == pytest.approx(18 * 2 * 3.0 / 1.0)
    assert auction_score(0.0, 0, 3600, 0.95) == 0.01  # the floor
    assert auction_score(1e-6, 0, 1, 1.0) == 0.01


def test_guide_7_1_with_the_loads_the_market_counted(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    """The guide's bids with its loads (20, 50, 10), where the loads are the
    market's own count of assigned tasks, built here by real auctions: the
    scores are 154.29, 318.32 and 108.0, so ml-agent-003 wins."""
    for agent_id, *_ in GUIDE_BIDS:
        agents.add(agent_id, "gpu", "ml.inference")
    for agent_id, *_, load in GUIDE_BIDS:
        for i in range(load):
            task_id = f"warmup-{agent_id}-{i}"
            core.list_task(task_id=task_id, task_type="ml_inference", requirements=["ml.inference"])
            bid(core, agents, clock, task_id, agent_id, 1.0, 1.0, 1.0)
            assert core.run_auction(task_id).winner.bid.agent_id == agent_id
    assert [core.load_of(a) for a, *_ in GUIDE_BIDS] == [20, 50, 10]

    core.list_task(
        task_id="guide-7.1",
        task_type="ml_inference",
        requirements=["gpu", "ml.inference"],
        deadline=clock() + 7200,
        priority=8,
    )
    for agent_id, price, ect, confidence, _claimed in GUIDE_BIDS:
        bid(core, agents, clock, "guide-7.1", agent_id, price, ect, confidence)
    result = core.run_auction("guide-7.1")
    winner = result.winner
    assert winner.bid.agent_id == "ml-agent-003"
    assert (winner.bid.price, winner.bid.estimated_completion_s, winner.bid.confidence) == (
        18.0,
        3000.0,
        0.90,
    )
    assert winner.load == 10 and winner.score == pytest.approx(108.0)
    assert result.considered == 3
    assert result.task.state is TaskState.ASSIGNED and core.load_of("ml-agent-003") == 11


def test_guide_7_1_bids_at_market_load_zero_pick_the_cheapest_score(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    """The bidders' claimed loads are ignored. At load 0 the scores are
    51.43 (001), 53.05 (002) and 54.0 (003): ml-agent-001 wins. The guide's
    ml-agent-003 needs the loads it lists to be the market's own."""
    for agent_id, *_ in GUIDE_BIDS:
        agents.add(agent_id, "gpu", "ml.inference")
    core.list_task(task_id="t", task_type="ml_inference", requirements=["gpu", "ml.inference"])
    for agent_id, price, ect, confidence, _claimed in GUIDE_BIDS:
        bid(core, agents, clock, "t", agent_id, price, ect, confidence)
    result = core.run_auction("t")
    assert result.winner.bid.agent_id == "ml-agent-001"
    assert result.winner.score == pytest.approx(15 * 3.6 / 1.05)


def test_guide_7_2_live_load_balances_exactly(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    ids = [f"agent-{i}" for i in range(10)]
    for agent_id in ids:
        agents.add(agent_id, "compute")
    for t in range(100):
        list_compute(core, f"task-{t}", priority=5)
    for t in range(100):
        for agent_id in ids:
            bid(core, agents, clock, f"task-{t}", agent_id, 10.0, 1000.0, 0.9)
    winners = [core.run_auction(f"task-{t}").winner.bid.agent_id for t in range(100)]
    loads = [core.load_of(a) for a in ids]
    assert loads == [10] * 10
    assert statistics.pvariance(loads) == 0
    # Equal scores go to the earliest bid: round robin in bidding order.
    assert winners[:10] == ids


# --- once-only auctions and exact load -------------------------------------------------


def test_an_assigned_task_is_never_auctioned_again(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    agents.add("b", "compute")
    list_compute(core, "t")
    bid(core, agents, clock, "t", "a", 5.0, 10.0, 0.9)
    first = core.run_auction("t", request_id="auction-1")
    bid_count = core.counters["auctions"]
    with pytest.raises(FailedPrecondition) as err:
        core.run_auction("t")
    assert err.value.reason == "ALREADY_AUCTIONED" and err.value.field == "task_id"
    # A bid after the auction is refused too.
    with pytest.raises(FailedPrecondition) as err:
        bid(core, agents, clock, "t", "b", 1.0, 1.0, 1.0)
    assert err.value.reason == "TASK_NOT_OPEN"
    # A retry of the same auction returns the first result and changes nothing.
    again = core.run_auction("t", request_id="auction-1")
    assert again.duplicate and again.winner == first.winner
    assert core.counters["auctions"] == bid_count and core.load_of("a") == 1


def test_load_changes_exactly_once_per_assignment(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    for name in ("t1", "t2", "t3"):
        list_compute(core, name)
        bid(core, agents, clock, name, "a", 1.0, 1.0, 1.0)
        core.run_auction(name)
    assert core.load_of("a") == 3
    view, duplicate = outcome(core, agents, "t1", 1, "a", success=True, text="42")
    assert not duplicate and view.state is TaskState.COMPLETED and view.output == "42"
    # The same report again, a retry with a new request id, and a conflicting
    # failure: none of them counts again.
    assert outcome(core, agents, "t1", 1, "a", success=True, text="42")[1] is True
    assert outcome(core, agents, "t1", 1, "a", success=True, text="42", request_id="r2")[1]
    with pytest.raises(FailedPrecondition) as err:
        outcome(core, agents, "t1", 1, "a", success=False, text="oops")
    assert err.value.reason == "ALREADY_CLOSED"
    assert core.load_of("a") == 2
    outcome(core, agents, "t2", 1, "a", success=False, text="boom")
    outcome(core, agents, "t2", 1, "a", success=False, text="boom")
    assert core.load_of("a") == 1
    outcome(core, agents, "t3", 1, "a", success=True)
    stats = core.agent_load("a")
    assert (stats.load, stats.won, stats.completed, stats.failed) == (0, 3, 2, 1)
    # Nothing left to finish: the load cannot go below zero.
    for name in ("t1", "t2", "t3"):
        with pytest.raises(FailedPrecondition):
            outcome(core, agents, name, 1, "a", success=name == "t2", text="again")
    assert core.load_of("a") == 0


def test_only_the_assigned_agent_with_its_own_key_reports(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    agents.add("b", "compute")
    list_compute(core, "t")
    bid(core, agents, clock, "t", "a", 1.0, 1.0, 1.0)
    bid(core, agents, clock, "t", "b", 2.0, 1.0, 1.0)
    core.run_auction("t")
    with pytest.raises(PermissionDenied) as err:
        outcome(core, agents, "t", 1, "b", success=True)
    assert err.value.reason == "NOT_ASSIGNED_AGENT"
    # a's id with b's key: the signature does not verify.
    agents.ids["a"], real = agents.ids["b"], agents.ids["a"]
    with pytest.raises(Unauthenticated):
        outcome(core, agents, "t", 1, "a", success=True)
    agents.ids["a"] = real
    with pytest.raises(FailedPrecondition) as err:
        outcome(core, agents, "t", 2, "a", success=True)
    assert err.value.reason == "NOT_ASSIGNED"
    assert core.load_of("a") == 1


# --- who may bid ------------------------------------------------------------------------


def test_unqualified_bidders_are_refused(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("gpu-less", "ml.inference")
    agents.add("sick", "gpu", "ml.inference", healthy=False)
    agents.add("ok", "gpu", "ml.inference")
    core.list_task(task_id="t", task_type="ml_inference", requirements=["gpu", "ml.inference"])
    with pytest.raises(PermissionDenied) as err:
        bid(core, agents, clock, "t", "gpu-less", 1.0, 1.0, 1.0)
    assert err.value.reason == "MISSING_REQUIREMENTS" and err.value.metadata["missing"] == "gpu"
    with pytest.raises(FailedPrecondition) as err:
        bid(core, agents, clock, "t", "sick", 1.0, 1.0, 1.0)
    assert err.value.reason == "BIDDER_UNHEALTHY"
    stranger = Identity.generate("stranger")
    agents.ids["stranger"] = stranger
    with pytest.raises(PermissionDenied) as err:
        bid(core, agents, clock, "t", "stranger", 1.0, 1.0, 1.0)
    assert err.value.reason == "BIDDER_NOT_REGISTERED" and err.value.field == "agent_id"
    with pytest.raises(Unauthenticated) as err:
        bid(core, agents, clock, "t", "ok", 1.0, 1.0, 1.0, signer=stranger)
    assert err.value.field == "signature"
    assert core.get("t").bid_count == 0
    bid(core, agents, clock, "t", "ok", 1.0, 1.0, 1.0)
    assert core.get("t").bid_count == 1


def test_one_bid_per_agent_a_newer_one_replaces_it(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    agents.add("b", "compute")
    list_compute(core, "t")
    t0 = int(clock() * 1e9)
    first, replaced, duplicate = bid(core, agents, clock, "t", "a", 50.0, 10, 0.9, issue_ns=t0)
    assert not replaced and not duplicate
    # The exact same bid again (a retry) changes nothing.
    again, replaced, duplicate = bid(core, agents, clock, "t", "a", 50.0, 10, 0.9, issue_ns=t0)
    assert duplicate and again == first
    bid(core, agents, clock, "t", "b", 10.0, 10, 0.9, issue_ns=t0 + 1)
    newer, replaced, _ = bid(core, agents, clock, "t", "a", 5.0, 10, 0.9, issue_ns=t0 + 2)
    assert replaced and newer.sequence > first.sequence
    # An older bid arriving late never overwrites a newer one.
    with pytest.raises(Aborted) as err:
        bid(core, agents, clock, "t", "a", 1.0, 10, 0.9, issue_ns=t0 + 1)
    assert err.value.reason == "STALE_BID"
    view, bids = core.bids("t")
    assert view.bid_count == 2 and [b.bid.agent_id for b in bids] == ["b", "a"]
    assert core.run_auction("t").winner.bid.price == 5.0


def test_ties_go_to_the_earliest_bid(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    for name in ("c", "a", "b"):
        agents.add(name, "compute")
    list_compute(core, "t")
    for name in ("c", "a", "b"):
        bid(core, agents, clock, "t", name, 10.0, 1000, 0.9)
    assert core.run_auction("t").winner.bid.agent_id == "c"


def test_an_auction_skips_bidders_that_left_the_registry(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("gone", "compute")
    agents.add("here", "compute")
    list_compute(core, "t")
    bid(core, agents, clock, "t", "gone", 1.0, 1, 1.0)
    bid(core, agents, clock, "t", "here", 9.0, 1, 1.0)
    with pytest.raises(FailedPrecondition) as err:
        core.run_auction("t", eligible=lambda a: False)
    assert err.value.reason == "NO_BIDS" and core.get("t").state is TaskState.OPEN
    result = core.run_auction("t", eligible=lambda a: a != "gone")
    assert result.winner.bid.agent_id == "here" and result.considered == 1


def test_trust_adjusted_scoring_divides_by_conservative_trust(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("cheap-liar", "compute")
    agents.add("honest", "compute")
    for name in ("plain", "trusted"):
        list_compute(core, name)
        bid(core, agents, clock, name, "cheap-liar", 1.0, 100, 1.0)
        bid(core, agents, clock, name, "honest", 3.0, 100, 1.0)
    assert core.run_auction("plain").winner.bid.agent_id == "cheap-liar"
    with pytest.raises(FailedPrecondition):
        core.run_auction("trusted", scoring=Scoring.TRUST_ADJUSTED)
    # cheap-liar now carries a load of 1 from "plain": 0.11/0.05 vs 0.27/0.9.
    result = core.run_auction(
        "trusted", scoring=Scoring.TRUST_ADJUSTED, trust={"cheap-liar": 0.05, "honest": 0.9}
    )
    assert result.winner.bid.agent_id == "honest"
    assert result.winner.trust == 0.9
    assert result.winner.score == pytest.approx(auction_score(3.0, 0, 100, 1.0) / 0.9)
    assert result.task.current is not None and result.task.current.scoring is Scoring.TRUST_ADJUSTED


# --- deadlines, windows, failure and re-listing -----------------------------------------


def test_tasks_expire_at_their_deadline(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    list_compute(core, "open", deadline=clock() + 10)
    list_compute(core, "assigned", deadline=clock() + 20)
    list_compute(core, "forever")
    bid(core, agents, clock, "assigned", "a", 1.0, 1, 1.0)
    core.run_auction("assigned")
    core.drain()
    assert core.next_timer() == clock() + 10
    clock.now += 10
    expired, _ = core.due()
    assert [v.task_id for v in expired] == ["open"] and expired[0].state is TaskState.EXPIRED
    with pytest.raises(FailedPrecondition) as err:
        bid(core, agents, clock, "open", "a", 1.0, 1, 1.0)
    assert err.value.reason == "TASK_NOT_OPEN"
    with pytest.raises(FailedPrecondition) as err:
        core.run_auction("open")
    assert err.value.reason == "TASK_EXPIRED"
    assert core.load_of("a") == 1
    clock.now += 10
    expired, _ = core.due()
    assert [v.task_id for v in expired] == ["assigned"]
    assert core.load_of("a") == 0 and core.agent_load("a").expired == 1
    with pytest.raises(FailedPrecondition):
        outcome(core, agents, "assigned", 1, "a", success=True)
    assert core.load_of("a") == 0
    _, events = core.drain()
    assert [e.type for e in events] == [EventType.TASK_EXPIRED, EventType.TASK_EXPIRED]
    assert core.get("forever").state is TaskState.OPEN and core.next_timer() is None


def test_a_bidding_window_lets_the_market_auction(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    list_compute(core, "windowed", bidding_window_s=2.0)
    clock.now += 1
    assert core.due() == ([], [])
    clock.now += 1
    assert core.due() == ([], [])  # closed without bids: the first bid decides
    bid(core, agents, clock, "windowed", "a", 1.0, 1, 1.0)
    assert core.next_timer() == clock()
    assert core.due() == ([], ["windowed"])


def test_a_failed_task_is_relisted_without_the_agent_that_failed(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("liar", "compute")
    agents.add("honest", "compute")
    list_compute(core, "t", max_attempts=2)
    bid(core, agents, clock, "t", "liar", 0.01, 1, 1.0)
    bid(core, agents, clock, "t", "honest", 10.0, 100, 0.9)
    core.run_auction("t")
    view, duplicate, relisted = outcome(core, agents, "t", 1, "liar", success=False, text="lied")
    assert relisted and not duplicate
    assert view.state is TaskState.OPEN and view.attempt == 2 and view.excluded == ("liar",)
    assert view.bid_count == 0  # a new attempt takes new bids
    with pytest.raises(PermissionDenied) as err:
        bid(core, agents, clock, "t", "liar", 0.01, 1, 1.0)
    assert err.value.reason == "AGENT_EXCLUDED"
    with pytest.raises(FailedPrecondition) as err:
        bid(core, agents, clock, "t", "honest", 10.0, 100, 0.9, attempt=1)
    assert err.value.reason == "STALE_ATTEMPT"
    bid(core, agents, clock, "t", "honest", 10.0, 100, 0.9, attempt=2)
    assert core.run_auction("t").winner.bid.agent_id == "honest"
    view, _ = outcome(core, agents, "t", 2, "honest", success=True, text="done")
    assert view.state is TaskState.COMPLETED
    assert [(a.agent_id, a.outcome) for a in view.assignments] == [
        ("liar", TaskState.FAILED),
        ("honest", TaskState.COMPLETED),
    ]
    # The liar's late success report for its own attempt changes nothing.
    with pytest.raises(FailedPrecondition):
        outcome(core, agents, "t", 1, "liar", success=True)
    _, events = core.drain()
    assert [e.type for e in events if e.task.task_id == "t"] == [
        EventType.TASK_LISTED,
        EventType.BID_PLACED,
        EventType.BID_PLACED,
        EventType.AUCTION_WON,
        EventType.TASK_FAILED,
        EventType.TASK_RELISTED,
        EventType.BID_PLACED,
        EventType.AUCTION_WON,
        EventType.TASK_COMPLETED,
    ]


def test_explicit_relisting(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    agents.add("b", "compute")
    list_compute(core, "t", deadline=clock() + 5)
    bid(core, agents, clock, "t", "a", 1.0, 1, 1.0)
    core.run_auction("t")
    with pytest.raises(FailedPrecondition) as err:
        core.relist("t")
    assert err.value.reason == "NOT_RELISTABLE"
    clock.now += 5
    core.due()
    with pytest.raises(InvalidArgument) as err:
        core.relist("t")
    assert err.value.reason == "DEADLINE_REQUIRED" and err.value.field == "deadline_time"
    with pytest.raises(InvalidArgument) as err:
        core.relist("t", deadline=clock() - 1)
    assert err.value.reason == "DEADLINE_IN_PAST"
    view, duplicate = core.relist("t", deadline=clock() + 60, request_id="again-1")
    assert not duplicate and view.state is TaskState.OPEN and view.excluded == ("a",)
    assert core.relist("t", request_id="again-1")[1] is True
    bid(core, agents, clock, "t", "b", 1.0, 1, 1.0)
    assert core.run_auction("t").winner.bid.agent_id == "b"


def test_an_agent_that_leaves_has_its_tasks_failed_and_relisted(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    list_compute(core, "once")
    list_compute(core, "twice", max_attempts=2)
    for name in ("once", "twice"):
        bid(core, agents, clock, name, "a", 1.0, 1, 1.0)
        core.run_auction(name)
    views = core.abandon("a", "agent a expired from the registry")
    assert {v.task_id: v.state for v in views} == {
        "once": TaskState.FAILED,
        "twice": TaskState.OPEN,
    }
    assert core.load_of("a") == 0 and core.agent_load("a").failed == 2
    assert core.abandon("a", "again") == []


# --- listing, idempotence and bad input ---------------------------------------------------


def test_listing_is_idempotent_and_conflicts_are_refused(core, clock) -> None:  # type: ignore[no-untyped-def]
    first, created = list_compute(core, "t", priority=3)
    assert created
    again, created = list_compute(core, "t", priority=3)
    assert not created and again.spec == first.spec
    with pytest.raises(AlreadyExists):
        list_compute(core, "t", priority=4)
    made, created = core.list_task(
        task_id="", task_type="compute", requirements=["compute"], request_id="req-1"
    )
    assert created and made.task_id.startswith("task-")
    retry, created = core.list_task(
        task_id="", task_type="compute", requirements=["compute"], request_id="req-1"
    )
    assert not created and retry.task_id == made.task_id


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"requirements": []}, "requirements", "EMPTY_FIELD"),
        ({"requirements": ["Not A Cap"]}, "requirements[0]", "MALFORMED_CAPABILITY"),
        ({"task_type": ""}, "task_type", "EMPTY_FIELD"),
        ({"task_type": "two words"}, "task_type", "MALFORMED_TASK_TYPE"),
        ({"task_id": "bad id!"}, "task_id", "MALFORMED_ID"),
        ({"capability": "gpu"}, "capability", "CAPABILITY_NOT_REQUIRED"),
        ({"priority": -1}, "priority", "OUT_OF_RANGE"),
        ({"priority": 101}, "priority", "OUT_OF_RANGE"),
        ({"reward": -1.0}, "reward", "OUT_OF_RANGE"),
        ({"reward": math.nan}, "reward", "NOT_FINITE"),
        ({"deadline": 0.0}, "deadline_time", "DEADLINE_IN_PAST"),
        ({"bidding_window_s": -1.0}, "bidding_window", "OUT_OF_RANGE"),
        ({"max_attempts": -1}, "max_attempts", "OUT_OF_RANGE"),
        ({"args": ["x"] * 300}, "args", "TOO_MANY_VALUES"),
    ],
)
def test_bad_listings_name_the_field(core, kwargs, field, reason) -> None:  # type: ignore[no-untyped-def]
    base = {"task_id": "t", "task_type": "compute", "requirements": ["compute"]}
    base.update(kwargs)
    with pytest.raises(InvalidArgument) as err:
        core.list_task(**base)
    assert (err.value.field, err.value.reason) == (field, reason)
    assert "t" not in core.tasks


@pytest.mark.parametrize(
    ("price", "ect", "confidence", "field", "reason"),
    [
        (-1.0, 10.0, 0.5, "price", "OUT_OF_RANGE"),
        (math.inf, 10.0, 0.5, "price", "NOT_FINITE"),
        (math.nan, 10.0, 0.5, "price", "NOT_FINITE"),
        (1.0, 0.0, 0.5, "estimated_completion_seconds", "OUT_OF_RANGE"),
        (1.0, -5.0, 0.5, "estimated_completion_seconds", "OUT_OF_RANGE"),
        (1.0, 10.0, 1.5, "confidence", "OUT_OF_RANGE"),
        (1.0, 10.0, -0.1, "confidence", "OUT_OF_RANGE"),
    ],
)
def test_bad_bids_name_the_field(
    core, agents, clock, price, ect, confidence, field, reason
) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    list_compute(core, "t")
    with pytest.raises(InvalidArgument) as err:
        bid(core, agents, clock, "t", "a", price, ect, confidence)
    assert (err.value.field, err.value.reason) == (field, reason)
    assert core.get("t").bid_count == 0


def test_bids_on_unknown_tasks_and_with_a_skewed_clock(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    with pytest.raises(NotFound) as err:
        bid(core, agents, clock, "nope", "a", 1.0, 1.0, 1.0)
    assert err.value.field == "task_id"
    list_compute(core, "t")
    with pytest.raises(InvalidArgument) as err:
        bid(core, agents, clock, "t", "a", 1.0, 1.0, 1.0, issue_ns=int((clock() - 3600) * 1e9))
    assert err.value.field == "issue_time" and err.value.reason == "CLOCK_SKEW"
    with pytest.raises(NotFound):
        core.run_auction("nope")


def test_list_tasks_filters_and_paginates(core, agents, clock) -> None:  # type: ignore[no-untyped-def]
    agents.add("a", "compute")
    for i in range(7):
        list_compute(core, f"t{i}")
    for name in ("t1", "t4"):
        bid(core, agents, clock, name, "a", 1.0, 1, 1.0)
        core.run_auction(name)
    seen, token = [], ""
    while True:
        page, token, total = core.list_tasks(page_size=3, page_token=token)
        assert total == 7
        seen += [v.task_id for v in page]
        if not token:
            break
    assert seen == [f"t{i}" for i in range(7)]
    page, token, total = core.list_tasks(page_size=1, states=[TaskState.ASSIGNED])
    assert [v.task_id for v in page] == ["t1"] and total == 2 and token
    page, token, _ = core.list_tasks(page_size=1, states=[TaskState.ASSIGNED], page_token=token)
    assert [v.task_id for v in page] == ["t4"] and not token
    assert core.list_tasks(page_size=10, agent_id="a")[2] == 2
    with pytest.raises(InvalidArgument):
        core.list_tasks(page_size=10, page_token="garbage!")


def test_event_log_resumes_and_reports_compaction(clock) -> None:  # type: ignore[no-untyped-def]
    core = MarketCore(MarketSettings(watch_history=10), wall_clock=clock, index_start=100)
    for i in range(15):
        list_compute(core, f"t{i}")
    _, events = core.drain()
    core.events.publish(events)
    assert [e.index for e in core.events.since(110)] == list(range(111, 116))
    with pytest.raises(OutOfRange) as err:
        core.events.since(101)
    assert err.value.reason == "INDEX_COMPACTED"
    with pytest.raises(OutOfRange):
        core.events.since(999)


# --- durability ---------------------------------------------------------------------------


async def test_state_survives_a_round_trip_through_storage(tmp_path, agents) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(time.time())
    core = MarketCore(wall_clock=clock)
    store = MarketStore(str(tmp_path / "market.db"))
    await store.open()
    for name in ("a", "b", "c"):
        agents.add(name, "compute")
    list_compute(core, "done", max_attempts=2, deadline=clock() + 600)
    list_compute(core, "running")
    list_compute(core, "open", bidding_window_s=30, priority=7)
    for name in ("done", "running", "open"):
        for agent_id in ("a", "b"):
            bid(core, agents, clock, name, agent_id, 1.0 if agent_id == "a" else 2.0, 1, 1.0)
    core.run_auction("done", request_id="r-done")
    outcome(core, agents, "done", 1, "a", success=False, text="flaky")
    bid(core, agents, clock, "done", "b", 3.0, 1, 1.0, attempt=2)
    core.run_auction("done")
    outcome(core, agents, "done", 2, "b", success=True, text="out")
    core.run_auction("running")
    records, _ = core.drain()
    await store.write(records)
    await store.close()

    store = MarketStore(str(tmp_path / "market.db"))
    await store.open()
    restored = MarketCore(wall_clock=clock)
    restored.restore(*(await store.load()))
    for name in ("done", "running", "open"):
        before, after = core.get(name), restored.get(name)
        assert after.spec == before.spec
        assert (after.state, after.attempt, after.excluded, after.output, after.deadline) == (
            before.state,
            before.attempt,
            before.excluded,
            before.output,
            before.deadline,
        )
        assert after.assignments == before.assignments
    assert restored.get("open").bid_count == 2
    assert [b.bid for b in restored.bids("open")[1]] == [b.bid for b in core.bids("open")[1]]
    for agent_id in ("a", "b", "c"):
        assert restored.agent_load(agent_id) == core.agent_load(agent_id)
    assert restored.run_auction("done", request_id="r-done").duplicate
    # New sequences continue after the restored ones: ties still go to the earliest.
    late, _, _ = bid(restored, agents, clock, "open", "c", 1.0, 1, 1.0)
    assert late.sequence > max(b.bid.sequence for b in restored.bids("open")[1] if b.bid != late)
    assert restored.next_timer() == pytest.approx(restored.get("open").open_wall + 30)
    assert [b.agent_id for b in await store.bids("done", 1)] == ["a", "b"]
    await store.close()
