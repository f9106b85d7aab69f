"""The market over gRPC, with a real registry and a double of the trust
service in this process: the guide's examples, once-only auctions, exact
load, who may bid, expiry, the market's own auctions, trust-adjusted scoring,
the streams, restarts, and every bad input answered with a canonical code."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request

import grpc
import pytest

from agent2028.market.v1 import market_pb2
from clients import errors
from clients.channel import create_channel
from clients.market import MarketClient
from clients.registry import RegistryClient
from services.common import signing
from services.common.crypto import Identity
from services.common.timeutil import timestamp_from_ns
from tests.integration.market.support import RunningMarket, register
from tests.support import eventually

GUIDE_BIDS = [
    ("ml-agent-001", 15.0, 3600.0, 0.95, 20),
    ("ml-agent-002", 12.0, 4200.0, 0.85, 50),
    ("ml-agent-003", 18.0, 3000.0, 0.90, 10),
]


async def auction_to(client: MarketClient, identity: Identity, task_id: str) -> None:
    """One real assignment to ``identity``'s agent (it is the only bidder)."""
    await client.list_task("ml_inference", ["ml.inference"], task_id=task_id)
    await client.place_bid(identity, task_id, price=1.0, estimated_completion_s=1.0, confidence=1.0)
    won = await client.run_auction(task_id)
    assert won.winning_bid.agent_id == identity.signer_id


# --- the guide's section 7 -------------------------------------------------------------------


async def test_guide_7_1_over_grpc(market: RunningMarket, registry: RegistryClient) -> None:
    client = market.client
    assert client is not None
    ids = {}
    for i, (agent_id, *_rest) in enumerate(GUIDE_BIDS):
        ids[agent_id] = await register(registry, agent_id, "gpu", "ml.inference", port=9100 + i)
    # At market load 0 the cheapest score (51.43) is ml-agent-001's.
    await client.list_task("ml_inference", ["gpu", "ml.inference"], task_id="at-load-zero")
    for agent_id, price, ect, confidence, _claimed in GUIDE_BIDS:
        await client.place_bid(
            ids[agent_id],
            "at-load-zero",
            price=price,
            estimated_completion_s=ect,
            confidence=confidence,
        )
    zero = await client.run_auction("at-load-zero")
    assert zero.winning_bid.agent_id == "ml-agent-001" and zero.winning_bid.load == 0
    assert zero.winning_bid.score == pytest.approx(15 * 3.6 / 1.05)
    # Give the agents the guide's loads as the market counts them: real
    # assignments they have not finished (001 has one already from above).
    for agent_id, *_rest, load in GUIDE_BIDS:
        have = (await client.get_agent_load(agent_id)).load
        await asyncio.gather(
            *(auction_to(client, ids[agent_id], f"busy-{agent_id}-{i}") for i in range(load - have))
        )
    assert [(await client.get_agent_load(a)).load for a, *_ in GUIDE_BIDS] == [20, 50, 10]

    deadline = time.time() + 2 * 3600
    listed = await client.list_task(
        "ml_inference", ["gpu", "ml.inference"], task_id="guide-7.1", deadline=deadline, priority=8
    )
    assert listed.created and listed.task.state == market_pb2.TASK_STATE_OPEN
    for agent_id, price, ect, confidence, _claimed in GUIDE_BIDS:
        await client.place_bid(
            ids[agent_id],
            "guide-7.1",
            price=price,
            estimated_completion_s=ect,
            confidence=confidence,
        )
    result = await client.run_auction("guide-7.1")
    winner = result.winning_bid
    assert winner.agent_id == "ml-agent-003"
    assert (winner.price, winner.estimated_completion_seconds, winner.confidence) == (
        18.0,
        3000.0,
        0.90,
    )
    assert winner.load == 10 and winner.score == pytest.approx(108.0)
    assert result.bids_considered == 3
    assert result.task.state == market_pb2.TASK_STATE_ASSIGNED
    assert result.task.assigned_agent_id == "ml-agent-003"
    assert (await client.get_agent_load("ml-agent-003")).load == 11


async def test_guide_7_2_over_grpc(market: RunningMarket, registry: RegistryClient) -> None:
    client = market.client
    assert client is not None
    ids = [await register(registry, f"agent-{i}", "compute", port=9200 + i) for i in range(10)]
    for t in range(100):
        await client.list_task("compute", ["compute"], task_id=f"task-{t}", priority=5)
    for t in range(100):
        await asyncio.gather(
            *(
                client.place_bid(
                    identity,
                    f"task-{t}",
                    price=10.0,
                    estimated_completion_s=1000.0,
                    confidence=0.9,
                )
                for identity in ids
            )
        )
    for t in range(100):
        await client.run_auction(f"task-{t}")
    loads = [(await client.get_agent_load(f"agent-{i}")).load for i in range(10)]
    variance = statistics.pvariance(loads)
    assert loads == [10] * 10 and variance == 0


# --- once-only auctions, exact load ------------------------------------------------------------


async def test_once_only_auctions_and_exact_load(market: RunningMarket, registry) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    a = await register(registry, "a", "compute")
    await client.list_task("compute", ["compute"], task_id="t")
    await client.place_bid(a, "t", price=1.0, estimated_completion_s=5.0, confidence=0.9)
    first = await client.run_auction("t", request_id="run-1")
    with pytest.raises(errors.FailedPrecondition) as err:
        await client.run_auction("t")
    assert err.value.reason == "ALREADY_AUCTIONED" and err.value.field == "task_id"
    retry = await client.run_auction("t", request_id="run-1")
    assert retry.duplicate and retry.winning_bid == first.winning_bid
    assert (await client.get_agent_load("a")).load == 1

    done = await client.complete_task(a, "t", 1, "result", request_id="c-1")
    assert not done.duplicate and done.task.state == market_pb2.TASK_STATE_COMPLETED
    assert done.task.output == "result"
    for _ in range(3):
        again = await client.complete_task(a, "t", 1, "result", request_id="c-1")
        assert again.duplicate
    with pytest.raises(errors.FailedPrecondition) as err:
        await client.fail_task(a, "t", 1, "too late")
    assert err.value.reason == "ALREADY_CLOSED"
    load = await client.get_agent_load("a")
    assert (load.load, load.won, load.completed, load.failed) == (0, 1, 1, 0)
    task = await client.get_task("t")
    assert [(x.agent_id, x.outcome) for x in task.assignments] == [
        ("a", market_pb2.TASK_STATE_COMPLETED)
    ]


async def test_failure_relists_without_the_agent_that_failed(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    liar = await register(registry, "liar", "compute", port=9001)
    honest = await register(registry, "honest", "compute", port=9002)
    await client.list_task("compute", ["compute"], task_id="t", max_attempts=3)
    await client.place_bid(liar, "t", price=0.01, estimated_completion_s=1.0, confidence=1.0)
    await client.place_bid(honest, "t", price=10.0, estimated_completion_s=60.0, confidence=0.9)
    assert (await client.run_auction("t")).winning_bid.agent_id == "liar"
    failed = await client.fail_task(liar, "t", 1, "never meant to")
    assert failed.relisted and failed.task.attempt == 2
    assert list(failed.task.excluded_agent_ids) == ["liar"]
    with pytest.raises(errors.PermissionDenied) as err:
        await client.place_bid(liar, "t", price=0.01, estimated_completion_s=1.0, confidence=1.0)
    assert err.value.reason == "AGENT_EXCLUDED"
    await client.place_bid(
        honest, "t", price=10.0, estimated_completion_s=60.0, confidence=0.9, attempt=2
    )
    assert (await client.run_auction("t")).winning_bid.agent_id == "honest"
    await client.complete_task(honest, "t", 2, "ok")
    old = [b.agent_id async for b in client.iter_bids("t", attempt=1)]
    assert old == ["liar", "honest"]  # attempt 1's bids, from storage
    assert (await client.get_agent_load("liar")).failed == 1


# --- who may bid, and bad input ----------------------------------------------------------------


async def test_who_may_bid(market: RunningMarket, registry) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    await client.list_task("ml_inference", ["gpu", "ml.inference"], task_id="t")
    registered = await register(registry, "holder", "gpu", "ml.inference", port=9002)
    impostor = Identity.generate("holder")  # the registered id, another key
    with pytest.raises(errors.Unauthenticated) as err:
        await client.place_bid(impostor, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
    assert err.value.field == "signature"
    partial = await register(registry, "partial", "ml.inference", port=9003)
    with pytest.raises(errors.PermissionDenied) as err:
        await client.place_bid(partial, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
    assert err.value.reason == "MISSING_REQUIREMENTS" and err.value.field == "agent_id"
    stranger = Identity.generate("stranger")
    with pytest.raises(errors.PermissionDenied) as err:
        await client.place_bid(stranger, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
    assert err.value.reason == "BIDDER_NOT_REGISTERED"
    placed = await client.place_bid(
        registered, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0
    )
    assert placed.bid.sequence > 0 and not placed.replaced
    bids = await client.list_bids("t")
    assert [b.agent_id for b in bids.bids] == ["holder"] and bids.total_size == 1


async def test_bad_input_gets_canonical_codes_naming_the_field(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    a = await register(registry, "a", "compute")
    await client.list_task("compute", ["compute"], task_id="open")

    async def bid_error(task_id: str = "open", **kwargs) -> errors.ClientError:  # type: ignore[no-untyped-def]
        values = dict(price=1.0, estimated_completion_s=1.0, confidence=0.5)
        values.update(kwargs)
        with pytest.raises(errors.ClientError) as err:
            await client.place_bid(a, task_id, **values)
        return err.value

    cases = [
        (await bid_error(price=-1.0), errors.InvalidArgument, "price"),
        (await bid_error(price=float("nan")), errors.InvalidArgument, "price"),
        (await bid_error(confidence=1.01), errors.InvalidArgument, "confidence"),
        (await bid_error(confidence=-0.5), errors.InvalidArgument, "confidence"),
        (
            await bid_error(estimated_completion_s=0.0),
            errors.InvalidArgument,
            "estimated_completion_seconds",
        ),
        (
            await bid_error(estimated_completion_s=-3.0),
            errors.InvalidArgument,
            "estimated_completion_seconds",
        ),
        (await bid_error("no-such-task"), errors.NotFound, "task_id"),
        (await bid_error("bad task id"), errors.InvalidArgument, "task_id"),
    ]
    for error, cls, field in cases:
        assert isinstance(error, cls), error
        assert error.field == field, error
    # A closed task.
    await client.place_bid(a, "open", price=1.0, estimated_completion_s=1.0, confidence=0.5)
    await client.run_auction("open")
    closed = await bid_error("open")
    assert isinstance(closed, errors.FailedPrecondition) and closed.reason == "TASK_NOT_OPEN"

    async def list_error(**kwargs) -> errors.ClientError:  # type: ignore[no-untyped-def]
        values = dict(task_type="compute", requirements=["compute"], task_id="new")
        values.update(kwargs)
        with pytest.raises(errors.ClientError) as err:
            await client.list_task(**values)
        return err.value

    for error, field in [
        (await list_error(requirements=[]), "requirements"),
        (await list_error(deadline=time.time() - 60), "deadline_time"),
        (await list_error(priority=1000), "priority"),
        (await list_error(reward=-5.0), "reward"),
        (await list_error(task_type=""), "task_type"),
        (await list_error(capability="gpu"), "capability"),
        (await list_error(bidding_window_s=-1.0), "bidding_window"),
    ]:
        assert isinstance(error, errors.InvalidArgument) and error.field == field, error

    raw = create_channel(market.host.address)  # type: ignore[union-attr]
    try:
        method = raw.unary_unary("/agent2028.market.v1.MarketService/PlaceBid")
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await method(b"\xff\xff\xff", timeout=5)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await raw.close()
    # Missing issue time, bad enum values, a forged page token.
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(
            client.stub.PlaceBid,
            market_pb2.PlaceBidRequest(task_id="open", agent_id="a", price=1, confidence=1),
        )
    assert err.value.field == "issue_time"
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(
            client.stub.RunAuction, market_pb2.RunAuctionRequest(task_id="open", scoring=9)
        )
    assert err.value.field == "scoring"
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(client.stub.ListTasks, market_pb2.ListTasksRequest(states=[42]))
    assert err.value.field == "states[0]"
    with pytest.raises(errors.InvalidArgument) as err:
        await client.list_tasks(page_token="not-a-token!")
    assert err.value.field == "page_token"
    with pytest.raises(errors.InvalidArgument) as err:
        await client.complete_task(a, "open", 0, "x")
    assert err.value.field == "attempt"
    with pytest.raises(errors.InvalidArgument) as err:
        await client.complete_task(a, "open", 1, "x" * (300 * 1024))
    assert err.value.field == "output"
    with pytest.raises(errors.NotFound):
        await client.get_task("missing")
    with pytest.raises(errors.InvalidArgument) as err:
        await client.get_agent_load("")
    assert err.value.field == "agent_id"
    # A signature over other numbers than the ones sent.
    issue_ns = time.time_ns()
    forged = a.sign(*signing.bid("open", 0, "a", 1.0, 1.0, 0.5, issue_ns))
    await client.list_task("compute", ["compute"], task_id="open-2")
    with pytest.raises(errors.Unauthenticated) as err:
        await client._unary(
            client.stub.PlaceBid,
            market_pb2.PlaceBidRequest(
                task_id="open-2",
                agent_id="a",
                price=0.5,
                estimated_completion_seconds=1.0,
                confidence=0.5,
                issue_time=timestamp_from_ns(issue_ns),
                signature=forged,
            ),
        )
    assert err.value.field == "signature"
    assert (await client.list_bids("open-2")).total_size == 0

    url = f"http://127.0.0.1:{market.host.metrics_port}/metrics"  # type: ignore[union-attr]
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=5).read().decode()
    )
    internal = [
        line
        for line in metrics.splitlines()
        if line.startswith("agent2028_rpc_total")
        and 'service="market"' in line
        and 'code="INTERNAL"' in line
        and not line.endswith(" 0.0")
    ]
    assert internal == []
    assert "agent2028_market_tasks" in metrics and "agent2028_market_bids_total" in metrics


# --- deadlines and the market's own auctions -------------------------------------------------


async def test_expiry_closes_tasks_and_releases_load(market: RunningMarket, registry) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    a = await register(registry, "a", "compute")
    events: list[market_pb2.MarketEvent] = []

    async def watch() -> None:
        async for response in client.watch(types=["expired"]):
            events.extend(response.events)

    watcher = asyncio.create_task(watch())
    try:
        soon = time.time() + 0.6
        await client.list_task("compute", ["compute"], task_id="unbid", deadline=soon)
        await client.list_task("compute", ["compute"], task_id="held", deadline=soon)
        await client.place_bid(a, "held", price=1.0, estimated_completion_s=1.0, confidence=1.0)
        await client.run_auction("held")
        assert (await client.get_agent_load("a")).load == 1
        await eventually(lambda: len(events) == 2, timeout_s=10, what="two expiry events")
        assert {e.task.task_id for e in events} == {"unbid", "held"}
        for name in ("unbid", "held"):
            assert (await client.get_task(name)).state == market_pb2.TASK_STATE_EXPIRED
        load = await client.get_agent_load("a")
        assert (load.load, load.expired) == (0, 1)
        with pytest.raises(errors.FailedPrecondition):
            await client.complete_task(a, "held", 1, "late")
        relisted = await client.relist_task("held", deadline=time.time() + 60)
        assert relisted.task.state == market_pb2.TASK_STATE_OPEN
        assert list(relisted.task.excluded_agent_ids) == ["a"]
    finally:
        watcher.cancel()


async def test_the_market_auctions_when_the_bidding_window_closes(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    ids = [await register(registry, f"w-{i}", "compute", port=9300 + i) for i in range(3)]
    won: list[market_pb2.MarketEvent] = []

    async def watch() -> None:
        async for response in client.watch(types=["won"]):
            won.extend(response.events)

    watcher = asyncio.create_task(watch())
    try:
        await eventually(lambda: market.core.events.listeners > 0, what="watch subscribed")
        await client.list_task("compute", ["compute"], task_id="windowed", bidding_window_s=0.5)
        for i, identity in enumerate(ids):
            await client.place_bid(
                identity, "windowed", price=10.0 - i, estimated_completion_s=10.0, confidence=0.9
            )
        await eventually(lambda: len(won) == 1, timeout_s=10, what="the market's auction")
        assert won[0].agent_id == "w-2" and won[0].bid.price == 8.0
        assert (await client.get_task("windowed")).state == market_pb2.TASK_STATE_ASSIGNED
        # A window that closes with no bids waits for the first one.
        await client.list_task("compute", ["compute"], task_id="quiet", bidding_window_s=0.2)
        await eventually(
            lambda: time.time() > market.core.get("quiet").open_wall + 0.3, what="window closed"
        )
        await eventually(lambda: market.core.next_timer() is None, what="timer consumed")
        assert (await client.get_task("quiet")).state == market_pb2.TASK_STATE_OPEN
        await client.place_bid(
            ids[0], "quiet", price=1.0, estimated_completion_s=1.0, confidence=1.0
        )
        await eventually(lambda: len(won) == 2, timeout_s=10, what="auction on the first bid")
        assert won[1].task.task_id == "quiet"
    finally:
        watcher.cancel()


# --- trust-adjusted scoring (through a double of the trust service) -------------------------


async def test_trust_adjusted_auctions_ask_the_trust_service(
    market: RunningMarket, registry, trust_double
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    trust_host, trust = trust_double
    liar = await register(registry, "liar", "compute", port=9001)
    honest = await register(registry, "honest", "compute", port=9002)
    trust.scores.update({"liar": 0.02, "honest": 0.85})
    for name in ("plain", "trusted", "trust-down"):
        await client.list_task("compute", ["compute"], task_id=name)
        await client.place_bid(liar, name, price=1.0, estimated_completion_s=10.0, confidence=1.0)
        await client.place_bid(honest, name, price=4.0, estimated_completion_s=10.0, confidence=1.0)
    assert (await client.run_auction("plain")).winning_bid.agent_id == "liar"
    trusted = await client.run_auction("trusted", scoring="trust")
    assert trusted.winning_bid.agent_id == "honest"
    assert trusted.winning_bid.trust == pytest.approx(0.85)
    assert trusted.winning_bid.score == pytest.approx(4.0 * 0.01 / 1.1 / 0.85)
    assert sorted(trust.asked) == ["honest", "liar"]
    assert (await client.get_task("trusted")).assignments[0].scoring == (
        market_pb2.SCORING_TRUST_ADJUSTED
    )

    await trust_host.stop(grace_s=0)
    with pytest.raises(errors.Unavailable) as err:
        await client.run_auction("trust-down", scoring="trust")
    assert err.value.reason == "TRUST_UNAVAILABLE" and "trust" in err.value.message
    assert err.value.metadata["service"] == "trust"
    assert (await client.get_task("trust-down")).state == market_pb2.TASK_STATE_OPEN
    # Plain auctions do not need trust.
    assert (await client.run_auction("trust-down")).winning_bid.agent_id == "liar"


async def test_trust_adjusted_without_a_trust_service(tmp_path, calm_registry) -> None:  # type: ignore[no-untyped-def]
    running = RunningMarket(str(tmp_path / "m"), calm_registry.address, None)
    await running.start()
    try:
        client = running.client
        assert client is not None
        async with RegistryClient(calm_registry.address) as reg:
            a = await register(reg, "a", "compute")
        await client.list_task("compute", ["compute"], task_id="t")
        await client.place_bid(a, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
        with pytest.raises(errors.FailedPrecondition) as err:
            await client.run_auction("t", scoring="trust")
        assert err.value.reason == "TRUST_NOT_CONFIGURED"
        assert (await client.run_auction("t")).winning_bid.agent_id == "a"
    finally:
        await running.stop()


# --- streams ------------------------------------------------------------------------------------


async def test_agents_see_the_open_tasks_they_qualify_for_and_their_wins(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    ml = await register(registry, "ml", "gpu", "ml.inference", port=9001)
    await client.list_task("compute", ["compute"], task_id="compute-1")
    await client.list_task("ml_inference", ["gpu", "ml.inference"], task_id="ml-1", priority=1)
    await client.list_task("ml_inference", ["ml.inference"], task_id="ml-2", priority=9)
    seen: list[market_pb2.WatchOpenTasksResponse] = []

    async def follow() -> None:
        async for response in client.watch_open_tasks(["gpu", "ml.inference"], agent_id="ml"):
            seen.append(response)

    follower = asyncio.create_task(follow())
    try:
        await eventually(lambda: seen, what="the snapshot")
        assert seen[0].snapshot
        assert [t.task_id for t in seen[0].tasks] == ["ml-2", "ml-1"]  # by priority
        await client.list_task("compute", ["compute"], task_id="compute-2")
        await client.list_task("ml_inference", ["ml.inference"], task_id="ml-3")
        await client.place_bid(ml, "ml-1", price=1.0, estimated_completion_s=1.0, confidence=1.0)
        await client.run_auction("ml-1")

        def delivered() -> list[tuple[str, int]]:
            return [(t.task_id, t.state) for r in seen[1:] for t in r.tasks]

        await eventually(lambda: len(delivered()) == 2, what="a listing and a win")
        assert delivered() == [
            ("ml-3", market_pb2.TASK_STATE_OPEN),
            ("ml-1", market_pb2.TASK_STATE_ASSIGNED),
        ]
    finally:
        follower.cancel()
    with pytest.raises(errors.InvalidArgument) as err:
        async for _ in client.watch_open_tasks(["Not Valid"]):
            pass
    assert err.value.field == "capabilities[0]"


async def test_watch_resumes_by_index(market: RunningMarket) -> None:
    client = market.client
    assert client is not None
    stream = client.watch(resume=False)
    first = await anext(stream)
    assert not first.events and first.index > 0
    await client.list_task("compute", ["compute"], task_id="w1")
    listed = await anext(stream)
    assert [e.type for e in listed.events] == [market_pb2.EVENT_TYPE_TASK_LISTED]
    await stream.aclose()
    await client.list_task("compute", ["compute"], task_id="w2")
    resumed = client.watch(from_index=listed.index, resume=False)
    backlog = await anext(resumed)
    assert [e.task.task_id for e in backlog.events] == ["w2"]
    await resumed.aclose()
    with pytest.raises(errors.OutOfRange):
        async for _ in client.watch(from_index=1, resume=False):
            pass


# --- durability and the registry -----------------------------------------------------------------


async def test_a_restart_keeps_tasks_bids_assignments_and_load(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    a = await register(registry, "a", "compute", port=9001)
    b = await register(registry, "b", "compute", port=9002)
    await client.list_task("compute", ["compute"], task_id="assigned", deadline=time.time() + 600)
    await client.list_task("compute", ["compute"], task_id="open")
    for identity in (a, b):
        for name in ("assigned", "open"):
            await client.place_bid(
                identity, name, price=2.0, estimated_completion_s=10.0, confidence=0.8
            )
    before = await client.run_auction("assigned", request_id="once")
    await market.restart()
    client = market.client
    assert client is not None
    assert (await client.get_task("assigned")).assigned_agent_id == before.winning_bid.agent_id
    assert (await client.get_agent_load(before.winning_bid.agent_id)).load == 1
    assert [x.agent_id for x in (await client.list_bids("open")).bids] == ["a", "b"]
    assert (await client.run_auction("assigned", request_id="once")).duplicate
    with pytest.raises(errors.FailedPrecondition):
        await client.run_auction("assigned")
    # The winner's report still verifies with the key it bid with.
    winner = a if before.winning_bid.agent_id == "a" else b
    completed = (await client.complete_task(winner, "assigned", 1, "ok")).task
    assert completed.state == market_pb2.TASK_STATE_COMPLETED
    # A closed task's bids leave memory, but it still says how many it had,
    # after another restart too, and lists them from storage.
    assert (completed.bid_count, (await client.get_task("assigned")).bid_count) == (2, 2)
    await market.restart()
    client = market.client
    assert client is not None
    assert (await client.get_task("assigned")).bid_count == 2
    assert [x.agent_id for x in (await client.list_bids("assigned")).bids] == ["a", "b"]
    assert (await client.get_task("open")).bid_count == 2


async def test_an_agent_leaving_the_registry_fails_its_tasks(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    leaver = await register(registry, "leaver", "compute", port=9001)
    await client.list_task("compute", ["compute"], task_id="t", max_attempts=2)
    await client.place_bid(leaver, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
    await client.run_auction("t")
    await eventually(lambda: "leaver" in market.app.directory.agents, what="directory sync")  # type: ignore[union-attr]
    await registry.deregister(leaver)

    async def relisted() -> bool:
        task = await client.get_task("t")
        return task.state == market_pb2.TASK_STATE_OPEN and task.attempt == 2

    await eventually(relisted, timeout_s=10, what="the task failed over")
    task = await client.get_task("t")
    assert "deregistered" in task.assignments[0].error
    assert (await client.get_agent_load("leaver")).load == 0


async def test_a_bid_from_a_just_registered_agent_and_a_registry_outage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.registry.config import RegistryConfig
    from services.registry.servicer import RegistryApp
    from tests.integration.market.support import CALM_REGISTRY
    from tests.support import serve

    reg_host = await serve(
        RegistryApp(RegistryConfig(settings=CALM_REGISTRY, sweep_interval_s=0.05, watch_queue=64)),
        str(tmp_path / "r"),
    )
    running = RunningMarket(str(tmp_path / "m"), reg_host.address, None)
    await running.start()
    try:
        client = running.client
        assert client is not None
        await client.list_task("compute", ["compute"], task_id="t")
        async with RegistryClient(reg_host.address) as reg:
            fresh = await register(reg, "fresh", "compute")
        # Whether or not the watch has delivered it yet, the bid is accepted.
        await client.place_bid(fresh, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
        await reg_host.stop(grace_s=0)
        unknown = Identity.generate("unknown")
        with pytest.raises(errors.Unavailable) as err:
            await client.place_bid(
                unknown, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0
            )
        assert err.value.reason == "REGISTRY_UNAVAILABLE" and "registry" in err.value.message
        # Known bidders keep bidding while the registry is away.
        again = await client.place_bid(
            fresh, "t", price=0.5, estimated_completion_s=1.0, confidence=1.0
        )
        assert again.replaced
    finally:
        await running.stop()


async def test_a_refusal_that_changed_state_still_commits_it(
    market: RunningMarket, registry
) -> None:  # type: ignore[no-untyped-def]
    """A bid on a task whose deadline passed before the timer noticed closes
    the task and is refused: that expiry is persisted and published too."""
    client = market.client
    assert client is not None
    app = market.app
    assert app is not None and app._timer_task is not None
    app._timer_task.cancel()  # the timer must not get there first
    a = await register(registry, "a", "compute")
    expired: list[market_pb2.MarketEvent] = []

    async def watch() -> None:
        async for response in client.watch(types=["expired"]):
            expired.extend(response.events)

    watcher = asyncio.create_task(watch())
    try:
        await eventually(lambda: app.core.events.listeners > 0, what="watch subscribed")
        listed_at = time.time()
        await client.list_task("compute", ["compute"], task_id="t", deadline=listed_at + 0.3)
        await eventually(lambda: time.time() > listed_at + 0.35, what="the deadline passing")
        with pytest.raises(errors.FailedPrecondition) as err:
            await client.place_bid(a, "t", price=1.0, estimated_completion_s=1.0, confidence=1.0)
        assert err.value.reason == "TASK_NOT_OPEN"
        await eventually(lambda: len(expired) == 1, what="the expiry published")
        tasks, _, _ = await app.store.load()
        assert [(v.task_id, v.state.name) for v in tasks] == [("t", "EXPIRED")]
    finally:
        watcher.cancel()
