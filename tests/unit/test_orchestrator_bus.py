"""The event bus without sockets: cursors, filters, retention, resuming,
lagging subscribers, idempotent publishing and durability across a restart;
and the orchestrator's routing, health table, operation store and settings."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.config import ConfigError
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    OutOfRange,
    PermissionDenied,
    Unavailable,
)
from services.common.storage import Database
from services.orchestrator import bus as bus_module
from services.orchestrator.bus import EventBus, chunks
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.core import (
    OPERATIONS_SCHEMA,
    ROUTES,
    HealthTable,
    Kind,
    OperationStore,
    Serving,
    Status,
    check_request_id,
    kind_of,
    same_request,
)
from services.orchestrator.events import CATALOG, Draft, TypeFilter, validate_publish


def draft(event_type: str = "app.tick", n: int = 0, **kw: object) -> Draft:
    return Draft(event_type, "test", attributes={"n": str(n)}, **kw)  # type: ignore[arg-type]


async def collect(bus: EventBus, sub, until: int) -> list:  # type: ignore[no-untyped-def]
    """Messages of ``sub`` until one is current through ``until``."""
    out = []
    async with asyncio.timeout(10):
        async for batch in bus.stream(sub):
            out.append(batch)
            if batch.cursor >= until and batch.caught_up is False and batch.events:
                return out
            if batch.cursor >= until and batch.caught_up:
                return out
    return out


@pytest.fixture
async def bus():  # type: ignore[no-untyped-def]
    b = EventBus(None, history=50, queue_size=8)
    await b.open()
    yield b
    await b.close()


# --- types and filters -----------------------------------------------------------------


def test_filters_match_exact_types_namespaces_and_everything() -> None:
    f = TypeFilter(["agent.joined", "market.*"])
    assert f("agent.joined") and f("market.bid_placed") and f("market.anything")
    assert not f("agent.left") and not f("app.market")
    assert TypeFilter([])("whatever.happens") and TypeFilter(["*"])("agent.left")
    assert TypeFilter(["app.deployed"])("app.deployed")  # an open namespace


@pytest.mark.parametrize(
    ("patterns", "field", "reason"),
    [
        (["agent.exploded"], "types[0]", "UNKNOWN_EVENT_TYPE"),
        (["app.ok", "NotAType"], "types[1]", "MALFORMED_EVENT_TYPE"),
        (["agent"], "types[0]", "MALFORMED_EVENT_TYPE"),
        (["Bad.*"], "types[0]", "MALFORMED_EVENT_TYPE"),
        (["x" * 70 + ".y"], "types[0]", "FIELD_TOO_LONG"),
        ([""], "types[0]", "EMPTY_FIELD"),
        ([f"app.t{i}" for i in range(65)], "types", "TOO_MANY_VALUES"),
    ],
)
def test_bad_filters_name_the_entry(patterns, field, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        TypeFilter(patterns)
    assert (err.value.field, err.value.reason) == (field, reason)


def test_publishers_keep_out_of_the_system_namespaces() -> None:
    assert validate_publish(Draft("app.deployed", "ci", summary="v2")).type == "app.deployed"
    with pytest.raises(PermissionDenied) as denied:
        validate_publish(Draft("agent.joined", "me", summary="x"))
    assert denied.value.field == "type"
    with pytest.raises(InvalidArgument) as err:
        validate_publish(Draft("consensus.maybe", "me", summary="x"))
    assert err.value.reason == "UNKNOWN_EVENT_TYPE"
    with pytest.raises(InvalidArgument) as err:
        validate_publish(Draft("app.deployed", "me"))
    assert (err.value.field, err.value.reason) == ("attributes", "EMPTY_PAYLOAD")
    with pytest.raises(InvalidArgument) as err:
        validate_publish(Draft("app.deployed", "me", attributes={"k": "v" * 3000}))
    assert err.value.field == "attributes"
    with pytest.raises(InvalidArgument) as err:
        validate_publish(Draft("app.deployed", "bad source", summary="x"))
    assert err.value.field == "source"
    assert all("." in t for t in CATALOG)


# --- cursors, history, resuming ---------------------------------------------------------


async def test_cursors_increase_and_history_is_bounded(bus: EventBus) -> None:
    results = await bus.publish([draft(n=i) for i in range(80)])
    cursors = [e.cursor for e, _ in results]
    assert cursors == list(range(1, 81)) and bus.head == 80
    assert bus.retained == 50 and bus.oldest == 31
    assert [e.cursor for e in bus.since(75)] == [76, 77, 78, 79, 80]
    bus.check_cursor(30)  # resuming right after the oldest retained one is fine
    with pytest.raises(OutOfRange) as err:
        bus.check_cursor(29)
    assert (err.value.reason, err.value.field) == ("CURSOR_EXPIRED", "from_cursor")
    assert err.value.metadata["oldest_cursor"] == "31"
    with pytest.raises(OutOfRange) as err:
        bus.check_cursor(81)
    assert err.value.reason == "CURSOR_IN_FUTURE"
    with pytest.raises(InvalidArgument):
        bus.check_cursor(-1)


async def test_a_publish_with_a_request_id_counts_once(bus: EventBus) -> None:
    ((first, dup),) = await bus.publish([draft(request_id="r1")])
    ((again, dup2),) = await bus.publish([draft(n=9, request_id="r1")])
    assert not dup and dup2 and again is first and bus.head == 1
    # Within one batch too.
    out = await bus.publish([draft(request_id="r2"), draft(request_id="r2")])
    assert [d for _, d in out] == [False, True] and bus.head == 2


async def test_a_subscriber_sees_only_its_types_in_order_and_resumes(bus: EventBus) -> None:
    await bus.publish([draft("app.a", 0), draft("app.b", 1)])
    sub = bus.subscribe(TypeFilter(["app.a"]), from_cursor=0)
    stream = bus.stream(sub)
    header = await anext(stream)
    assert header.caught_up and header.cursor == 2 and not header.events
    await bus.publish([draft("app.b", 2), draft("app.a", 3), draft("app.a", 4)])
    live = await anext(stream)
    assert [e.attributes["n"] for e in live.events] == ["3", "4"]
    await stream.aclose()
    assert bus.subscribers == 0
    # Resuming from the first live event: the rest, then caught up.
    resumed = bus.subscribe(TypeFilter(["app.a"]), from_cursor=live.events[0].cursor)
    stream = bus.stream(resumed)
    first = await anext(stream)
    assert [e.attributes["n"] for e in first.events] == ["4"]
    assert (await anext(stream)).caught_up
    await stream.aclose()
    oldest = bus.subscribe(TypeFilter([]), from_oldest=True)
    stream = bus.stream(oldest)
    assert [e.cursor for e in (await anext(stream)).events] == [1, 2, 3, 4, 5]
    await stream.aclose()
    with pytest.raises(InvalidArgument):
        bus.subscribe(TypeFilter([]), from_cursor=1, from_oldest=True)


async def test_a_lagging_subscriber_is_told_and_caught_up_from_history(bus: EventBus) -> None:
    sub = bus.subscribe(TypeFilter(["app.tick"]))
    stream = bus.stream(sub)
    await anext(stream)  # live from here, then it does not read
    # Publishers are never held up by it: 30 events into a queue of 8.
    await asyncio.wait_for(bus.publish([draft(n=i) for i in range(30)]), 5)
    assert sub.lagged and len(sub.queue) == 8
    got, lag = [], None
    while len(got) < 30:
        batch = await asyncio.wait_for(anext(stream), 5)
        if batch.lag is not None:
            lag = batch.lag
        got.extend(int(e.attributes["n"]) for e in batch.events)
    assert got == list(range(30)) and lag == (8, 0)
    # And it is live again.
    await bus.publish([draft(n=30)])
    batch = await asyncio.wait_for(anext(stream), 5)
    assert [e.attributes["n"] for e in batch.events] == ["30"]
    await stream.aclose()


async def test_lag_beyond_the_history_reports_what_was_missed(bus: EventBus) -> None:
    sub = bus.subscribe(TypeFilter([]))
    stream = bus.stream(sub)
    await anext(stream)
    await bus.publish([draft(n=i) for i in range(120)])  # history keeps 50
    got, lag = [], None
    while not got or got[-1] != 119:
        batch = await asyncio.wait_for(anext(stream), 5)
        lag = batch.lag or lag
        got.extend(int(e.attributes["n"]) for e in batch.events)
    assert got[:8] == list(range(8)) and got[8:] == list(range(70, 120))
    assert lag == (8, 62)  # cursors 9..70 were gone
    await stream.aclose()


def test_messages_stay_small_whatever_the_events_carry() -> None:
    big = [
        bus_module.Event(i, "app.x", "t", "", 0.0, {"b": "x" * 100_000}, "", "") for i in range(40)
    ]
    parts = chunks(big)
    assert [e for part in parts for e in part] == big
    assert all(
        sum(len(e.attributes["b"]) for e in part) <= bus_module.BATCH_BYTES for part in parts
    )
    small = [bus_module.Event(i, "app.x", "t", "", 0.0, {}, "", "") for i in range(600)]
    assert [len(p) for p in chunks(small)] == [256, 256, 88]


async def test_events_and_watch_positions_survive_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "bus.db")

    async def opened() -> tuple[Database, EventBus]:
        db = Database(path, schema=bus_module.SCHEMA)
        await db.open()
        b = EventBus(db, history=20)
        await b.open()
        return db, b

    db, b = await opened()
    await b.publish([draft(n=i) for i in range(30)], position=("registry", 1234))
    await b.publish([draft(request_id="once")])
    await b.publish([], position=("market", 99))
    head = b.head
    await b.close()
    await db.close()

    db, b = await opened()
    try:
        assert b.head == head == 31 and b.retained == 20 and b.oldest == 12
        assert b.positions == {"registry": 1234, "market": 99}
        assert [e.cursor for e in b.since(29)] == [30, 31]
        ((event, duplicate),) = await b.publish([draft(request_id="once")])
        assert duplicate and event.cursor == 31
        ((event, duplicate),) = await b.publish([draft()])
        assert event.cursor == 32 and not duplicate
        count = await db.fetchone("SELECT count(*) FROM events")
        assert count is not None and count[0] <= 21  # trimmed on disk too
    finally:
        await b.close()
        await db.close()


# --- routing, health, operations ----------------------------------------------------------


def test_every_kind_has_a_route_and_unknown_kinds_are_refused() -> None:
    assert set(ROUTES) == set(Kind)
    assert ROUTES[Kind.EXECUTE_WITH_CONSENSUS].services == (
        "registry",
        "consensus",
        "broker",
        "trust",
    )
    assert kind_of("allocate") is Kind.ALLOCATE
    for bad in (None, "teleport"):
        with pytest.raises(InvalidArgument) as err:
            kind_of(bad)
        assert (err.value.field, err.value.reason) == ("operation", "UNKNOWN_OPERATION_KIND")
    assert check_request_id("") == "" and check_request_id("r-1") == "r-1"
    with pytest.raises(InvalidArgument):
        check_request_id("x" * 81)


def test_the_health_table_names_the_first_service_down() -> None:
    table = HealthTable(
        {
            name: f"127.0.0.1:{i}"
            for i, name in enumerate(
                ("registry", "broker", "consensus", "trust", "market", "stigmergy", "swarm"), 50051
            )
        }
    )
    for name in table.services:
        table.set(name, Serving.SERVING)
    table.require(Kind.ALLOCATE)
    assert table.set("market", Serving.UNREACHABLE, "connection refused")
    assert not table.set("market", Serving.UNREACHABLE, "connection refused")
    with pytest.raises(Unavailable) as err:
        table.require(Kind.ALLOCATE)
    assert err.value.metadata["service"] == "market"
    assert err.value.metadata["tier"] == "SWARM" and "connection refused" in err.value.message
    table.require(Kind.EXECUTE)
    table.set("registry", Serving.NOT_SERVING)
    with pytest.raises(Unavailable) as err:
        table.require(Kind.EXECUTE)
    assert err.value.metadata["service"] == "registry"


async def test_finished_operations_are_kept_by_request_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(os.path.join(str(tmp_path), "ops.db"), schema=OPERATIONS_SCHEMA)
    await db.open()
    try:
        store = OperationStore(db, retention=3)
        for i in range(5):
            await store.save(f"r{i}", Kind.EXECUTE, b"fp", Status.SUCCEEDED, b"payload%d" % i)
        assert await store.get("r0") is None  # beyond the retention
        kept = await store.get("r4")
        assert kept is not None and kept.payload == b"payload4" and kept.status is Status.SUCCEEDED
        page = await store.page(before=0, size=2, kind=None)
        assert [p.request_id for p in page] == ["r4", "r3"]
        assert [p.request_id for p in await store.page(before=page[-1].seq, size=5, kind=None)] == [
            "r2"
        ]
        assert await store.page(before=0, size=5, kind=Kind.SIGNAL) == []
        same_request(b"a", b"a", "r4")
        with pytest.raises(AlreadyExists) as err:
            same_request(b"a", b"b", "r4")
        assert err.value.field == "request_id"
    finally:
        await db.close()


def test_settings_are_validated_naming_the_variable() -> None:
    config = OrchestratorConfig.from_env({"BROKER_ADDR": "10.0.0.2:6000"})
    assert config.addresses["broker"] == "10.0.0.2:6000"
    assert config.addresses["registry"] == "127.0.0.1:50051"
    for name, value in (
        ("ORCHESTRATOR_EVENT_HISTORY", "0"),
        ("ORCHESTRATOR_SUBSCRIBER_QUEUE", "many"),
        ("ORCHESTRATOR_ID", "not an id"),
        ("ORCHESTRATOR_ADOPT_ALL_POOLS", "perhaps"),
        ("ORCHESTRATOR_SOURCES", "registry,gossip"),
        ("MARKET_ADDR", "nowhere"),
        ("ORCHESTRATOR_DEFAULT_TIMEOUT_S", "nan"),
    ):
        with pytest.raises(ConfigError) as err:
            OrchestratorConfig.from_env({name: value})
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        OrchestratorConfig.from_env(
            {"ORCHESTRATOR_DEFAULT_TIMEOUT_S": "100", "ORCHESTRATOR_MAX_TIMEOUT_S": "50"}
        )
