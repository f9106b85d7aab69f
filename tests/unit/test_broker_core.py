"""Broker core with fake ports: strategies, failover, receipt verdicts and
signatures, idempotency, the durable outbox and receipt pages (no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Sequence

import pytest

from services.broker.core import (
    AgentAnswer,
    AttemptFailed,
    Broker,
    BrokerSettings,
    Candidate,
    DirectoryUnavailable,
    Outbox,
    Receipt,
    ReceiptStore,
    ReportRejected,
    ReportRetry,
    Router,
    Strategy,
)
from services.common import crypto, signing
from services.common.crypto import Identity
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from tests.support import eventually

KEYS = {name: Identity.generate(name) for name in ("agent-a", "agent-b", "agent-c")}


def candidate(agent_id: str, **kw: object) -> Candidate:
    values: dict[str, object] = dict(
        agent_id=agent_id,
        address=f"127.0.0.1:{9000 + ord(agent_id[-1])}",
        public_key=KEYS[agent_id].public_key if agent_id in KEYS else b"\x01" * 32,
        latency_ms=10.0,
        reliability=0.9,
        fitness=0.7,
        health=1.0,
        load=0,
        max_concurrency=4,
    )
    values.update(kw)
    return Candidate(**values)  # type: ignore[arg-type]


class FakeDirectory:
    def __init__(self, candidates: list[Candidate], total: int | None = None) -> None:
        self.list = candidates
        self.total = len(candidates) if total is None else total
        self.calls = 0
        self.down = False
        self.patient: list[bool] = []

    async def candidates(
        self, capability: str, order: str, limit: int, *, patient: bool = False
    ) -> tuple[list[Candidate], int]:
        self.calls += 1
        self.patient.append(patient)
        if self.down:
            raise DirectoryUnavailable("registry is down")
        return list(self.list[:limit]), self.total


def answer(
    agent_id: str,
    command_id: str,
    session_id: str,
    capability: str,
    *,
    success: bool = True,
    output: str = '"ok"',
    signer: Identity | None = None,
) -> AgentAnswer:
    start = time.time_ns()
    digest = hashlib.sha256(output.encode()).digest()
    error = "" if success else "handler failed"
    statement = signing.agent_receipt(
        command_id, session_id, agent_id, capability, start, start + 1000, success, error, digest
    )
    key = KEYS[agent_id]
    signature = (signer or key).sign(*statement)
    return AgentAnswer(
        command_id=command_id,
        session_id=session_id,
        agent_id=agent_id,
        capability=capability,
        start_ns=start,
        finish_ns=start + 1000,
        duration_ms=0.001,
        success=success,
        error=error,
        output_digest=digest,
        output=output,
        signature=signature,
        signature_valid=crypto.verify(key.public_key, signature, *statement),
    )


class FakeCaller:
    """Scripted agents: ``behaviour[agent_id]`` is "ok", "fail", "forge",
    "mismatch", a status name to raise, or "wait" (until released)."""

    def __init__(self, behaviour: dict[str, str] | None = None) -> None:
        self.behaviour = behaviour or {}
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.timeouts: list[float] = []

    async def execute(
        self,
        candidate: Candidate,
        *,
        command_id: str,
        session_id: str,
        capability: str,
        args: Sequence[str],
        timeout_s: float,
    ) -> AgentAnswer:
        self.calls.append(candidate.agent_id)
        self.timeouts.append(timeout_s)
        mode = self.behaviour.get(candidate.agent_id, "ok")
        if mode == "wait":
            await self.release.wait()
            mode = "ok"
        if mode == "ok":
            return answer(candidate.agent_id, command_id, session_id, capability)
        if mode == "fail":
            return answer(candidate.agent_id, command_id, session_id, capability, success=False)
        if mode == "forge":
            return answer(
                candidate.agent_id,
                command_id,
                session_id,
                capability,
                signer=Identity.generate(candidate.agent_id),
            )
        if mode == "mismatch":
            return answer(candidate.agent_id, "another-command", session_id, capability)
        raise AttemptFailed(mode, f"{candidate.agent_id} says {mode}")


class FakeReporter:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []
        self.fail_with: Exception | None = None
        # Registry reports about these agents are refused for now.
        self.unknown_agents: set[str] = set()
        # Trust reports about these subjects are refused for good.
        self.refused_subjects: set[str] = set()
        self.batch_targets: set[str] = set()
        self.batch_sizes: list[int] = []

    async def send(self, target: str, payload: dict[str, object]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if target == "registry" and payload["agent_id"] in self.unknown_agents:
            raise ReportRetry("agent not registered", limit=100)
        if payload.get("subject_id") in self.refused_subjects:
            raise ReportRejected("INVALID_ARGUMENT")
        self.sent.append((target, payload))

    def batches(self, target: str) -> bool:
        return target in self.batch_targets

    async def send_many(self, target: str, payloads: list[dict[str, object]]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if any(p.get("subject_id") in self.refused_subjects for p in payloads):
            raise ReportRejected("INVALID_ARGUMENT in the batch")
        self.batch_sizes.append(len(payloads))
        self.sent.extend((target, p) for p in payloads)


class Harness:
    def __init__(
        self,
        path: str,
        candidates: list[Candidate],
        *,
        backoff_s: tuple[float, float] = (0.01, 0.05),
        linger_s: float = 0.0,
        **settings: object,
    ) -> None:
        self.directory = FakeDirectory(candidates)
        self.caller = FakeCaller()
        self.reporter = FakeReporter()
        self.store = ReceiptStore(os.path.join(path, "broker.db"))
        self.outbox = Outbox(
            self.store,
            self.reporter,
            base_backoff_s=backoff_s[0],
            max_backoff_s=backoff_s[1],
            linger_s=linger_s,
        )
        self.identity = Identity.generate("broker")
        self.broker = Broker(
            BrokerSettings(**settings),  # type: ignore[arg-type]
            self.identity,
            self.directory,
            self.caller,
            self.store,
            self.outbox,
        )

    async def __aenter__(self) -> Harness:
        await self.store.open()
        await self.outbox.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.outbox.stop(flush_s=0)
        await self.store.close()


# --- strategies ----------------------------------------------------------------------


def test_each_strategy_ranks_by_its_own_number() -> None:
    router = Router()
    pool = [
        candidate("agent-a", latency_ms=50.0, reliability=0.99, fitness=0.60),
        candidate("agent-b", latency_ms=5.0, reliability=0.80, fitness=0.70),
        candidate("agent-c", latency_ms=20.0, reliability=0.90, fitness=0.90),
    ]

    def first(strategy: Strategy) -> str:
        return router.rank(strategy, "cap", pool)[0].candidate.agent_id

    assert first(Strategy.MIN_LATENCY) == "agent-b"
    assert first(Strategy.MAX_RELIABILITY) == "agent-a"
    assert first(Strategy.BEST_FIT) == "agent-c"
    assert first(Strategy.LEAST_LOADED) == "agent-a"  # all idle: ties go by id
    router.inflight.update({"agent-a": 3, "agent-b": 1})
    assert first(Strategy.LEAST_LOADED) == "agent-c"
    ranking = router.rank(Strategy.LEAST_LOADED, "cap", pool)
    assert [r.inflight for r in ranking] == [0, 1, 3]
    assert "fewest commands in flight" in router.explain(Strategy.LEAST_LOADED, "cap", ranking)
    reason = router.explain(
        Strategy.MIN_LATENCY, "cap", router.rank(Strategy.MIN_LATENCY, "cap", pool)
    )
    assert "5.0 ms" in reason and "agent-c" in reason
    assert [
        r.candidate.agent_id for r in router.rank(Strategy.BEST_FIT, "cap", pool, ["agent-c"])
    ] == [
        "agent-b",
        "agent-a",
    ]


def test_round_robin_takes_turns_by_id_and_survives_membership_changes() -> None:
    router = Router()
    pool = [candidate("agent-c"), candidate("agent-a"), candidate("agent-b")]
    order = []
    for _ in range(4):
        chosen = router.rank(Strategy.ROUND_ROBIN, "cap", pool)[0].candidate.agent_id
        router.took_turn("cap", chosen)
        order.append(chosen)
    assert order == ["agent-a", "agent-b", "agent-c", "agent-a"]
    # agent-b leaves: the turn after agent-a goes to agent-c, nobody is skipped twice.
    pool = [c for c in pool if c.agent_id != "agent-b"]
    assert router.rank(Strategy.ROUND_ROBIN, "cap", pool)[0].candidate.agent_id == "agent-c"
    # Turns are per capability.
    assert router.rank(Strategy.ROUND_ROBIN, "other", pool)[0].candidate.agent_id == "agent-a"


def test_suspects_go_to_the_back_until_they_expire() -> None:
    now = [100.0]
    router = Router(clock=lambda: now[0])
    pool = [candidate("agent-a", fitness=0.9), candidate("agent-b", fitness=0.5)]
    router.suspect("agent-a", 5.0)
    assert [r.candidate.agent_id for r in router.rank(Strategy.BEST_FIT, "c", pool)] == [
        "agent-b",
        "agent-a",
    ]
    now[0] += 6
    assert router.rank(Strategy.BEST_FIT, "c", pool)[0].candidate.agent_id == "agent-a"


# --- execution -------------------------------------------------------------------------


async def test_execute_returns_a_receipt_signed_by_agent_and_broker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a"), candidate("agent-b")]) as h:
        receipt, duplicate = await h.broker.execute(
            capability="database.query", args=["SELECT 1"], session_id="session-1"
        )
        assert not duplicate
        assert receipt.success and receipt.attempts == 1 and receipt.agent_id == "agent-a"
        assert receipt.session_id == "session-1" and receipt.duration_ms > 0
        assert receipt.output == '"ok"' and receipt.error == ""
        assert receipt.verify()
        assert receipt.agent is not None
        assert crypto.verify(
            receipt.agent_public_key,
            receipt.agent.signature,
            *signing.agent_receipt(
                receipt.command_id,
                "session-1",
                "agent-a",
                "database.query",
                receipt.agent.start_ns,
                receipt.agent.finish_ns,
                True,
                "",
                receipt.output_digest,
            ),
        )
        tampered = Receipt.from_json(receipt.to_json(), receipt.output, receipt.sequence)
        assert tampered.verify()
        tampered.success = False
        assert not tampered.verify()
        # One trust observation and one registry outcome, delivered.
        await eventually(lambda: len(h.reporter.sent) == 2, what="reports delivered")
        trust = next(p for t, p in h.reporter.sent if t == "trust")
        registry = next(p for t, p in h.reporter.sent if t == "registry")
        assert trust["observer_id"] == "broker" and trust["subject_id"] == "agent-a"
        assert trust["kind"] == 1 and trust["capability"] == "database.query"
        assert registry == {
            "agent_id": "agent-a",
            "success": True,
            "latency_ms": receipt.attempt_log[0].duration_ms,
            "request_id": f"{receipt.command_id}.a1",
        }
        await eventually(lambda: h.outbox.pending() == 0, what="outbox empty")
        assert await h.store.pending_reports() == []


async def test_failover_on_unavailable_then_the_next_agent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pool = [candidate("agent-a", fitness=0.9), candidate("agent-b", fitness=0.5)]
    async with Harness(str(tmp_path), pool) as h:
        h.caller.behaviour = {"agent-a": "UNAVAILABLE"}
        receipt, _ = await h.broker.execute(capability="compute", args=[])
        assert receipt.success and receipt.attempts == 2 and receipt.agent_id == "agent-b"
        assert [a.result for a in receipt.attempt_log] == ["UNAVAILABLE", "OK"]
        assert receipt.verify()
        # The dead agent is a suspect: the next call goes straight to agent-b.
        h.caller.calls.clear()
        receipt, _ = await h.broker.execute(capability="compute", args=[])
        assert h.caller.calls == ["agent-b"] and receipt.attempts == 1
        await eventually(lambda: len(h.reporter.sent) == 6, what="reports")
        kinds = [(p["subject_id"], p["kind"]) for t, p in h.reporter.sent if t == "trust"]
        assert sorted(kinds) == sorted([("agent-a", 2), ("agent-b", 1), ("agent-b", 1)])


async def test_timeouts_and_busy_agents_fail_over_with_bounded_attempts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pool = [candidate("agent-a"), candidate("agent-b"), candidate("agent-c")]
    async with Harness(str(tmp_path), pool) as h:
        h.caller.behaviour = {
            "agent-a": "DEADLINE_EXCEEDED",
            "agent-b": "RESOURCE_EXHAUSTED",
            "agent-c": "UNAVAILABLE",
        }
        receipt, _ = await h.broker.execute(
            capability="compute", args=[], max_attempts=2, deadline_s=4.0
        )
        assert not receipt.success and receipt.attempts == 2
        assert h.caller.calls == ["agent-a", "agent-b"]
        assert receipt.error.startswith("no agent answered")
        assert "agent-a DEADLINE_EXCEEDED" in receipt.error
        assert receipt.agent is None and receipt.verify()
        # Each attempt gets its share of what is left of the deadline.
        assert h.caller.timeouts[0] == pytest.approx(2.0, abs=0.1)
        await eventually(lambda: len(h.reporter.sent) == 2, what="reports")
        # Pushback (RESOURCE_EXHAUSTED) is not the agent's failure: only agent-a is reported.
        assert {p["subject_id"] for t, p in h.reporter.sent if t == "trust"} == {"agent-a"}


async def test_refused_arguments_end_the_command_and_count_against_nobody(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An agent answering INVALID_ARGUMENT refused the caller's arguments
    before running anything: no failover (every agent would refuse them), a
    failed receipt that says so, and no report to trust or the registry."""
    pool = [candidate("agent-a"), candidate("agent-b")]
    async with Harness(str(tmp_path), pool) as h:
        h.caller.behaviour = {"agent-a": "INVALID_ARGUMENT", "agent-b": "INVALID_ARGUMENT"}
        receipt, _ = await h.broker.execute(capability="compute", args=["fib", "abc"])
        assert not receipt.success and receipt.attempts == 1
        assert len(h.caller.calls) == 1
        assert [a.result for a in receipt.attempt_log] == ["INVALID_ARGUMENT"]
        assert "refused the arguments" in receipt.error
        assert receipt.agent is None and receipt.verify()
        # A later command that runs is reported; the refusal never was.
        h.caller.behaviour = {}
        ok, _ = await h.broker.execute(capability="compute", args=["fib", "10"])
        assert ok.success
        await eventually(lambda: len(h.reporter.sent) == 2, what="reports")
        assert [(t, p.get("subject_id", p.get("agent_id"))) for t, p in h.reporter.sent] == [
            ("trust", ok.agent_id),
            ("registry", ok.agent_id),
        ]


async def test_forged_or_mismatched_receipts_are_failures_never_successes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a"), candidate("agent-b")]) as h:
        h.caller.behaviour = {"agent-a": "forge"}
        receipt, _ = await h.broker.execute(capability="compute", args=[])
        assert not receipt.success and receipt.attempts == 1
        assert receipt.attempt_log[0].result == "BAD_SIGNATURE"
        assert receipt.output == "" and receipt.output_digest == b""
        assert "BAD_SIGNATURE" in receipt.error and receipt.verify()
        stored = await h.store.get(receipt.command_id)
        assert stored is not None and stored.agent == receipt.agent  # the agent's claim, kept
        assert stored.agent.output == '"ok"' and stored.output == ""
        h.caller.behaviour = {"agent-a": "mismatch"}
        receipt, _ = await h.broker.execute(capability="compute", args=[])
        assert not receipt.success and receipt.attempt_log[0].result == "MISMATCHED_RECEIPT"
        h.caller.behaviour = {"agent-a": "fail"}
        receipt, _ = await h.broker.execute(capability="compute", args=[])
        assert not receipt.success and receipt.error == "handler failed"
        assert receipt.attempt_log[0].result == "OK"
        await eventually(lambda: len(h.reporter.sent) == 6, what="reports")
        trust = [p for t, p in h.reporter.sent if t == "trust"]
        assert [p["kind"] for p in trust] == [4, 4, 4]
        assert not any(p["success"] for t, p in h.reporter.sent if t == "registry")


async def test_a_retried_request_returns_the_same_receipt_without_running_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        h.caller.behaviour = {"agent-a": "wait"}
        calls = [
            asyncio.create_task(
                h.broker.execute(capability="compute", args=["x"], request_id="req-1")
            )
            for _ in range(3)
        ]
        await eventually(lambda: h.caller.calls == ["agent-a"], what="first call running")
        h.caller.release.set()
        results = await asyncio.gather(*calls)
        assert h.caller.calls == ["agent-a"]
        assert len({r.command_id for r, _ in results}) == 1
        assert sorted(d for _, d in results) == [False, True, True]
        receipt, duplicate = await h.broker.execute(
            capability="compute", args=["x"], request_id="req-1"
        )
        assert duplicate and receipt.command_id == "req-1" and h.caller.calls == ["agent-a"]
        assert receipt.broker_signature == results[0][0].broker_signature


async def test_a_client_hanging_up_does_not_lose_the_receipt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        h.caller.behaviour = {"agent-a": "wait"}
        call = asyncio.create_task(
            h.broker.execute(capability="compute", args=[], request_id="req-2")
        )
        await eventually(lambda: h.caller.calls, what="running")
        call.cancel()
        assert await h.broker.drain(0.05) == 1  # still running: the agent holds it
        h.caller.release.set()
        assert await h.broker.drain(5.0) == 0  # what a stopping broker waits for
        stored = await h.store.get("req-2")
        assert stored is not None and stored.success


async def test_routing_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), []) as h:
        with pytest.raises(NotFound) as info:
            await h.broker.execute(capability="no.such", args=[])
        assert info.value.field == "capability" and "no.such" in info.value.message
        h.directory.total = 3  # three hold it, none passing
        h.broker._cache.clear()
        with pytest.raises(Unavailable) as info:
            await h.broker.route("database.query", Strategy.BEST_FIT)
        assert "no passing agent" in info.value.message
        for kwargs, field in [
            (dict(deadline_s=-1.0), "deadline"),
            (dict(deadline_s=0.001), "deadline"),
            (dict(deadline_s=1e9), "deadline"),
            (dict(max_attempts=11), "max_attempts"),
            (dict(args=["x"] * 257), "args"),
            (dict(request_id="x" * 101), "request_id"),
            (dict(session_id="bad session"), "session_id"),
            (dict(capability="Bad"), "capability"),
        ]:
            call: dict[str, object] = dict(capability="database.query", args=[])
            call.update(kwargs)
            with pytest.raises(InvalidArgument) as info:
                await h.broker.execute(**call)  # type: ignore[arg-type]
            assert info.value.field == field, kwargs
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        with pytest.raises(DeadlineExceeded):
            await h.broker.execute(capability="compute", args=[], call_remaining_s=0.001)


async def test_a_stale_list_stands_in_for_an_unreachable_registry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a")], candidate_ttl_s=0.0) as h:
        await h.broker.route("compute", Strategy.BEST_FIT)
        h.directory.down = True
        decision = await h.broker.route("compute", Strategy.BEST_FIT)
        assert decision.chosen.candidate.agent_id == "agent-a"
        # Patient only when there was nothing to fall back on.
        assert h.directory.patient == [True, False]
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        h.directory.down = True
        with pytest.raises(Unavailable) as info:
            await h.broker.route("compute", Strategy.BEST_FIT)
        assert info.value.reason == "REGISTRY_UNAVAILABLE"


# --- durability and the outbox --------------------------------------------------------


async def test_reports_wait_out_an_outage_and_survive_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        h.reporter.fail_with = ReportRetry("trust is down")
        receipt, _ = await h.broker.execute(capability="compute", args=[], session_id="s")
        assert receipt.success  # the outage neither fails nor delays the call
        await eventually(lambda: h.outbox.retries >= 2, what="retries")
        assert len(await h.store.pending_reports()) == 2
    # A new broker process on the same database delivers them.
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        assert h.outbox.pending() == 2
        await eventually(lambda: len(h.reporter.sent) == 2, what="delivered after restart")
        await eventually(lambda: h.outbox.pending() == 0, what="outbox empty")
        assert await h.store.pending_reports() == []
        assert (await h.store.get(receipt.command_id)).broker_signature == receipt.broker_signature


async def test_refused_reports_are_dropped_and_bounded_retries_give_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a")]) as h:
        h.reporter.fail_with = ReportRejected("INVALID_ARGUMENT")
        await h.broker.execute(capability="compute", args=[])
        await eventually(lambda: h.outbox.dropped == 2, what="dropped")
        h.reporter.fail_with = ReportRetry("agent unknown", limit=3)
        await h.broker.execute(capability="compute", args=[])
        await eventually(lambda: h.outbox.dropped == 4, what="gave up")
        assert await h.store.pending_reports() == []


async def test_a_report_refused_for_now_waits_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Long backoffs: if the refused report held up the lane, nothing else
    # would get through while it waits.
    async with Harness(str(tmp_path), [candidate("agent-a")], backoff_s=(30.0, 60.0)) as h:
        h.reporter.unknown_agents = {"agent-a"}
        await h.broker.execute(capability="compute", args=[])
        await eventually(lambda: h.outbox.delayed["registry"], what="agent-a's report waiting")
        h.directory.list = [candidate("agent-b")]
        h.broker._cache.clear()
        for _ in range(5):
            await h.broker.execute(capability="compute", args=[])
        await eventually(
            lambda: len([p for t, p in h.reporter.sent if p.get("agent_id") == "agent-b"]) == 5,
            what="agent-b's reports delivered",
        )
        waiting = h.outbox.delayed["registry"]
        assert [item.payload["agent_id"] for _, _, item in waiting] == ["agent-a"]
        assert waiting[0][2].tries == 1
        await eventually(lambda: h.outbox.pending() == 1, what="only agent-a's report left")


async def test_trust_reports_go_in_batches_and_a_refused_batch_goes_one_by_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pool = [candidate("agent-a"), candidate("agent-b")]
    async with Harness(str(tmp_path), pool, linger_s=0.2) as h:
        h.reporter.batch_targets = {"trust"}
        await asyncio.gather(
            *(
                h.broker.execute(capability="compute", args=[], strategy=Strategy.ROUND_ROBIN)
                for _ in range(6)
            )
        )
        await eventually(lambda: h.outbox.pending() == 0, what="all delivered")
        trust = [p for t, p in h.reporter.sent if t == "trust"]
        assert len(trust) == 6 and sum(h.reporter.batch_sizes) == 6
        assert max(h.reporter.batch_sizes) > 1  # the linger gathered them
        # A batch the receiver refuses is retried report by report: only the
        # bad one is dropped.
        h.reporter.refused_subjects = {"agent-a"}
        h.reporter.sent.clear()
        await asyncio.gather(
            *(
                h.broker.execute(capability="compute", args=[], strategy=Strategy.ROUND_ROBIN)
                for _ in range(4)
            )
        )
        await eventually(lambda: h.outbox.pending() == 0, what="all settled")
        assert {p["subject_id"] for t, p in h.reporter.sent if t == "trust"} == {"agent-b"}
        assert h.outbox.dropped == 2
        assert await h.store.pending_reports() == []


async def test_receipts_page_by_session_and_agent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pool = [candidate("agent-a"), candidate("agent-b")]
    async with Harness(str(tmp_path), pool) as h:
        made = []
        for i in range(7):
            receipt, _ = await h.broker.execute(
                capability="compute",
                args=[str(i)],
                session_id="s1" if i % 2 == 0 else "s2",
                strategy=Strategy.ROUND_ROBIN,
            )
            made.append(receipt)
        pages, token = [], ""
        while True:
            rows, token = await h.broker.list_receipts(
                session_id="s1", page_size=2, page_token=token
            )
            pages.append(rows)
            if not token:
                break
        ids = [r.command_id for page in pages for r in page]
        assert ids == [r.command_id for r in made if r.session_id == "s1"]
        assert [len(p) for p in pages] == [2, 2]
        by_agent, _ = await h.broker.list_receipts(agent_id="agent-b", page_size=100)
        assert {r.agent_id for r in by_agent} == {"agent-b"} and len(by_agent) == 3
        everything, _ = await h.broker.list_receipts(page_size=100)
        assert len(everything) == 7 and all(r.verify() for r in everything)
        _, token = await h.broker.list_receipts(session_id="s1", page_size=1)
        with pytest.raises(InvalidArgument) as info:
            await h.broker.list_receipts(session_id="s2", page_size=1, page_token=token)
        assert info.value.field == "page_token"
        with pytest.raises(NotFound):
            await h.broker.get_receipt("cmd-unknown")
        got = await h.broker.get_receipt(made[0].command_id)
        assert json.loads(got.to_json()) == json.loads(made[0].to_json())
