"""Built-in agent handlers do real work and refuse what they must."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from clients.agent.faults import FaultPlan
from clients.agent.handlers import (
    ExecutionContext,
    HandlerError,
    SoftmaxModel,
    compute,
    count_primes,
    database_query,
    ml_inference,
)


def ctx(tmp: str, deadline: float | None = None) -> ExecutionContext:
    return ExecutionContext("agent-1", "cmd-1", "s-1", "x", deadline, tmp)


async def test_database_query_reads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle = database_query(os.path.join(str(tmp_path), "data.db"))
    result = await handle(["SELECT count(*) FROM users"], ctx(str(tmp_path)))
    assert result["rows"] == [[200]]
    joined = await handle(
        [
            "SELECT u.country, sum(o.quantity) FROM orders o JOIN users u ON u.id = o.user_id GROUP BY u.country"
        ],
        ctx(str(tmp_path)),
    )
    assert joined["row_count"] > 0


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM users",
        "DROP TABLE users",
        "INSERT INTO users VALUES (1,'a','b',1,'c','d')",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "PRAGMA writable_schema = 1",
        "not sql at all",
    ],
)
async def test_database_query_is_read_only(tmp_path, sql: str) -> None:  # type: ignore[no-untyped-def]
    handle = database_query(os.path.join(str(tmp_path), "data.db"))
    with pytest.raises(HandlerError):
        await handle([sql], ctx(str(tmp_path)))
    assert (await handle(["SELECT count(*) FROM users"], ctx(str(tmp_path))))["rows"] == [[200]]


async def test_database_query_stops_at_the_deadline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle = database_query(os.path.join(str(tmp_path), "data.db"))
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    with pytest.raises(HandlerError, match="interrupted"):
        await handle([slow], ctx(str(tmp_path), deadline=time.monotonic() + 0.2))
    assert time.monotonic() - start < 5


async def test_ml_inference_classifies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert SoftmaxModel().train_accuracy > 0.9
    handle = ml_inference()
    setosa = await handle(["5.0", "3.4", "1.5", "0.2"], ctx(str(tmp_path)))
    virginica = await handle(["6.7", "3.0", "5.8", "2.1"], ctx(str(tmp_path)))
    assert setosa["class"] == "setosa" and virginica["class"] == "virginica"
    assert sum(setosa["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    for bad in (["1", "2"], ["a", "b", "c", "d"], ["nan", "1", "1", "1"]):
        with pytest.raises(HandlerError):
            await handle(bad, ctx(str(tmp_path)))


async def test_compute_operations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle = compute()
    c = ctx(str(tmp_path))
    assert (await handle(["primes", "100"], c))["primes"] == 25
    assert count_primes(1_000_000) == 78498
    assert (await handle(["fib", "90"], c))["value"] == "2880067194370816120"
    assert (await handle(["sum", "1", "2", "3.5"], c))["sum"] == 6.5
    assert len((await handle(["sha256", "abc", "3"], c))["digest"]) == 64
    assert (await handle(["matmul", "10"], c))["trace"] > 0
    t0 = time.monotonic()
    await handle(["wait", "50"], c)
    assert time.monotonic() - t0 >= 0.05
    for bad in (
        [],
        ["primes", "-1"],
        ["primes", "x"],
        ["nope"],
        ["sum", "inf", "1"],
        ["fib", "999999"],
    ):
        with pytest.raises(HandlerError):
            await handle(bad, c)


def test_fault_plan_parsing() -> None:
    plan = FaultPlan.parse(["slow:250", "fail"])
    assert plan.slow_ms == 250 and plan.fail and plan.active
    assert not FaultPlan.parse([]).active
    for bad in (["slow"], ["slow:-5"], ["explode"]):
        with pytest.raises(ValueError):
            FaultPlan.parse(bad)


_ = asyncio
