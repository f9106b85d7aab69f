"""Reporting equivocation to trust, never losing a report.

Evidence and the report it owes are written in one transaction (the
trust_outbox table). This loop drains the outbox through ``TrustClient``:
each report is an Observe(observer, voter, CompleteFailure), signed with the
consensus service's key, whose request_id is the evidence id, so a retried report is recorded once. While trust is
down (or TRUST_ADDR is not set) reports wait in the outbox, across restarts,
and are retried with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from clients.errors import ClientError
from clients.trust import TrustClient, outcome
from services.common.crypto import Identity
from services.consensus.core import ConsensusCore, OutboxItem

log = logging.getLogger(__name__)

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class TrustReporter:
    def __init__(
        self,
        core: ConsensusCore,
        trust: TrustClient,
        identity: Identity,
        *,
        timeout_s: float = 5.0,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.core = core
        self.trust = trust
        self.identity = identity
        self.observer_id = identity.signer_id
        self.timeout_s = timeout_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.reported = 0
        self.failures = 0
        # evidence id -> (failed attempts, monotonic time of the next attempt)
        self._retry: dict[str, tuple[int, float]] = {}

    async def run(self) -> None:
        while True:
            self.core.outbox_changed.clear()
            now = time.monotonic()
            for item in list(self.core.outbox.values()):
                if self._retry.get(item.evidence_id, (0, 0.0))[1] <= now:
                    await self._report(item)
            waits = [self._retry.get(e, (0, 0.0))[1] - time.monotonic() for e in self.core.outbox]
            timeout = max(min(waits), 0.0) if waits else None
            if timeout == 0.0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.core.outbox_changed.wait(), timeout)

    async def _report(self, item: OutboxItem) -> None:
        try:
            await self.trust.observe(
                self.observer_id,
                item.subject_id,
                outcome("complete_failure"),
                observed_at=item.detect_wall,
                request_id=item.evidence_id,
                identity=self.identity,
                timeout_s=self.timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            attempts = self._retry.get(item.evidence_id, (0, 0.0))[0] + 1
            retryable = isinstance(exc, ClientError) and exc.code in RETRYABLE
            delay = (
                min(self.base_backoff_s * 2 ** (attempts - 1), self.max_backoff_s)
                if retryable
                else self.max_backoff_s
            )
            self._retry[item.evidence_id] = (attempts, time.monotonic() + delay)
            (log.info if retryable else log.error)(
                "reporting evidence %s against %s to trust failed (attempt %d: %s); "
                "retrying in %.1fs",
                item.evidence_id,
                item.subject_id,
                attempts,
                exc,
                delay,
            )
            return
        try:
            await self.core.mark_reported(item.evidence_id)
        except Exception as exc:
            # Trust has it (and the request_id makes a repeat harmless); the
            # outbox keeps the item, so it is sent again later.
            log.warning("evidence %s reported but not marked (%s)", item.evidence_id, exc)
            self._retry[item.evidence_id] = (1, time.monotonic() + self.base_backoff_s)
            return
        self._retry.pop(item.evidence_id, None)
        self.reported += 1
        log.info(
            "reported equivocation by %s to trust (evidence %s)",
            item.subject_id,
            item.evidence_id,
        )
