"""Ed25519 vote verification that does not block the event loop.

A verification costs 50-100 us of CPU. Done on the event loop it stalls every
stream for that long; done on a thread it is worse, not better: the thread
gives up the GIL for each libsodium call and then waits up to the interpreter's
switch interval (5 ms) to get it back while the loop is busy, so under load a
verifier thread manages a few hundred checks a second.

``WorkerVerifier`` therefore runs the checks in separate processes (by
default one), fed through pipes read by the event loop itself (no helper
threads): signatures waiting while a worker is busy go to it as one batch, so
the loop pays one pipe write and one read per batch, not per vote. A worker
that dies is restarted; its batch is checked inline meanwhile, so no vote is
ever lost or wrongly refused. ``InlineVerifier`` checks on the event loop
(CONSENSUS_VERIFY_WORKERS=0).

The worker is ``python -m services.consensus.verifier``; it exits when its
stdin closes (so also when the service is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_BATCH = 512
# Batches a worker may hold at once: one being checked, one waiting, so it
# never idles while the next batch crosses the pipe.
IN_FLIGHT_PER_WORKER = 2
_HEADER = struct.Struct(">II")  # batch id, item count
_LENGTH = struct.Struct(">I")


def check(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature over ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        crypto_sign_open(bytes(signature) + bytes(message), bytes(public_key))
    except (BadSignatureError, ValueError, TypeError):
        return False
    except Exception:  # a malformed key point
        return False
    return True


class InlineVerifier:
    """Checks on the calling thread (the event loop)."""

    checked = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        self.checked += 1
        return check(public_key, signature, message)


@dataclass
class _Item:
    public_key: bytes
    signature: bytes
    message: bytes
    future: asyncio.Future[bool]


@dataclass
class _Worker:
    number: int
    process: subprocess.Popen[bytes] | None = None
    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    reader: asyncio.Task[None] | None = None
    in_flight: dict[int, list[_Item]] = field(default_factory=dict)
    alive: bool = False


class WorkerVerifier:
    """Checks in ``workers`` child processes, in batches."""

    def __init__(self, workers: int = 1, *, max_batch: int = MAX_BATCH) -> None:
        if workers < 1:
            raise ValueError("WorkerVerifier needs at least one worker; use InlineVerifier")
        self.max_batch = max_batch
        self._workers = [_Worker(i) for i in range(workers)]
        self._pending: deque[_Item] = deque()
        self._next_batch = 1
        self._stopping = False
        self._flush_scheduled = False
        self._restarts: set[asyncio.Task[None]] = set()
        self.checked = 0
        self.batches = 0
        self.inline_fallbacks = 0

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)

    async def _spawn(self, worker: _Worker) -> None:
        # Popen without close_fds takes the posix_spawn path (Python's own fds
        # are not inheritable anyway): unlike fork, it runs no fork handlers,
        # so gRPC's threads are left alone and say nothing about it.
        process = subprocess.Popen(  # noqa: ASYNC220 (posix_spawn returns at once)
            [sys.executable, "-m", "services.consensus.verifier"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=False,
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stdout)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, process.stdin
        )
        worker.process = process
        worker.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        worker.stdout = reader
        worker.alive = True
        worker.reader = asyncio.create_task(
            self._read_results(worker), name=f"verifier-{worker.number}"
        )
        log.info("signature verifier %d started (pid %d)", worker.number, process.pid)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._restarts):
            task.cancel()
        for worker in self._workers:
            process = worker.process
            worker.alive = False
            if process is None:
                continue
            if worker.stdin is not None:
                worker.stdin.close()
            await _reap(process)
            if worker.reader is not None:
                worker.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.reader
            self._resolve_inline([i for batch in worker.in_flight.values() for i in batch])
            worker.in_flight.clear()
        self._resolve_inline(list(self._pending))
        self._pending.clear()

    async def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        if self._stopping:
            return check(public_key, signature, message)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append(_Item(bytes(public_key), bytes(signature), bytes(message), future))
        if not self._flush_scheduled:
            # Dispatched at the end of this loop iteration, so every vote that
            # arrived in it travels in one batch (one pipe write, not many).
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._dispatch()

    def _dispatch(self) -> None:
        while self._pending:
            worker = min(
                (w for w in self._workers if w.alive and len(w.in_flight) < IN_FLIGHT_PER_WORKER),
                key=lambda w: len(w.in_flight),
                default=None,
            )
            if worker is None:
                if not any(w.alive for w in self._workers):
                    # Every worker is down (restarting): nobody is left to wait for.
                    self._resolve_inline(list(self._pending))
                    self._pending.clear()
                return
            batch = [
                self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))
            ]
            batch_id = self._next_batch
            self._next_batch = (self._next_batch + 1) & 0xFFFFFFFF
            parts = [_HEADER.pack(batch_id, len(batch))]
            for item in batch:
                parts += [
                    item.public_key,
                    item.signature,
                    _LENGTH.pack(len(item.message)),
                    item.message,
                ]
            payload = b"".join(parts)
            assert worker.stdin is not None
            worker.in_flight[batch_id] = batch
            try:
                worker.stdin.write(_LENGTH.pack(len(payload)) + payload)
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                self._worker_died(worker)
            self.batches += 1

    async def _read_results(self, worker: _Worker) -> None:
        assert worker.stdout is not None
        stdout = worker.stdout
        try:
            while True:
                header = await stdout.readexactly(_HEADER.size)
                batch_id, count = _HEADER.unpack(header)
                results = await stdout.readexactly(count)
                batch = worker.in_flight.pop(batch_id, None)
                if batch is None or len(batch) != count:
                    raise RuntimeError(f"verifier {worker.number} answered an unknown batch")
                self.checked += count
                for item, ok in zip(batch, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(ok == 1)
                self._dispatch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._stopping:
                log.warning("signature verifier %d failed (%s); restarting it", worker.number, exc)
                self._worker_died(worker)

    def _worker_died(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        stranded = [item for batch in worker.in_flight.values() for item in batch]
        worker.in_flight.clear()
        self._resolve_inline(stranded)
        if worker.stdin is not None:
            worker.stdin.close()
        if worker.process is not None and worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        if not self._stopping:
            task = asyncio.create_task(self._restart(worker))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)
        self._dispatch()

    async def _restart(self, worker: _Worker) -> None:
        delay = 0.1
        while not self._stopping:
            if worker.process is not None:
                with contextlib.suppress(Exception):
                    await _reap(worker.process)
            try:
                await self._spawn(worker)
                self._dispatch()
                return
            except Exception:
                log.exception("restarting signature verifier %d failed", worker.number)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _resolve_inline(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                self.inline_fallbacks += 1
                item.future.set_result(check(item.public_key, item.signature, item.message))


async def _reap(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Waits for a worker to exit (it does once its stdin closes), killing it
    if it does not."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            await asyncio.to_thread(process.wait)
            return
        await asyncio.sleep(0.01)


def _read_exactly(stream: object, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))  # type: ignore[attr-defined]
        if not chunk:
            return None
        data += chunk
    return data


def worker_main() -> None:
    """The worker process: batches in on stdin, one result byte per item out."""
    # Ctrl-C reaches the whole process group; the service drains on it and
    # closes our stdin when done, which is when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    while True:
        length = _read_exactly(stdin, _LENGTH.size)
        if length is None:
            return
        payload = _read_exactly(stdin, _LENGTH.unpack(length)[0])
        if payload is None:
            return
        batch_id, count = _HEADER.unpack_from(payload, 0)
        offset = _HEADER.size
        results = bytearray(count)
        for i in range(count):
            public_key = payload[offset : offset + PUBLIC_KEY_BYTES]
            offset += PUBLIC_KEY_BYTES
            signature = payload[offset : offset + SIGNATURE_BYTES]
            offset += SIGNATURE_BYTES
            (size,) = _LENGTH.unpack_from(payload, offset)
            offset += _LENGTH.size
            message = payload[offset : offset + size]
            offset += size
            results[i] = 1 if check(public_key, signature, message) else 0
        stdout.write(_HEADER.pack(batch_id, count) + bytes(results))
        stdout.flush()


if __name__ == "__main__":
    worker_main()
