"""Trust core: the guide's numbers, conservative scores and Sybil resistance,
transitive paths, decay, and the durable ledger (no sockets)."""

from __future__ import annotations

import math
import os

import pytest

from services.common import signing
from services.common.crypto import Identity
from services.common.errors import InvalidArgument, OutOfRange, Unauthenticated
from services.trust.core import (
    DAY_S,
    Edge,
    Observation,
    OutcomeKind,
    Trust,
    TrustGraph,
    TrustSettings,
    TrustStore,
    evidence_of,
    parse_roots,
)

NOW = 1_800_000_000.0
S, T, P, C = (
    OutcomeKind.SUCCESS,
    OutcomeKind.TIMEOUT,
    OutcomeKind.PARTIAL_FAILURE,
    OutcomeKind.COMPLETE_FAILURE,
)


def observe(
    graph: TrustGraph,
    observer: str,
    subject: str,
    kind: OutcomeKind = S,
    *,
    error_rate: float = 0.0,
    at: float = NOW,
    capability: str = "",
    times: int = 1,
) -> None:
    for _ in range(times):
        graph.add(Observation(0, observer, subject, capability, kind, error_rate, 0.0, at, at))


# --- the math ---------------------------------------------------------------------------


def test_deltas_follow_the_guide() -> None:
    assert evidence_of(S) == (0.8, 0.0)
    assert evidence_of(T) == (0.0, 0.3)
    assert evidence_of(P, 0.4) == (0.0, pytest.approx(0.2))
    assert evidence_of(C) == (0.0, 1.0)


def test_one_success_scores_exactly_the_guides_0_8_and_unknown_is_neutral() -> None:
    graph = TrustGraph()
    assert graph.score("observer", "stranger", NOW).score == 0.5
    assert graph.score("observer", "stranger", NOW).confidence == 0.0
    observe(graph, "observer", "agent-001")
    score = graph.score("observer", "agent-001", NOW)
    assert score.score == pytest.approx(0.8, abs=1e-12)
    assert score.observations == 1 and score.positive == pytest.approx(0.8)


def test_guide_4_2_ordering_follows_the_deltas() -> None:
    """DESIGN §6: Success > Partial(0.4) > Timeout > Complete (the guide's
    comment says Timeout > Partial, its own deltas say otherwise)."""
    graph = TrustGraph()
    observe(graph, "observer", "agent-001", S)
    observe(graph, "observer", "agent-002", T)
    observe(graph, "observer", "agent-003", P, error_rate=0.4)
    observe(graph, "observer", "agent-004", C)
    scores = [graph.score("observer", f"agent-00{i}", NOW).score for i in range(1, 5)]
    assert scores[0] == pytest.approx(0.8)
    assert scores[2] == pytest.approx(0.3636, abs=1e-4)
    assert scores[1] == pytest.approx(0.32, abs=1e-9)
    assert scores[3] == pytest.approx(0.1739, abs=1e-4)
    assert scores[0] > scores[2] > scores[1] > scores[3]


def test_confidence_grows_with_evidence_and_stays_below_one() -> None:
    graph = TrustGraph()
    previous = 0.0
    for n in (1, 2, 5, 10, 100, 10_000):
        observe(graph, "observer", f"s{n}", times=n)
        confidence = graph.score("observer", f"s{n}", NOW).confidence
        assert previous < confidence < 1.0
        previous = confidence
    observe(graph, "observer", "bad", C, times=50)
    assert graph.score("observer", "bad", NOW).confidence > 0.9
    assert graph.score("observer", "bad", NOW).score < 0.05


def test_capability_evidence_is_kept_apart_and_summed_for_the_pair() -> None:
    graph = TrustGraph()
    observe(graph, "broker", "agent-1", S, capability="database.query", times=3)
    observe(graph, "broker", "agent-1", C, capability="ml.inference", times=3)
    db = graph.score("broker", "agent-1", NOW, "database.query")
    ml = graph.score("broker", "agent-1", NOW, "ml.inference")
    both = graph.score("broker", "agent-1", NOW)
    assert db.score > 0.8 > 0.5 > ml.score
    assert both.observations == 6
    assert both.positive == pytest.approx(2.4) and both.negative == pytest.approx(3.0)


# --- conservative scores and Sybil resistance ------------------------------------------


def test_guide_4_1_selects_worker_001_by_conservative_score() -> None:
    graph = TrustGraph()
    observe(graph, "observer", "worker-001", S, times=10)
    observe(graph, "observer", "worker-002", S, times=5)
    observe(graph, "observer", "worker-002", P, error_rate=0.2, times=3)
    assert (
        graph.score("observer", "worker-001", NOW).score
        > graph.score("observer", "worker-002", NOW).score
    )
    c1 = graph.conservative("worker-001", NOW)
    c2 = graph.conservative("worker-002", NOW)
    assert c1.lower_bound > c2.lower_bound
    assert 0.0 < c1.lower_bound < c1.mean < 1.0
    selected = "worker-001" if c1.lower_bound > c2.lower_bound else "worker-002"
    assert selected == "worker-001"


def test_conservative_lower_bound_is_the_credible_interval_end() -> None:
    from scipy.stats import beta

    graph = TrustGraph()
    observe(graph, "broker", "agent-1", S, times=10)
    observe(graph, "broker", "agent-1", C, times=2)
    c = graph.conservative("agent-1", NOW)
    w = graph.settings.prior_weight
    a, b = 8.0 + w / 2, 2.0 + w / 2
    assert c.lower_bound == pytest.approx(beta.ppf(0.025, a, b), rel=1e-9)
    assert c.mean == pytest.approx(a / (a + b))
    narrower = graph.conservative("agent-1", NOW, level=0.5)
    assert c.lower_bound < narrower.lower_bound < c.mean
    nothing = graph.conservative("nobody", NOW)
    assert nothing.observers == 0 and nothing.mean == pytest.approx(0.5)
    assert nothing.lower_bound < 0.01


def test_fifty_fresh_identities_cannot_lift_an_agent_above_a_vouched_one() -> None:
    graph = TrustGraph()
    for i in range(50):
        observe(graph, f"sybil-{i:02d}", "mallory", S, times=20)
    observe(graph, "broker", "honest", S)  # one success seen by a trusted root
    mallory = graph.conservative("mallory", NOW)
    honest = graph.conservative("honest", NOW)
    assert mallory.observers == 50
    assert mallory.unvouched_evidence == pytest.approx(graph.settings.unvouched_cap)
    assert mallory.vouched_evidence == 0.0
    assert honest.lower_bound > mallory.lower_bound
    assert honest.mean > mallory.mean
    assert [c.subject_id for c in graph.top_trusted(NOW, k=2)] == ["honest", "mallory"]
    # Fifty identities say no more than one does.
    lone = TrustGraph()
    observe(lone, "sybil-00", "mallory", S, times=20)
    assert lone.conservative("mallory", NOW).lower_bound == pytest.approx(mallory.lower_bound)


def test_badmouthing_by_fresh_identities_is_capped_too() -> None:
    graph = TrustGraph()
    observe(graph, "broker", "honest", S, times=5)
    before = graph.conservative("honest", NOW).lower_bound
    for i in range(50):
        observe(graph, f"sybil-{i:02d}", "honest", C, times=10)
    after = graph.conservative("honest", NOW)
    assert after.lower_bound > 0.5 * before
    assert after.unvouched_evidence == pytest.approx(graph.settings.unvouched_cap)


def test_standing_is_earned_from_roots_and_weighs_an_observers_word() -> None:
    graph = TrustGraph(TrustSettings(roots=("broker",), standing_depth=2))
    assert graph.standing("broker", NOW, {}) == 1.0
    assert graph.standing("newcomer", NOW, {}) == 0.0
    observe(graph, "broker", "auditor", S, times=10)  # the root vouches for auditor
    observe(graph, "auditor", "deputy", S, times=10)  # auditor vouches for deputy
    observe(graph, "deputy", "third", S, times=10)  # beyond the depth: no standing
    auditor = graph.standing("auditor", NOW, {})
    deputy = graph.standing("deputy", NOW, {})
    assert 0.9 < auditor < 1.0
    assert 0.0 < deputy < auditor
    assert graph.standing("third", NOW, {}) == 0.0
    # A vouched observer's praise counts; a stranger's identical praise is capped.
    observe(graph, "auditor", "vouched-subject", S, times=5)
    observe(graph, "stranger", "unvouched-subject", S, times=5)
    vouched = graph.conservative("vouched-subject", NOW)
    unvouched = graph.conservative("unvouched-subject", NOW)
    assert vouched.vouched_evidence == pytest.approx(4.0 * auditor)
    assert vouched.lower_bound > unvouched.lower_bound
    # Distrust from the root gives no standing at all.
    observe(graph, "broker", "liar", C, times=5)
    assert graph.standing("liar", NOW, {}) == 0.0


def test_standing_cycles_terminate() -> None:
    graph = TrustGraph(TrustSettings(roots=(), standing_depth=8))
    observe(graph, "a", "b", S)
    observe(graph, "b", "a", S)
    assert graph.standing("a", NOW, {}) == 0.0


def test_top_trusted_by_capability() -> None:
    graph = TrustGraph()
    observe(graph, "broker", "db-1", S, capability="database.query", times=10)
    observe(graph, "broker", "db-2", S, capability="database.query", times=2)
    observe(graph, "broker", "db-3", C, capability="database.query", times=2)
    observe(graph, "broker", "ml-1", S, capability="ml.inference", times=30)
    top = graph.top_trusted(NOW, capability="database.query", k=10)
    assert [c.subject_id for c in top] == ["db-1", "db-2", "db-3"]
    assert all(top[i].lower_bound >= top[i + 1].lower_bound for i in range(len(top) - 1))
    assert [c.subject_id for c in graph.top_trusted(NOW, k=1)] == ["ml-1"]
    assert graph.top_trusted(NOW, capability="nothing.here") == []


# --- transitive trust --------------------------------------------------------------------


def test_guide_4_3_chain_is_0_8_cubed_with_its_path() -> None:
    graph = TrustGraph()
    observe(graph, "agent-A", "agent-B")
    observe(graph, "agent-B", "agent-C")
    observe(graph, "agent-C", "agent-D")
    trust, path = graph.transitive("agent-A", "agent-D", 5, NOW)
    assert trust == pytest.approx(0.512)
    assert 0.4 < trust < 0.6
    assert path == ["agent-A", "agent-B", "agent-C", "agent-D"]
    assert graph.transitive("agent-A", "agent-D", 2, NOW) == (0.0, [])
    assert graph.transitive("agent-D", "agent-A", 5, NOW) == (0.0, [])
    assert graph.transitive("agent-A", "agent-A", 1, NOW) == (1.0, ["agent-A"])


def test_transitive_takes_the_best_path_not_the_shortest() -> None:
    graph = TrustGraph()
    observe(graph, "a", "z", C)  # direct but distrusted: 0.174
    observe(graph, "a", "b", S, times=10)
    observe(graph, "b", "z", S, times=10)
    observe(graph, "b", "a", S)  # a cycle, which can never help
    trust, path = graph.transitive("a", "z", 3, NOW)
    assert path == ["a", "b", "z"]
    assert trust == pytest.approx(graph.score("a", "b", NOW).score ** 2)
    assert graph.transitive("a", "z", 1, NOW) == (pytest.approx(0.1739, abs=1e-4), ["a", "z"])


# --- decay ---------------------------------------------------------------------------------


def test_guide_4_4_old_evidence_decays_toward_neutral_and_loses_confidence() -> None:
    graph = TrustGraph()
    observe(graph, "observer", "old-agent", S, at=NOW - 40 * DAY_S)
    observe(graph, "observer", "fresh-agent", S, at=NOW - 1 * DAY_S)
    before = graph.score("observer", "old-agent", NOW)
    fresh_before = graph.score("observer", "fresh-agent", NOW)
    changed = graph.decay_before(NOW - 30 * DAY_S, 0.5)
    after = graph.score("observer", "old-agent", NOW)
    assert changed == [("observer", "old-agent")]
    assert 0.5 < after.score < before.score
    assert after.confidence < before.confidence
    assert graph.score("observer", "fresh-agent", NOW) == fresh_before
    # Each decay pulls further toward 0.5.
    graph.decay_before(NOW - 30 * DAY_S, 0.5)
    assert 0.5 < graph.score("observer", "old-agent", NOW).score < after.score


def test_decay_of_an_edge_with_old_and_new_evidence_discounts_only_the_old() -> None:
    graph = TrustGraph()
    observe(graph, "o", "s", C, at=NOW - 60 * DAY_S, times=4)
    observe(graph, "o", "s", S, at=NOW, times=2)
    graph.decay_before(NOW - 30 * DAY_S, 0.25)
    score = graph.score("o", "s", NOW)
    assert score.negative == pytest.approx(1.0)
    assert score.positive == pytest.approx(1.6)


def test_continuous_half_life_halves_evidence_per_half_life() -> None:
    graph = TrustGraph(TrustSettings(half_life_days=10.0))
    observe(graph, "o", "s", S, at=NOW)
    assert graph.score("o", "s", NOW).positive == pytest.approx(0.8)
    assert graph.score("o", "s", NOW + 10 * DAY_S).positive == pytest.approx(0.4)
    assert graph.score("o", "s", NOW + 20 * DAY_S).positive == pytest.approx(0.2)
    later = graph.score("o", "s", NOW + 20 * DAY_S)
    assert 0.5 < later.score < 0.8 and later.confidence < graph.score("o", "s", NOW).confidence
    # A backdated observation counts for what is left of it.
    observe(graph, "o", "t", S, at=NOW - 10 * DAY_S)
    assert graph.score("o", "t", NOW).positive == pytest.approx(0.4)


def test_half_life_edge_is_order_independent() -> None:
    half_life = 5 * DAY_S
    times = [NOW, NOW - 3 * DAY_S, NOW + 2 * DAY_S, NOW - 9 * DAY_S, NOW + 1]
    edge = Edge()
    for i, t in enumerate(times):
        edge.add(t, 0.8 * (i % 2), 0.3 * ((i + 1) % 2), half_life)
    r, s = edge.evidence(NOW + 4 * DAY_S, half_life)
    edge.rebuild(half_life)
    assert edge.evidence(NOW + 4 * DAY_S, half_life) == pytest.approx((r, s))
    expected_r = sum(
        0.8 * (i % 2) * math.exp2(-(NOW + 4 * DAY_S - t) / half_life) for i, t in enumerate(times)
    )
    assert r == pytest.approx(expected_r)


def test_parse_roots() -> None:
    key = Identity.generate("broker").public_key
    roots, pinned = parse_roots(["broker=" + key.hex(), "consensus"])
    assert roots == ("broker", "consensus") and pinned == {"broker": key}
    with pytest.raises(ValueError):
        parse_roots(["broker=abcd"])


# --- the service logic over the durable ledger -------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_trust(path: str, clock: Clock | None = None, **settings: object) -> Trust:
    trust = Trust(
        TrustSettings(**settings),  # type: ignore[arg-type]
        TrustStore(os.path.join(path, "trust.db")),
        clock=clock or Clock(),
    )
    await trust.open()
    return trust


def signed(identity: Identity, subject: str, request_id: str, **kw: object) -> dict[str, object]:
    kind = int(kw.get("kind", 1))
    capability = str(kw.get("capability", ""))
    statement = signing.trust_observation(
        identity.signer_id, subject, capability, kind, 0.0, 0.0, 0, request_id
    )
    return dict(
        observer_id=identity.signer_id,
        subject_id=subject,
        kind=kind,
        capability=capability,
        request_id=request_id,
        public_key=identity.public_key,
        signature=identity.sign(*statement),
    )


async def test_bad_observations_are_invalid_argument_naming_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path))
    cases = [
        (dict(kind=3, error_rate=1.5), "outcome.error_rate"),
        (dict(kind=3, error_rate=-0.1), "outcome.error_rate"),
        (dict(kind=3, error_rate=float("nan")), "outcome.error_rate"),
        (dict(kind=1, duration_ms=float("inf")), "outcome.duration_ms"),
        (dict(kind=0), "outcome.kind"),
        (dict(kind=9), "outcome.kind"),
        (dict(kind=1, subject_id="observer"), "subject_id"),
        (dict(kind=1, observer_id=""), "observer_id"),
        (dict(kind=1, subject_id="no spaces"), "subject_id"),
        (dict(kind=1, capability="Not A Capability"), "capability"),
        (dict(kind=1, observed_at=NOW + 3600), "observe_time"),
        (dict(kind=1, observed_at=float("nan")), "observe_time"),
        (dict(kind=1, request_id="bad id!"), "request_id"),
    ]
    try:
        for overrides, field in cases:
            args: dict[str, object] = dict(observer_id="observer", subject_id="agent-1")
            args.update(overrides)
            with pytest.raises(InvalidArgument) as info:
                await trust.observe(**args)  # type: ignore[arg-type]
            assert info.value.field == field, (overrides, info.value.field)
        assert trust.graph.observations == 0
        with pytest.raises(InvalidArgument) as info:
            trust.transitive("a", "b", 0)
        assert info.value.field == "max_depth"
        with pytest.raises(InvalidArgument):
            trust.transitive("a", "b", 17)
        with pytest.raises(InvalidArgument) as info:
            trust.top_trusted(k=1001)
        assert info.value.field == "k"
        with pytest.raises(InvalidArgument) as info:
            trust.conservative("agent-1", credible_level=1.0)
        assert info.value.field == "credible_level"
        with pytest.raises(InvalidArgument) as info:
            await trust.decay_old_scores(-1)
        assert info.value.field == "max_age_days"
        with pytest.raises(InvalidArgument) as info:
            trust.score("same", "same")
        assert info.value.field == "subject_id"
    finally:
        await trust.close()


async def test_request_id_counts_once_and_everything_survives_a_reopen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path))
    score, duplicate = await trust.observe(
        observer_id="observer", subject_id="agent-1", kind=1, request_id="obs-1"
    )
    assert not duplicate and score.observations == 1
    again, duplicate = await trust.observe(
        observer_id="observer", subject_id="agent-1", kind=1, request_id="obs-1"
    )
    assert duplicate and again.observations == 1
    for i in range(20):
        await trust.observe(
            observer_id=f"o{i % 3}",
            subject_id="agent-2",
            kind=1 + i % 4,
            error_rate=0.5 if i % 4 == 2 else 0.0,
            capability="database.query",
            observed_at=NOW - i * DAY_S,
        )
    before = {
        "pair": trust.score("o1", "agent-2"),
        "cap": trust.score("o1", "agent-2", "database.query"),
        "conservative": trust.conservative("agent-2"),
    }
    # A second process opening the same ledger (as after kill -9: nothing is
    # closed) sees every acknowledged observation.
    reopened = await open_trust(str(tmp_path))
    try:
        assert reopened.graph.observations == 21
        assert reopened.score("o1", "agent-2") == before["pair"]
        assert reopened.score("o1", "agent-2", "database.query") == before["cap"]
        assert reopened.conservative("agent-2") == before["conservative"]
        _, duplicate = await reopened.observe(
            observer_id="observer", subject_id="agent-1", kind=1, request_id="obs-1"
        )
        assert duplicate
    finally:
        await reopened.close()
        await trust.close()


async def test_decay_is_durable_and_idempotent_by_request_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path))
    await trust.observe(
        observer_id="observer", subject_id="old-agent", kind=1, observed_at=NOW - 40 * DAY_S
    )
    before = trust.score("observer", "old-agent")
    assert await trust.decay_old_scores(30, "decay-1") == 1
    after = trust.score("observer", "old-agent")
    assert after.score < before.score and after.confidence < before.confidence
    assert await trust.decay_old_scores(30, "decay-1") == 1  # replay: nothing more
    assert trust.score("observer", "old-agent") == after
    reopened = await open_trust(str(tmp_path))
    try:
        assert reopened.score("observer", "old-agent") == after
        rows, _ = await reopened.list_observations(page_size=10)
        assert rows[0].weight == pytest.approx(0.5)
    finally:
        await reopened.close()
        await trust.close()


async def test_roots_must_sign_and_keys_bind_on_first_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path), roots=("broker",))
    broker = Identity.generate("broker")
    impostor = Identity.generate("broker")
    try:
        with pytest.raises(Unauthenticated) as info:
            await trust.observe(observer_id="broker", subject_id="agent-1", kind=1)
        assert info.value.field == "observer_signature"
        score, _ = await trust.observe(**signed(broker, "agent-1", "r-1"))  # type: ignore[arg-type]
        assert score.observations == 1
        with pytest.raises(Unauthenticated) as info:
            await trust.observe(**signed(impostor, "agent-1", "r-2"))  # type: ignore[arg-type]
        assert info.value.reason == "KEY_MISMATCH"
        forged = signed(broker, "agent-1", "r-3")
        forged["kind"] = 4  # the signature covered a success
        with pytest.raises(Unauthenticated) as info:
            await trust.observe(**forged)  # type: ignore[arg-type]
        assert info.value.reason == "BAD_SIGNATURE"
        no_request = signed(broker, "agent-1", "")
        with pytest.raises(InvalidArgument) as info:
            await trust.observe(**no_request)  # type: ignore[arg-type]
        assert info.value.field == "request_id"
        # Any observer may sign; once it has, it must keep signing with that key.
        alice = Identity.generate("alice")
        await trust.observe(**signed(alice, "agent-1", "a-1"))  # type: ignore[arg-type]
        with pytest.raises(Unauthenticated):
            await trust.observe(observer_id="alice", subject_id="agent-1", kind=1)
        assert trust.graph.observations == 2
    finally:
        await trust.close()
    reopened = await open_trust(str(tmp_path), roots=("broker",))
    try:
        with pytest.raises(Unauthenticated):
            await reopened.observe(**signed(impostor, "agent-1", "r-9"))  # type: ignore[arg-type]
        rows, _ = await reopened.list_observations(page_size=10)
        assert [r.signed for r in rows] == [True, True]
    finally:
        await reopened.close()


async def test_pinned_root_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = Identity.generate("broker")
    impostor = Identity.generate("broker")
    trust = await open_trust(
        str(tmp_path), roots=("broker",), pinned_keys={"broker": broker.public_key}
    )
    try:
        with pytest.raises(Unauthenticated):
            await trust.observe(**signed(impostor, "agent-1", "x-1"))  # type: ignore[arg-type]
        await trust.observe(**signed(broker, "agent-1", "x-2"))  # type: ignore[arg-type]
    finally:
        await trust.close()


async def test_observations_page_and_filter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path))
    try:
        for i in range(7):
            await trust.observe(observer_id=f"o{i % 2}", subject_id="s", kind=1)
        seen, token = [], ""
        while True:
            rows, token = await trust.list_observations(page_size=3, page_token=token)
            seen.extend(rows)
            if not token:
                break
        assert [r.sequence for r in seen] == sorted(r.sequence for r in seen)
        assert len(seen) == 7
        only, _ = await trust.list_observations(page_size=100, observer_id="o1")
        assert len(only) == 3 and {r.observer_id for r in only} == {"o1"}
        with pytest.raises(InvalidArgument) as info:
            await trust.list_observations(page_size=3, page_token="garbage!")
        assert info.value.field == "page_token"
    finally:
        await trust.close()


async def test_change_history_and_resume(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trust = await open_trust(str(tmp_path), watch_history=3)
    seen = []
    trust.add_listener(seen.append)
    try:
        start = trust.index
        for i in range(5):
            await trust.observe(observer_id="o", subject_id=f"s{i}", kind=1)
        assert [e.index for e in seen] == [start + i for i in range(1, 6)]
        assert [e.index for e in trust.events_since(start + 3)] == [start + 4, start + 5]
        with pytest.raises(OutOfRange):
            trust.events_since(start)  # older than what is retained
        with pytest.raises(OutOfRange):
            trust.events_since(start + 99)
    finally:
        await trust.close()
