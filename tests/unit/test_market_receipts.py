"""Settling a market task with the winner's own signed execution receipt
(the orchestrator's bridge runs DISPATCH_BROKER tasks through the broker),
and the broker pinning a command to one agent. No sockets."""

from __future__ import annotations

import hashlib
import time

import pytest

from services.broker.core import Candidate, DirectoryUnavailable, Strategy
from services.common import signing
from services.common.crypto import Identity
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.market.core import Dispatch, MarketCore, TaskState
from services.market.store import MarketStore
from tests.unit.test_broker_core import KEYS, Harness, candidate
from tests.unit.test_market_core import Agents, Clock, bid, list_compute, outcome


def receipt(
    identity: Identity,
    command_id: str,
    *,
    success: bool = True,
    output: str = '"42"',
    capability: str = "compute",
    agent_id: str | None = None,
    session_id: str = "market",
) -> dict[str, object]:
    """What settle_with_receipt takes, signed as an agent signs an execution."""
    agent_id = agent_id or identity.signer_id
    start = time.time_ns()
    output = output if success else ""
    error = "" if success else "handler failed"
    digest = hashlib.sha256(output.encode()).digest()
    signature = identity.sign(
        *signing.agent_receipt(
            command_id,
            session_id,
            agent_id,
            capability,
            start,
            start + 5000,
            success,
            error,
            digest,
        )
    )
    return dict(
        command_id=command_id,
        session_id=session_id,
        agent_id=agent_id,
        capability=capability,
        start_ns=start,
        finish_ns=start + 5000,
        success=success,
        error=error,
        output_digest=digest,
        output=output,
        signature=signature,
    )


@pytest.fixture
def market() -> tuple[MarketCore, Agents, Clock]:
    clock = Clock(time.time())
    core = MarketCore(wall_clock=clock)
    agents = Agents()
    agents.add("a", "compute")
    agents.add("b", "compute")
    return core, agents, clock


def auctioned(core: MarketCore, agents: Agents, clock: Clock, task_id: str, **kwargs):  # type: ignore[no-untyped-def]
    list_compute(core, task_id, dispatch=Dispatch.BROKER, **kwargs)
    bid(core, agents, clock, task_id, "a", 1.0, 1.0, 1.0)
    bid(core, agents, clock, task_id, "b", 5.0, 1.0, 1.0)
    return core.run_auction(task_id)


def test_task_command_ids_are_bound_to_one_attempt() -> None:
    assert signing.task_command_id("fib-30", 1) == "fib-30.1"
    assert signing.task_command_id("fib-30", 2, 3) == "fib-30.2.d3"
    assert signing.is_task_command_id("fib-30.1", "fib-30", 1)
    assert signing.is_task_command_id("fib-30.1.d7", "fib-30", 1)
    for other in ("fib-30.2", "fib-30.1.d0", "fib-30.1.dx", "fib-30.1.d", "fib-30.11", "fib-3.1"):
        assert not signing.is_task_command_id(other, "fib-30", 1), other
    long_id = "t" * 120
    command = signing.task_command_id(long_id, 1, 12)
    assert len(command) <= 100 and signing.is_task_command_id(command, long_id, 1)
    assert not signing.is_task_command_id(command, long_id, 2)


def test_a_success_receipt_completes_the_task_once(market) -> None:  # type: ignore[no-untyped-def]
    core, agents, clock = market
    won = auctioned(core, agents, clock, "t")
    assert won.winner.bid.agent_id == "a" and won.task.spec.dispatch is Dispatch.BROKER
    assert core.load_of("a") == 1
    proof = receipt(agents.ids["a"], signing.task_command_id("t", 1))
    view, duplicate, relisted = core.settle_with_receipt(task_id="t", attempt=1, **proof)
    assert (view.state, view.output, duplicate, relisted) == (
        TaskState.COMPLETED,
        '"42"',
        False,
        False,
    )
    assert core.load_of("a") == 0 and core.agent_load("a").completed == 1
    # A retry changes nothing; a later try's receipt for the same attempt is a duplicate too.
    assert core.settle_with_receipt(task_id="t", attempt=1, **proof)[1] is True
    later = receipt(agents.ids["a"], signing.task_command_id("t", 1, 2))
    assert core.settle_with_receipt(task_id="t", attempt=1, **later)[1] is True
    assert core.load_of("a") == 0
    # The agent reporting by itself afterwards is a duplicate, not a second completion.
    assert outcome(core, agents, "t", 1, "a", success=True, text="42")[1] is True


def test_a_failure_receipt_fails_and_relists_without_the_agent(market) -> None:  # type: ignore[no-untyped-def]
    core, agents, clock = market
    auctioned(core, agents, clock, "t", max_attempts=2)
    proof = receipt(agents.ids["a"], signing.task_command_id("t", 1), success=False)
    view, duplicate, relisted = core.settle_with_receipt(task_id="t", attempt=1, **proof)
    assert relisted and not duplicate
    assert view.state is TaskState.OPEN and view.attempt == 2 and view.excluded == ("a",)
    assert core.get("t").assignments[0].error == "handler failed"
    assert core.settle_with_receipt(task_id="t", attempt=1, **proof)[1:] == (True, True)
    assert core.load_of("a") == 0 and core.agent_load("a").failed == 1


def test_a_receipt_proves_nothing_for_another_task_agent_or_capability(market) -> None:  # type: ignore[no-untyped-def]
    core, agents, clock = market
    auctioned(core, agents, clock, "t")
    auctioned(core, agents, clock, "u")
    a, b = agents.ids["a"], agents.ids["b"]

    def refused(error: type[Exception], field: str, proof: dict[str, object], **kw: object) -> None:
        with pytest.raises(error) as err:
            core.settle_with_receipt(**{"task_id": "t", "attempt": 1, **proof, **kw})
        assert err.value.field == field, err.value  # type: ignore[attr-defined]

    # u's receipt for t, the next attempt's, and an unrelated command's.
    refused(InvalidArgument, "receipt.command_id", receipt(a, signing.task_command_id("u", 1)))
    refused(InvalidArgument, "receipt.command_id", receipt(a, signing.task_command_id("t", 2)))
    refused(InvalidArgument, "receipt.command_id", receipt(a, "cmd-123"))
    # The loser's own (valid) receipt: not the assigned agent.
    refused(PermissionDenied, "receipt.agent_id", receipt(b, signing.task_command_id("t", 1)))
    # a's id, b's key: a forgery.
    refused(Unauthenticated, "signature", receipt(b, signing.task_command_id("t", 1), agent_id="a"))
    # Run with another capability than the task's.
    refused(
        InvalidArgument,
        "receipt.capability",
        receipt(a, signing.task_command_id("t", 1), capability="echo"),
    )
    # Output that is not what the agent signed.
    good = receipt(a, signing.task_command_id("t", 1))
    refused(InvalidArgument, "output", good, output='"43"')
    refused(InvalidArgument, "signature", good, signature=b"short")
    refused(FailedPrecondition, "attempt", good, attempt=3)
    refused(InvalidArgument, "attempt", good, attempt=0)
    with pytest.raises(NotFound):
        core.settle_with_receipt(**{**good, "task_id": "nope", "attempt": 1})
    assert core.get("t").state is TaskState.ASSIGNED and core.load_of("a") == 2


async def test_dispatch_is_part_of_the_listing_and_survives_storage(tmp_path, market) -> None:  # type: ignore[no-untyped-def]
    core, _agents, clock = market
    view, created = list_compute(core, "t", dispatch=Dispatch.BROKER)
    assert created and view.spec.dispatch is Dispatch.BROKER
    assert list_compute(core, "t", dispatch=Dispatch.BROKER)[1] is False
    with pytest.raises(Exception) as err:
        list_compute(core, "t")  # same id, other dispatch: other content
    assert getattr(err.value, "reason", "") == "TASK_EXISTS"
    assert list_compute(core, "w")[0].spec.dispatch is Dispatch.WINNER
    store = MarketStore(str(tmp_path / "market.db"))
    await store.open()
    records, _ = core.drain()
    await store.write(records)
    restored = MarketCore(wall_clock=clock)
    restored.restore(*(await store.load()))
    await store.close()
    assert restored.get("t").spec.dispatch is Dispatch.BROKER
    assert restored.get("w").spec.dispatch is Dispatch.WINNER


# --- the broker's pin -----------------------------------------------------------------


class PinDirectory:
    """Answers single-agent lookups (status 1 = passing)."""

    def __init__(self, agents: dict[str, tuple[Candidate, int, list[str]]]) -> None:
        self.agents = agents
        self.down = False

    async def agent(self, agent_id: str) -> tuple[Candidate, int, list[str]] | None:
        if self.down:
            raise DirectoryUnavailable("registry is down")
        return self.agents.get(agent_id)


async def test_a_pinned_command_runs_on_that_agent_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Harness(str(tmp_path), [candidate("agent-a"), candidate("agent-b")]) as h:
        pins = PinDirectory(
            {
                "agent-a": (candidate("agent-a"), 1, ["compute"]),
                "agent-b": (candidate("agent-b"), 1, ["compute"]),
                "agent-c": (candidate("agent-c"), 3, ["compute"]),
            }
        )
        h.directory.agent = pins.agent  # type: ignore[attr-defined]
        # BEST_FIT would pick agent-a (ties go by order); the pin says b.
        r, _ = await h.broker.execute(
            capability="compute", args=["x"], strategy=Strategy.BEST_FIT, agent_id="agent-b"
        )
        assert r.success and r.agent_id == "agent-b" and h.caller.calls == ["agent-b"]
        # No failover away from a pinned agent that does not answer.
        h.caller.behaviour["agent-b"] = "UNAVAILABLE"
        r, _ = await h.broker.execute(capability="compute", args=["x"], agent_id="agent-b")
        assert not r.success and r.attempts == 1 and h.caller.calls[-1] == "agent-b"
        assert h.directory.calls == 0  # the strategy's candidate list was never asked for
        with pytest.raises(FailedPrecondition) as err:
            await h.broker.execute(capability="compute", args=[], agent_id="agent-c")
        assert err.value.reason == "AGENT_NOT_PASSING" and err.value.field == "agent_id"
        with pytest.raises(FailedPrecondition) as err:
            await h.broker.execute(capability="echo", args=[], agent_id="agent-a")
        assert err.value.reason == "AGENT_LACKS_CAPABILITY"
        with pytest.raises(NotFound) as err:
            await h.broker.execute(capability="compute", args=[], agent_id="agent-z")
        assert err.value.field == "agent_id"
        with pytest.raises(InvalidArgument) as err:
            await h.broker.execute(capability="compute", args=[], agent_id="bad id")
        assert err.value.field == "agent_id"
        pins.down = True
        with pytest.raises(Unavailable) as err:
            await h.broker.execute(capability="compute", args=[], agent_id="agent-a")
        assert err.value.reason == "REGISTRY_UNAVAILABLE"
        assert set(KEYS) >= {"agent-a", "agent-b"}
