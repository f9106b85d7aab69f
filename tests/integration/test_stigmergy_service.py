"""The stigmergy service over gRPC with a real registry: signed deposits,
sensing, the watch stream, the background tick, restarts, and every bad input."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from agent2028.stigmergy.v1 import stigmergy_pb2
from clients import errors
from clients.channel import create_channel
from clients.stigmergy import StigmergyClient, deposit_request, region
from services.common.crypto import Identity
from tests.support import eventually
from tests.swarm_tier import register, start_stigmergy


@pytest.fixture
async def field(registry_server, tmp_path):  # type: ignore[no-untyped-def]
    host, app = await start_stigmergy(str(tmp_path), registry_server.address, deposit_burst=20.0)
    client = StigmergyClient(host.address)
    try:
        yield client, app
    finally:
        await client.close()
        await host.stop(grace_s=0.5)


@pytest.fixture
async def scouts(registry_server):  # type: ignore[no-untyped-def]
    return await register(registry_server.address, "scout-001", "scout-002", "scout-003")


async def test_guide_6_1_deposit_read_and_follow_the_gradient(field, scouts) -> None:  # type: ignore[no-untyped-def]
    client, _ = field
    response = await client.deposit(scouts["scout-001"], 500, 500, "food_source")
    assert (response.intensity, response.duplicate, response.capped) == (1.0, False, False)
    assert await client.read(500, 500, "food_source") == 1.0
    # Agents around the deposit sense it and head for it; far ones sense nothing.
    for x, y in ((400, 450), (550, 520), (498, 503), (420, 580)):
        g = await client.gradient(x, y, "food_source")
        ex, ey = 500 - x, 500 - y
        assert not g.flat
        assert (g.dx * ex + g.dy * ey) / math.hypot(ex, ey) > 0.99
    far = await client.gradient(100, 100, "food_source")
    assert far.flat and (far.dx, far.dy) == (0.0, 0.0)
    # Danger repels when negated (6.2).
    await client.deposit(scouts["scout-002"], 500, 500, "danger", 3.0)
    danger = await client.gradient(450, 450, "danger")
    assert (-danger.dx, -danger.dy) == pytest.approx((-math.sqrt(0.5), -math.sqrt(0.5)))
    near = await client.find_nearest(480, 480, "food_source", radius=50)
    assert (near.found, near.x, near.y) == (True, 500, 500)
    view = await client.sense(
        "danger", area=region(400, 400, 600, 600), columns=4, rows=4, aggregation="max"
    )
    assert (
        view.columns == 4
        and max(view.values) == pytest.approx(3.0)
        and view.total == pytest.approx(3.0)
    )
    info = await client.get_field()
    assert (info.width, info.height, info.types_declared) == (1000, 1000, False)
    assert {layer.pheromone_type for layer in info.layers} == {"food_source", "danger"}
    assert info.deposits == 2


async def test_deposits_must_be_signed_by_a_registered_agent(field, scouts) -> None:  # type: ignore[no-untyped-def]
    client, _ = field
    stranger = Identity.generate("stranger")
    with pytest.raises(errors.NotFound) as unknown:
        await client.deposit(stranger, 5, 5, "food")
    assert (unknown.value.field, unknown.value.reason) == ("agent_id", "AGENT_NOT_REGISTERED")
    impostor = Identity.generate("scout-001")  # the right id, the wrong key
    with pytest.raises(errors.Unauthenticated) as forged:
        await client.deposit(impostor, 5, 5, "food")
    assert forged.value.field == "signature"
    # A signed request whose content was changed in flight fails too.
    request = deposit_request(scouts["scout-001"], 5, 5, "food", 1.0)
    request.amount = 50.0
    with pytest.raises(errors.Unauthenticated):
        await client._unary(client.stub.Deposit, request)
    request.ClearField("signature")
    with pytest.raises(errors.Unauthenticated) as missing:
        await client._unary(client.stub.Deposit, request)
    assert missing.value.reason == "MALFORMED_SIGNATURE"
    assert await client.read(5, 5, "food") == 0.0


async def test_retries_count_once_and_floods_are_rate_limited(field, scouts) -> None:  # type: ignore[no-untyped-def]
    client, _ = field
    request = deposit_request(scouts["scout-001"], 9, 9, "food", 2.0, request_id="retry-me")
    first = await client._unary(client.stub.Deposit, request)
    again = await client._unary(client.stub.Deposit, request)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert await client.read(9, 9, "food") == 2.0
    flooder = scouts["scout-002"]
    accepted = 0
    with pytest.raises(errors.ResourceExhausted) as info:
        for _ in range(100):
            await client.deposit(flooder, 10, 10, "food")
            accepted += 1
    assert info.value.reason == "DEPOSIT_RATE_LIMITED" and info.value.field == "agent_id"
    assert 20 <= accepted < 100
    # Other agents are not held back by one agent's flood.
    await client.deposit(scouts["scout-003"], 11, 11, "food")


@pytest.mark.parametrize(
    ("mutate", "field_name"),
    [
        (lambda r: setattr(r, "x", 1000.0), "x"),
        (lambda r: setattr(r, "x", -1.0), "x"),
        (lambda r: setattr(r, "y", 1e12), "y"),
        (lambda r: setattr(r, "x", math.nan), "x"),
        (lambda r: setattr(r, "y", math.inf), "y"),
        (lambda r: setattr(r, "amount", -2.0), "amount"),
        (lambda r: setattr(r, "amount", math.nan), "amount"),
        (lambda r: setattr(r, "pheromone_type", "Food Source"), "pheromone_type"),
        (lambda r: setattr(r, "agent_id", ""), "agent_id"),
        (lambda r: setattr(r, "request_id", "has spaces"), "request_id"),
        (lambda r: r.ClearField("issue_time"), "issue_time"),
        (lambda r: r.issue_time.FromSeconds(1), "issue_time"),
    ],
)
async def test_bad_deposits_are_invalid_argument_naming_the_field(
    field, scouts, mutate, field_name
) -> None:  # type: ignore[no-untyped-def]
    client, app = field
    request = deposit_request(scouts["scout-001"], 5, 5, "food", 1.0)
    mutate(request)
    with pytest.raises(errors.InvalidArgument) as info:
        await client._unary(client.stub.Deposit, request)
    assert info.value.field == field_name
    assert app.field.deposits == 0


async def test_bad_reads_are_invalid_argument_naming_the_field(field) -> None:  # type: ignore[no-untyped-def]
    client, _ = field
    cases = [
        (client.read(math.nan, 1, "food"), "x"),
        (client.read(1, 1000, "food"), "y"),
        (client.gradient(1, 1, "food", radius=10_000), "radius"),
        (client.gradient(1, 1, "food", radius=-3), "radius"),
        (client.gradient(-math.inf, 1, "food"), "x"),
        (client.find_nearest(1, 1, "food", min_intensity=-1), "min_intensity"),
        (client.sense("food", area=region(10, 10, 5, 20)), "x_max"),
        (client.sense("food", area=region(0, 0, 10, 2000)), "y_max"),
        (client.sense("food", columns=1000, rows=1000), "columns"),
        (client.read(1, 1, ""), "pheromone_type"),
    ]
    for call, name in cases:
        with pytest.raises(errors.InvalidArgument) as info:
            await call
        assert info.value.field == name
    raw = create_channel(client.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:
            await raw.unary_unary("/agent2028.stigmergy.v1.StigmergyService/Read")(
                b"\xff\xff", timeout=5
            )
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await raw.close()


async def test_declared_types_refuse_unknown_ones(registry_server, tmp_path, scouts) -> None:  # type: ignore[no-untyped-def]
    host, _ = await start_stigmergy(
        str(tmp_path), registry_server.address, types=("food", "danger")
    )
    try:
        async with StigmergyClient(host.address) as client:
            await client.deposit(scouts["scout-001"], 1, 1, "danger")
            with pytest.raises(errors.InvalidArgument) as info:
                await client.deposit(scouts["scout-001"], 1, 1, "success_trail")
            assert (info.value.field, info.value.reason) == (
                "pheromone_type",
                "UNKNOWN_PHEROMONE_TYPE",
            )
            assert (await client.get_field()).types_declared
    finally:
        await host.stop(grace_s=0.5)


async def test_the_background_tick_decays_a_deposit_to_nothing_and_watch_sees_it(
    registry_server, tmp_path, scouts
) -> None:  # type: ignore[no-untyped-def]
    host, app = await start_stigmergy(
        str(tmp_path),
        registry_server.address,
        tick_interval_s=0.02,
        decay_rate=0.3,
        width=200,
        height=200,
    )
    try:
        async with StigmergyClient(host.address) as client:
            frames: list[stigmergy_pb2.FieldView] = []

            async def watch() -> None:
                async for view in client.watch_field(
                    "food", columns=8, rows=8, aggregation="max", min_interval_s=0.05
                ):
                    frames.append(view)

            watcher = asyncio.create_task(watch())
            await eventually(lambda: frames, what="the first frame")
            assert frames[0].total == 0 and len(frames[0].values) == 64
            await client.deposit(scouts["scout-001"], 100, 100, "food", 50.0)
            await eventually(
                lambda: any(f.total > 0 for f in frames), what="a frame with the deposit"
            )

            async def gone() -> bool:
                info = await client.get_field()
                return info.layers[0].total == 0 and not info.layers[0].active

            await eventually(gone, timeout_s=20, what="the deposit decaying to nothing")
            assert app.field.ticks > 10
            await eventually(lambda: frames[-1].total == 0, what="a frame of the empty field")
            watcher.cancel()
    finally:
        await host.stop(grace_s=0.5)


async def test_the_field_survives_a_restart(registry_server, tmp_path, scouts) -> None:  # type: ignore[no-untyped-def]
    host, _ = await start_stigmergy(str(tmp_path), registry_server.address)
    async with StigmergyClient(host.address) as client:
        await client.deposit(scouts["scout-001"], 42, 24, "food", 7.0)
    await host.stop(grace_s=0.5)  # graceful: the field is saved
    host, app = await start_stigmergy(str(tmp_path), registry_server.address)
    try:
        async with StigmergyClient(host.address) as client:
            assert await client.read(42, 24, "food") == 7.0  # no ticks configured: no decay
            assert app.field.names() == ["food"]
    finally:
        await host.stop(grace_s=0.5)


async def test_an_unreachable_registry_is_unavailable_but_cached_keys_keep_working(
    registry_server, field, scouts
) -> None:  # type: ignore[no-untyped-def]
    client, _ = field
    await client.deposit(scouts["scout-001"], 3, 3, "food")  # scout-001's key is now cached
    await registry_server.host.stop(grace_s=0)
    await client.deposit(scouts["scout-001"], 3, 3, "food")
    with pytest.raises(errors.Unavailable) as info:
        await client.deposit(scouts["scout-002"], 3, 3, "food")
    assert info.value.reason == "REGISTRY_UNAVAILABLE"
    assert await client.read(3, 3, "food") == 2.0
