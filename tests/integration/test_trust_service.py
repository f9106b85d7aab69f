"""The trust service over gRPC: the guide's section 4 examples, every bad
input, signed observations, the watch stream and the evidence listing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agent2028.common.v1 import common_pb2
from clients import errors
from clients.trust import TrustClient, observe_request, outcome
from services.common.crypto import Identity
from services.trust.config import TrustConfig
from services.trust.core import TrustSettings
from services.trust.servicer import TrustApp
from tests.support import eventually, serve

DAY_S = 86_400.0


@pytest.fixture
async def trust(tmp_path) -> AsyncIterator[TrustClient]:  # type: ignore[no-untyped-def]
    app = TrustApp(
        TrustConfig(settings=TrustSettings(), synchronous="NORMAL", watch_queue=64),
        str(tmp_path),
    )
    host = await serve(app, str(tmp_path))
    client = TrustClient(host.address)
    try:
        yield client
    finally:
        await client.close()
        await host.stop(grace_s=0.5)


async def test_guide_4_1_bayesian_scoring_selects_worker_001(trust: TrustClient) -> None:
    for _ in range(10):
        await trust.observe("observer", "worker-001", outcome("success", duration_ms=150))
    for _ in range(5):
        await trust.observe("observer", "worker-002", outcome("success", duration_ms=200))
    for _ in range(3):
        await trust.observe("observer", "worker-002", outcome("partial_failure", error_rate=0.2))
    score_001 = await trust.score("observer", "worker-001")
    score_002 = await trust.score("observer", "worker-002")
    assert score_001.score > score_002.score > 0.5
    assert score_001.observations == 10 and score_002.observations == 8
    conservative_001 = (await trust.conservative_score("worker-001")).lower_bound
    conservative_002 = (await trust.conservative_score("worker-002")).lower_bound
    selected = "worker-001" if conservative_001 > conservative_002 else "worker-002"
    assert selected == "worker-001"


async def test_guide_4_2_outcomes_order_by_their_deltas(trust: TrustClient) -> None:
    await trust.observe("observer", "agent-001", outcome("success", duration_ms=100))
    await trust.observe("observer", "agent-002", outcome("timeout"))
    await trust.observe("observer", "agent-003", outcome("partial_failure", error_rate=0.4))
    await trust.observe("observer", "agent-004", outcome("complete_failure"))
    scores = [(await trust.score("observer", f"agent-00{i}")).score for i in range(1, 5)]
    # DESIGN §6: Success > Partial(0.4) > Timeout > Complete.
    assert scores[0] > scores[2] > scores[1] > scores[3]
    assert scores[0] == pytest.approx(0.8)


async def test_guide_4_3_transitive_chain(trust: TrustClient) -> None:
    for a, b in (("agent-A", "agent-B"), ("agent-B", "agent-C"), ("agent-C", "agent-D")):
        await trust.observe(a, b, outcome("success", duration_ms=100))
    result = await trust.transitive_trust("agent-A", "agent-D", max_depth=5)
    assert 0.4 < result.trust < 0.6
    assert result.trust == pytest.approx(0.512)
    assert list(result.path) == ["agent-A", "agent-B", "agent-C", "agent-D"]
    same = await trust.transitive_trust("agent-A", "agent-A", max_depth=1)
    assert same.trust == 1.0 and list(same.path) == ["agent-A"]
    none = await trust.transitive_trust("agent-D", "agent-A", max_depth=5)
    assert none.trust == 0.0 and list(none.path) == []


async def test_guide_4_4_temporal_decay(trust: TrustClient) -> None:
    await trust.observe(
        "observer",
        "old-agent",
        outcome("success", duration_ms=100),
        observed_at=time.time() - 40 * DAY_S,
    )
    before = await trust.score("observer", "old-agent")
    decayed = await trust.decay_old_scores(30, request_id="decay-guide")
    after = await trust.score("observer", "old-agent")
    assert decayed.edges_decayed == 1
    assert after.score < before.score
    assert after.confidence < before.confidence
    assert after.score > 0.5  # toward neutral, not past it
    again = await trust.decay_old_scores(30, request_id="decay-guide")
    assert again.edges_decayed == 1
    assert (await trust.score("observer", "old-agent")).score == after.score


async def test_top_trusted_and_capability_scores(trust: TrustClient) -> None:
    broker = Identity.generate("broker")
    for agent, kind, n in (("db-1", "success", 6), ("db-2", "success", 2), ("db-3", "timeout", 3)):
        for _ in range(n):
            await trust.observe(
                "broker", agent, outcome(kind), capability="database.query", identity=broker
            )
    top = await trust.top_trusted(capability="database.query", k=2)
    assert [s.subject_id for s in top.subjects] == ["db-1", "db-2"]
    assert top.subjects[0].lower_bound > top.subjects[1].lower_bound
    scoped = await trust.score("broker", "db-3", capability="database.query")
    assert scoped.score < 0.5 and scoped.observations == 3
    assert (await trust.score("broker", "db-3", capability="ml.inference")).observations == 0
    c = await trust.conservative_score("db-1", capability="database.query")
    assert c.observers == 1 and c.vouched_evidence == pytest.approx(4.8)


async def test_bad_input_gets_invalid_argument_naming_the_field(trust: TrustClient) -> None:
    async def fails(call, field: str, kind=errors.InvalidArgument) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(kind) as info:
            await call
        assert info.value.field == field, (field, info.value)

    await fails(
        trust.observe("observer", "agent-1", outcome("partial_failure", error_rate=1.5)),
        "outcome.error_rate",
    )
    await fails(
        trust.observe("observer", "agent-1", outcome("partial_failure", error_rate=float("nan"))),
        "outcome.error_rate",
    )
    await fails(trust.observe("observer", "agent-1", common_pb2.Outcome(kind=7)), "outcome.kind")
    await fails(trust.observe("observer", "agent-1", common_pb2.Outcome()), "outcome.kind")
    await fails(trust.observe("observer", "observer", outcome("success")), "subject_id")
    await fails(trust.observe("", "agent-1", outcome("success")), "observer_id")
    await fails(
        trust.observe("observer", "agent-1", outcome("success"), observed_at=time.time() + 3600),
        "observe_time",
    )
    await fails(trust.transitive_trust("a", "b", max_depth=0), "max_depth")
    await fails(trust.transitive_trust("a", "b", max_depth=1_000_000), "max_depth")
    await fails(trust.top_trusted(k=-1), "k")
    await fails(trust.decay_old_scores(float("inf")), "max_age_days")
    await fails(trust.conservative_score("agent-1", credible_level=2.0), "credible_level")
    await fails(trust.list_observations(page_token="not-a-token"), "page_token")
    await fails(
        trust.observe("broker", "agent-1", outcome("success")),
        "observer_signature",
        errors.Unauthenticated,
    )
    raw = trust.channel.unary_unary("/agent2028.trust.v1.TrustService/Observe")
    with pytest.raises(grpc.aio.AioRpcError) as raw_info:
        await raw(b"\xff\xff\xff", timeout=5)
    assert raw_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of that was recorded.
    assert (await trust.list_observations()).observations == []


async def test_signed_observations_bind_the_key_and_replays_count_once(
    trust: TrustClient,
) -> None:
    broker = Identity.generate("broker")
    first = await trust.observe(
        "broker", "agent-1", outcome("success"), identity=broker, request_id="r-1"
    )
    replay = await trust.observe(
        "broker", "agent-1", outcome("success"), identity=broker, request_id="r-1"
    )
    assert not first.duplicate and replay.duplicate
    assert replay.score.observations == 1
    with pytest.raises(errors.Unauthenticated) as info:
        await trust.observe(
            "broker", "agent-1", outcome("success"), identity=Identity.generate("broker")
        )
    assert info.value.reason == "KEY_MISMATCH"
    listed = [o async for o in trust.iter_observations(subject_id="agent-1")]
    assert len(listed) == 1 and listed[0].signed and listed[0].request_id == "r-1"


async def test_watch_streams_changes_and_resumes_by_index(trust: TrustClient) -> None:
    seen = []
    watching = []

    async def watch(from_index: int = 0) -> None:
        async for response in trust.watch(from_index=from_index):
            watching.append(response.index)
            seen.extend(response.events)

    watcher = asyncio.create_task(watch())
    # The first response of a stream carries no events: the watch is on.
    await eventually(lambda: watching, what="watch subscribed")
    for i in range(3):
        await trust.observe("observer", f"agent-{i}", outcome("success"), capability="compute")

    await eventually(lambda: len(seen) == 3, what="three trust events")
    watcher.cancel()
    assert [e.score.subject_id for e in seen] == ["agent-0", "agent-1", "agent-2"]
    assert all(e.outcome.kind == common_pb2.OUTCOME_KIND_SUCCESS for e in seen)
    assert seen[0].capability == "compute" and seen[0].score.score == pytest.approx(0.8)
    resumed: list = []

    async def resume() -> None:
        async for response in trust.watch(from_index=seen[0].index):
            resumed.extend(response.events)

    task = asyncio.create_task(resume())
    await eventually(lambda: len(resumed) == 2, what="backlog after the first index")
    task.cancel()
    assert [e.index for e in resumed] == [seen[1].index, seen[2].index]
    with pytest.raises(errors.OutOfRange):
        async for _ in trust.watch(from_index=seen[-1].index + 1000):
            pass


async def test_observations_paginate(trust: TrustClient) -> None:
    for i in range(12):
        await trust.observe(f"o{i % 3}", "s", outcome("success"))
    first = await trust.list_observations(page_size=5)
    assert len(first.observations) == 5 and first.next_page_token
    everything = [o async for o in trust.iter_observations()]
    assert [o.sequence for o in everything] == sorted(o.sequence for o in everything)
    assert len(everything) == 12
    assert len([o async for o in trust.iter_observations(observer_id="o1")]) == 4


async def test_observe_batch_is_all_or_nothing_and_names_the_bad_one(trust: TrustClient) -> None:
    broker = Identity.generate("broker")
    good = [
        observe_request("broker", "agent-1", outcome("success"), identity=broker, request_id="b-1"),
        observe_request("observer", "agent-2", outcome("timeout"), capability="compute"),
        observe_request("broker", "agent-1", outcome("success"), identity=broker, request_id="b-1"),
    ]
    response = await trust.observe_batch(good)
    assert [r.duplicate for r in response.results] == [False, False, True]
    assert response.results[0].score.score == pytest.approx(0.8)
    assert response.results[1].score.score == pytest.approx(0.32)
    bad = [
        observe_request("observer", "agent-3", outcome("success")),
        observe_request("observer", "agent-3", outcome("partial_failure", error_rate=2.0)),
    ]
    with pytest.raises(errors.InvalidArgument) as info:
        await trust.observe_batch(bad)
    assert info.value.field == "observations[1].outcome.error_rate"
    impostor = [
        observe_request("observer", "agent-4", outcome("success")),
        observe_request(
            "broker", "agent-4", outcome("success"), identity=Identity.generate("broker")
        ),
    ]
    with pytest.raises(errors.Unauthenticated) as info:
        await trust.observe_batch(impostor)
    assert info.value.field == "observations[1].observer_public_key"
    assert info.value.reason == "KEY_MISMATCH"
    with pytest.raises(errors.InvalidArgument) as info:
        await trust.observe_batch([observe_request("o", "s", outcome("success"))] * 1001)
    assert info.value.field == "observations"
    # Only the first batch left anything behind.
    recorded = [o async for o in trust.iter_observations()]
    assert sorted(o.subject_id for o in recorded) == ["agent-1", "agent-2"]
    assert (await trust.observe_batch([])).results == []
