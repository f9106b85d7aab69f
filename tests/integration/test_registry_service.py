"""The registry over gRPC: every RPC, every bad input, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import functools
import operator
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent2028.registry.v1 import registry_pb2, registry_pb2_grpc
from clients import errors
from clients.channel import create_channel
from clients.registry import RegistryClient, now_timestamp
from services.common import signing
from services.common.crypto import Identity
from tests.support import eventually


async def register(
    client: RegistryClient, agent_id: str, caps=("compute",), port: int = 9000, **kwargs
):  # type: ignore[no-untyped-def]
    identity = Identity.generate(agent_id)
    response = await client.register(
        identity, address=f"127.0.0.1:{port}", capabilities=list(caps), **kwargs
    )
    return identity, response


class HeartbeatStream:
    """A raw heartbeat stream for tests."""

    def __init__(self, client: RegistryClient, identity: Identity, lease_id: str) -> None:
        self.call = client.stub.Heartbeat()
        self.identity = identity
        self.lease_id = lease_id
        self.sequence = 0

    async def beat(
        self,
        *,
        health: float = 1.0,
        load: int = 0,
        latency: float = 5.0,
        sign: bool | None = None,
        agent_id: str | None = None,
    ) -> registry_pb2.HeartbeatResponse:
        self.sequence += 1
        send_ns, send_time = now_timestamp()
        request = registry_pb2.HeartbeatRequest(
            agent_id=agent_id or self.identity.signer_id,
            lease_id=self.lease_id,
            sequence=self.sequence,
            load=load,
            health=health,
            observed_latency_ms=latency,
            send_time=send_time,
        )
        if sign if sign is not None else self.sequence == 1:
            request.signature = self.identity.sign(
                *signing.heartbeat_open(self.identity.signer_id, self.lease_id, send_ns)
            )
        try:
            await self.call.write(request)
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        except asyncio.InvalidStateError:
            response = grpc.aio.EOF
        if response is grpc.aio.EOF:
            raise errors.from_rpc_error(
                _StatusOf(
                    await self.call.code(),
                    await self.call.details(),
                    await self.call.trailing_metadata(),
                )
            )
        return response

    def close(self) -> None:
        self.call.cancel()


class _StatusOf(grpc.RpcError):
    def __init__(self, code, details, trailers) -> None:  # type: ignore[no-untyped-def]
        self._c, self._d, self._t = code, details, trailers

    def code(self):  # type: ignore[no-untyped-def]
        return self._c

    def details(self):  # type: ignore[no-untyped-def]
        return self._d

    def trailing_metadata(self):  # type: ignore[no-untyped-def]
        return self._t


@pytest.fixture
async def client(registry_server):  # type: ignore[no-untyped-def]
    async with RegistryClient(registry_server.address) as c:
        yield c


# --- the happy paths ---------------------------------------------------------------------


async def test_register_get_find_list_and_deregister(client: RegistryClient) -> None:
    db, response = await register(client, "db-1", ["database.query"], metadata={"zone": "a"})
    assert response.lease.lease_id and response.lease.ttl.seconds + response.lease.ttl.nanos > 0
    assert not response.refreshed
    await register(client, "ml-1", ["ml.inference"], port=9001)
    agent = await client.get_agent("db-1")
    assert agent.card.metadata["zone"] == "a" and agent.status == 1
    found = await client.find_by_capability("database.query")
    assert [a.card.agent_id for a in found.agents] == ["db-1"] and found.total_with_capability == 1
    assert len(found.scores) == 1 and found.scores[0] == pytest.approx(agent.fitness)
    listed = await client.list_agents()
    assert {a.card.agent_id for a in listed.agents} == {"db-1", "ml-1"} and listed.total_size == 2
    await client.deregister(db)
    with pytest.raises(errors.NotFound) as err:
        await client.get_agent("db-1")
    assert err.value.reason == "AGENT_NOT_FOUND"


async def test_refresh_by_the_same_key(client: RegistryClient) -> None:
    identity, first = await register(client, "a-1")
    second = await client.register(
        identity, address="127.0.0.1:9100", capabilities=["compute", "echo"]
    )
    assert second.refreshed and second.lease.lease_id != first.lease.lease_id
    assert list((await client.get_agent("a-1")).card.capabilities) == ["compute", "echo"]


async def test_pagination_over_the_wire(client: RegistryClient) -> None:
    for i in range(23):
        await register(client, f"agent-{i:02d}", port=9000 + i)
    pages, token = [], ""
    while True:
        page = await client.list_agents(page_size=10, page_token=token)
        pages.append([a.card.agent_id for a in page.agents])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 3]
    assert functools.reduce(operator.iadd, pages, []) == [f"agent-{i:02d}" for i in range(23)]
    assert [a.card.agent_id async for a in client.iter_agents(page_size=7)] == [
        f"agent-{i:02d}" for i in range(23)
    ]


async def test_heartbeats_update_load_health_and_latency(
    client: RegistryClient, registry_server
) -> None:  # type: ignore[no-untyped-def]
    identity, reg = await register(client, "hb-1", max_concurrency=10)
    stream = HeartbeatStream(client, identity, reg.lease.lease_id)
    try:
        ack = await stream.beat(load=4, health=0.9, latency=12.5)
        assert ack.sequence == 1 and ack.status == 1 and ack.heartbeat_interval.nanos > 0
        await stream.beat(load=5, health=0.95, latency=20.0)
        agent = await client.get_agent("hb-1")
        assert (agent.load, agent.health, agent.latency_ms) == (5, 0.95, 20.0)
    finally:
        stream.close()


async def test_find_orders(client: RegistryClient) -> None:
    streams = []
    try:
        for agent_id, latency, load in (("slow", 80.0, 1), ("fast", 5.0, 9), ("mid", 30.0, 4)):
            identity, reg = await register(client, agent_id, ["database.query"], max_concurrency=10)
            stream = HeartbeatStream(client, identity, reg.lease.lease_id)
            streams.append(stream)
            await stream.beat(latency=latency, load=load)
        by_latency = await client.find_by_capability("database.query", order="latency", top_k=3)
        assert [a.card.agent_id for a in by_latency.agents] == ["fast", "mid", "slow"]
        by_load = await client.find_by_capability("database.query", order="load", top_k=2)
        assert [a.card.agent_id for a in by_load.agents] == ["slow", "mid"]
        for i in range(8):
            await client.report_outcome("fast", success=False, latency_ms=5.0, request_id=f"f-{i}")
        by_reliability = await client.find_by_capability(
            "database.query", order="reliability", top_k=3
        )
        assert by_reliability.agents[-1].card.agent_id == "fast"
    finally:
        for s in streams:
            s.close()


async def test_report_outcome_is_idempotent_by_request_id(client: RegistryClient) -> None:
    await register(client, "r-1")
    first = await client.report_outcome("r-1", success=False, latency_ms=40.0, request_id="req-1")
    again = await client.report_outcome("r-1", success=False, latency_ms=40.0, request_id="req-1")
    assert first.reliability == again.reliability < 0.9
    assert (await client.get_agent("r-1")).outcomes_observed == 1


# --- watch ------------------------------------------------------------------------------------


async def test_watch_snapshot_then_live_then_resume(client: RegistryClient) -> None:
    await register(client, "w-1")
    stream = client.watch(from_index=0, resume=False)
    snapshot = await anext(stream)
    assert snapshot.snapshot and [e.agent.card.agent_id for e in snapshot.events] == ["w-1"]
    await register(client, "w-2", port=9002)
    live = await anext(stream)
    assert not live.snapshot and live.events[0].type == registry_pb2.EVENT_TYPE_REGISTERED
    assert live.events[0].agent.card.agent_id == "w-2"
    resume_from = live.index
    await stream.aclose()
    await register(client, "w-3", port=9003)
    await register(client, "w-4", port=9004)
    resumed = client.watch(from_index=resume_from, resume=False)
    got = []
    while len(got) < 2:
        got += [e.agent.card.agent_id for e in (await anext(resumed)).events]
    assert got == ["w-3", "w-4"]
    await resumed.aclose()


async def test_watch_filters_by_capability(client: RegistryClient) -> None:
    stream = client.watch(from_index=0, capability="ml.inference", resume=False)
    assert (await anext(stream)).snapshot
    await register(client, "db-only", ["database.query"])
    await register(client, "ml-yes", ["ml.inference"], port=9001)
    event = (await anext(stream)).events[0]
    assert event.agent.card.agent_id == "ml-yes"
    await stream.aclose()


async def test_watch_from_a_compacted_or_future_index_is_out_of_range(
    client: RegistryClient, registry_server
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.OutOfRange) as err:
        await anext(client.watch(from_index=1, resume=False))
    assert err.value.reason == "INDEX_COMPACTED"
    with pytest.raises(errors.OutOfRange) as err:
        await anext(client.watch(from_index=registry_server.core.index + 1000, resume=False))
    assert err.value.reason == "INDEX_IN_FUTURE"


async def test_a_watcher_that_falls_behind_is_told_and_can_resume(
    client: RegistryClient, registry_server
) -> None:  # type: ignore[no-untyped-def]
    # The fixture's watch queue holds 64 events. With BDP probing off this
    # client's HTTP/2 window stays at 64 KB, so large events (8 KB of metadata
    # each) back up quickly and, while it does not read, its queue overflows.
    slow_channel = grpc.aio.insecure_channel(
        registry_server.address, options=[("grpc.http2.bdp_probe", 0)]
    )
    slow = RegistryClient(slow_channel)
    stream = slow.watch(from_index=0, resume=False)
    await anext(stream)
    padding = {f"k{i}": "x" * 500 for i in range(16)}
    for i in range(150):
        await register(client, f"flood-{i:03d}", port=10000 + i, metadata=padding)
    seen: list[str] = []

    async def read_until_lagged() -> errors.ResourceExhausted:
        try:
            while True:
                # Only registrations: under load the flood agents (which never
                # heartbeat) may already be going warning and critical.
                seen.extend(
                    e.agent.card.agent_id
                    for e in (await anext(stream)).events
                    if e.type == registry_pb2.EVENT_TYPE_REGISTERED
                )
        except errors.ResourceExhausted as exc:
            return exc

    err = await asyncio.wait_for(read_until_lagged(), timeout=20)
    assert err.reason == "WATCHER_LAGGED"
    resume = int(err.metadata["resume_index"])
    rest = slow.watch(from_index=resume, resume=False)

    async def read_rest() -> None:
        while len(seen) < 150:
            seen.extend(
                e.agent.card.agent_id
                for e in (await anext(rest)).events
                if e.type == registry_pb2.EVENT_TYPE_REGISTERED
            )

    await asyncio.wait_for(read_rest(), timeout=20)
    assert seen == [f"flood-{i:03d}" for i in range(150)]
    await rest.aclose()
    await slow_channel.close()


async def test_snapshots_and_replays_larger_than_a_message_arrive_in_batches(
    client: RegistryClient, registry_server
) -> None:  # type: ignore[no-untyped-def]
    # 160 cards of ~8 KB: 1.3 MB, more than the server's 1 MiB message limit.
    start_index = registry_server.core.index
    padding = {f"k{i}": "x" * 500 for i in range(16)}
    for i in range(160):
        await register(client, f"big-{i:03d}", port=11000 + i, metadata=padding)
    snapshot: list[str] = []
    stream = client.watch(from_index=0, resume=False)
    while len(snapshot) < 160:
        response = await asyncio.wait_for(anext(stream), timeout=10)
        assert response.snapshot and response.ByteSize() < 1024 * 1024
        snapshot.extend(e.agent.card.agent_id for e in response.events)
    await stream.aclose()
    assert sorted(snapshot) == [f"big-{i:03d}" for i in range(160)]
    replayed: list[str] = []
    stream = client.watch(from_index=start_index, resume=False)
    while len(replayed) < 160:
        response = await asyncio.wait_for(anext(stream), timeout=10)
        assert response.ByteSize() < 1024 * 1024
        replayed.extend(
            e.agent.card.agent_id
            for e in response.events
            if e.type == registry_pb2.EVENT_TYPE_REGISTERED
        )
    await stream.aclose()
    assert replayed == [f"big-{i:03d}" for i in range(160)]


async def test_watch_shows_an_agent_go_critical_and_expire(client: RegistryClient) -> None:
    _identity, _reg = await register(client, "dying")
    events: list[registry_pb2.WatchEvent] = []

    async def collect() -> None:
        async for response in client.watch(from_index=0, resume=False):
            events.extend(e for e in response.events if not response.snapshot)

    task = asyncio.create_task(collect())
    try:
        await eventually(
            lambda: any(e.type == registry_pb2.EVENT_TYPE_EXPIRED for e in events),
            timeout_s=10,
            what="expiry",
        )
    finally:
        task.cancel()
    kinds = [(e.type, e.agent.status) for e in events]
    assert (registry_pb2.EVENT_TYPE_HEALTH_CHANGED, 2) in kinds  # warning
    assert (registry_pb2.EVENT_TYPE_HEALTH_CHANGED, 3) in kinds  # critical
    assert kinds[-1][0] == registry_pb2.EVENT_TYPE_EXPIRED


# --- bad input ---------------------------------------------------------------------------------


async def raw_register(
    client: RegistryClient,
    *,
    identity: Identity | None = None,
    agent_id: str = "bad-1",
    address: str = "127.0.0.1:9000",
    caps=("compute",),
    max_concurrency: int = 4,
    metadata=None,
    sign_with: Identity | None = None,
):  # type: ignore[no-untyped-def]
    identity = identity or Identity.generate(agent_id)
    issue_ns, issue_time = now_timestamp()
    signer = sign_with or identity
    proof = signer.sign(
        *signing.registration(
            agent_id,
            address,
            list(caps),
            max_concurrency,
            metadata or {},
            identity.public_key,
            issue_ns,
        )
    )
    request = registry_pb2.RegisterRequest(
        card=registry_pb2.AgentCard(
            agent_id=agent_id,
            address=address,
            capabilities=list(caps),
            max_concurrency=max_concurrency,
            metadata=metadata or {},
            public_key=identity.public_key,
        ),
        issue_time=issue_time,
        proof_of_possession=proof,
    )
    return await client._unary(client.stub.Register, request)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"agent_id": ""}, "card.agent_id"),
        ({"agent_id": "a" * 200}, "card.agent_id"),
        ({"agent_id": "white space"}, "card.agent_id"),
        ({"address": "127.0.0.1"}, "card.address"),
        ({"address": "127.0.0.1:99999"}, "card.address"),
        ({"caps": ["Database.Query"]}, "card.capabilities[0]"),
        ({"caps": ["ok", "bad cap"]}, "card.capabilities[1]"),
        ({"max_concurrency": 0}, "card.max_concurrency"),
        ({"max_concurrency": -5}, "card.max_concurrency"),
        ({"metadata": {"k": "v" * 5000}}, "card.metadata"),
    ],
)
async def test_bad_registrations_are_invalid_argument_naming_the_field(
    client: RegistryClient, kwargs, field
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument) as err:
        await raw_register(client, **kwargs)
    assert err.value.field == field
    assert err.value.metadata["field"] == field
    assert err.value.domain == "agent2028.dev"
    assert (await client.list_agents()).total_size == 0


async def test_a_missing_card_or_time_is_invalid_argument(client: RegistryClient) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(client.stub.Register, registry_pb2.RegisterRequest())
    assert err.value.field == "card"


async def test_second_registration_under_another_key_keeps_the_first(
    client: RegistryClient,
) -> None:
    await register(client, "taken", port=9000)
    with pytest.raises(errors.AlreadyExists) as err:
        await register(client, "taken", port=6666)
    assert err.value.reason == "AGENT_ID_TAKEN"
    assert (await client.get_agent("taken")).card.address == "127.0.0.1:9000"


async def test_a_forged_proof_is_unauthenticated(client: RegistryClient) -> None:
    with pytest.raises(errors.Unauthenticated) as err:
        await raw_register(client, sign_with=Identity.generate("bad-1"))
    assert err.value.field == "proof_of_possession"


async def test_heartbeat_for_unknown_or_expired_agent_is_not_found(client: RegistryClient) -> None:
    ghost = Identity.generate("ghost")
    stream = HeartbeatStream(client, ghost, "no-lease")
    with pytest.raises(errors.NotFound):
        await stream.beat()
    stream.close()


async def test_heartbeat_with_a_bad_signature_is_unauthenticated(client: RegistryClient) -> None:
    _identity, reg = await register(client, "hb-bad")
    stream = HeartbeatStream(client, Identity.generate("hb-bad"), reg.lease.lease_id)
    with pytest.raises(errors.Unauthenticated):
        await stream.beat()
    stream.close()


async def test_heartbeat_with_health_out_of_range_is_invalid_argument(
    client: RegistryClient,
) -> None:
    identity, reg = await register(client, "hb-range")
    stream = HeartbeatStream(client, identity, reg.lease.lease_id)
    await stream.beat()
    with pytest.raises(errors.InvalidArgument) as err:
        await stream.beat(health=1.5)
    assert err.value.field == "health"
    stream.close()


async def test_a_stream_cannot_switch_agents(client: RegistryClient) -> None:
    identity, reg = await register(client, "hb-a")
    await register(client, "hb-b", port=9001)
    stream = HeartbeatStream(client, identity, reg.lease.lease_id)
    await stream.beat()
    with pytest.raises(errors.InvalidArgument) as err:
        await stream.beat(agent_id="hb-b")
    assert err.value.reason == "STREAM_IDENTITY_CHANGED"
    stream.close()


async def test_deregister_by_someone_else_is_refused(client: RegistryClient) -> None:
    await register(client, "victim")
    impostor = Identity.generate("victim")
    with pytest.raises(errors.Unauthenticated):
        await client.deregister(impostor)
    assert (await client.get_agent("victim")).card.agent_id == "victim"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.list_agents(page_size=-1), "page_size"),
        (lambda c: c.list_agents(page_token="not-a-token!"), "page_token"),
        (lambda c: c.find_by_capability("compute", top_k=-3), "top_k"),
        (lambda c: c.find_by_capability("compute", top_k=5000), "top_k"),
        (lambda c: c.find_by_capability("NOPE"), "capability"),
        (lambda c: c.find_by_capability("compute", latency_weight=2.0), "latency_weight"),
        (lambda c: c.get_agent(""), "agent_id"),
        (lambda c: c.report_outcome("x", success=True, latency_ms=float("nan")), "latency_ms"),
        (
            lambda c: c.report_outcome("x", success=True, latency_ms=1.0, request_id="bad id"),
            "request_id",
        ),
    ],
)
async def test_bad_queries_are_invalid_argument(client: RegistryClient, call, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument) as err:
        await call(client)
    assert err.value.field == field


async def test_unknown_enum_values_are_invalid_argument(client: RegistryClient) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(
            client.stub.FindByCapability,
            registry_pb2.FindByCapabilityRequest(capability="compute", order=99),
        )
    assert err.value.field == "order"
    with pytest.raises(errors.InvalidArgument) as err:
        await client._unary(client.stub.ListAgents, registry_pb2.ListAgentsRequest(statuses=[42]))
    assert err.value.field == "statuses[0]"


async def test_unknown_agent_is_not_found(client: RegistryClient) -> None:
    with pytest.raises(errors.NotFound):
        await client.get_agent("nobody")
    with pytest.raises(errors.NotFound):
        await client.report_outcome("nobody", success=True, latency_ms=1.0)


async def test_undecodable_request_is_invalid_argument(registry_server) -> None:  # type: ignore[no-untyped-def]
    channel = create_channel(registry_server.address)
    try:
        raw = channel.unary_unary(
            "/agent2028.registry.v1.RegistryService/GetAgent",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "GetAgentRequest" in (err.value.details() or "")
    finally:
        await channel.close()


async def test_oversized_message_is_refused_and_the_server_keeps_serving(
    client: RegistryClient, registry_server
) -> None:  # type: ignore[no-untyped-def]
    identity = Identity.generate("huge")
    with pytest.raises(errors.ResourceExhausted):
        await client.register(
            identity,
            address="127.0.0.1:1",
            capabilities=["compute"],
            metadata={"blob": "x" * (2 * 1024 * 1024)},
        )
    await register(client, "after-huge")
    assert (await client.get_agent("after-huge")).card.agent_id == "after-huge"


async def test_no_rpc_ever_answered_internal(client: RegistryClient, registry_server) -> None:  # type: ignore[no-untyped-def]
    # Run a burst of mixed bad calls, then read the server's own counters.
    for call in (
        lambda: client.get_agent("bad id"),
        lambda: client.find_by_capability("X"),
        lambda: client.list_agents(page_size=-2),
    ):
        with pytest.raises(errors.ClientError):
            await call()
    url = f"http://127.0.0.1:{registry_server.host.metrics_port}/metrics"
    # The metrics endpoint runs on this test's event loop: fetch from a thread.
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=5).read().decode()
    )
    internal = [
        line
        for line in metrics.splitlines()
        if line.startswith("agent2028_rpc_total")
        and 'code="INTERNAL"' in line
        and not line.endswith(" 0.0")
    ]
    assert internal == []
    # Counters are process-wide (other tests add to them): check it was counted.
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith(
            'agent2028_rpc_total{code="INVALID_ARGUMENT",method="GetAgent",service="registry"}'
        )
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1


# --- framework features -----------------------------------------------------------------------


async def test_health_reflection_and_draining(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.registry.config import RegistryConfig
    from services.registry.servicer import RegistryApp
    from tests.conftest import FAST_REGISTRY
    from tests.support import serve

    app = RegistryApp(RegistryConfig(settings=FAST_REGISTRY, sweep_interval_s=0.05, watch_queue=16))
    host = await serve(app, str(tmp_path), grace_s=2.0)
    channel = create_channel(host.address)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        for service in ("", "agent2028.registry.v1.RegistryService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "agent2028.registry.v1.RegistryService" in names and "grpc.health.v1.Health" in names

        # A watch is open when draining starts: it ends with UNAVAILABLE, and
        # the health status turns NOT_SERVING before the server goes away.
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        watch = registry.Watch(registry_pb2.WatchRequest(from_index=0))
        await watch.read()
        statuses = []
        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        statuses.append((await health_watch.read()).status)
        stop = asyncio.create_task(host.stop())
        statuses.append((await health_watch.read()).status)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await stop
        assert statuses == [
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        ]
    finally:
        await channel.close()
        await host.stop()
