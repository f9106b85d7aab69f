"""Signature verification off the event loop: batches to a worker process,
and no vote lost or wrongly refused when the worker dies."""

from __future__ import annotations

import asyncio
import os
import signal

from services.common.crypto import Identity, canonical
from services.consensus.verifier import InlineVerifier, WorkerVerifier, check


def _votes(count: int) -> list[tuple[bytes, bytes, bytes, bool]]:
    identity = Identity.generate("voter")
    other = Identity.generate("voter")
    out = []
    for i in range(count):
        message = canonical("vote", f"p-{i}", "voter", "approve")
        good = i % 3 != 0
        signer = identity if good else other
        out.append(
            (identity.public_key, signer.sign("vote", f"p-{i}", "voter", "approve"), message, good)
        )
    return out


def test_check_refuses_malformed_input() -> None:
    identity = Identity.generate("a")
    message = canonical("vote", "p", "a", "approve")
    signature = identity.sign("vote", "p", "a", "approve")
    assert check(identity.public_key, signature, message)
    assert not check(identity.public_key, signature, message + b"x")
    assert not check(identity.public_key, signature[:63], message)
    assert not check(b"\x00" * 31, signature, message)
    assert not check(b"\xff" * 32, signature, message)


async def test_worker_batches_and_answers_every_signature() -> None:
    verifier = WorkerVerifier(1)
    await verifier.start()
    try:
        votes = _votes(600)
        results = await asyncio.gather(
            *(verifier.verify(pk, sig, msg) for pk, sig, msg, _ in votes)
        )
        assert results == [good for *_, good in votes]
        assert verifier.checked == 600 and verifier.batches < 600  # batched
        assert verifier.inline_fallbacks == 0
        inline = InlineVerifier()
        assert [await inline.verify(pk, sig, msg) for pk, sig, msg, _ in votes[:30]] == [
            good for *_, good in votes[:30]
        ]
    finally:
        await verifier.stop()


async def test_a_dead_worker_is_replaced_and_loses_nothing() -> None:
    verifier = WorkerVerifier(1)
    await verifier.start()
    try:
        first_pid = verifier._workers[0].process.pid  # type: ignore[union-attr]
        votes = _votes(300)
        pending = [asyncio.ensure_future(verifier.verify(pk, s, m)) for pk, s, m, _ in votes]
        await asyncio.sleep(0)
        os.kill(first_pid, signal.SIGKILL)
        results = await asyncio.gather(*pending)
        assert results == [good for *_, good in votes]
        # Killed within microseconds of being handed 18 ms of work: what it
        # held was checked inline instead.
        assert verifier.inline_fallbacks > 0
        for _ in range(500):
            worker = verifier._workers[0]
            if worker.alive and worker.process is not None and worker.process.pid != first_pid:
                break
            await asyncio.sleep(0.01)
        assert verifier._workers[0].process.pid != first_pid  # type: ignore[union-attr]
        more = _votes(30)
        assert await asyncio.gather(*(verifier.verify(pk, s, m) for pk, s, m, _ in more)) == [
            good for *_, good in more
        ]
    finally:
        await verifier.stop()
    assert verifier._workers[0].process.poll() is not None  # type: ignore[union-attr]
