"""Typed async client of the trust service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from agent2028.common.v1 import common_pb2
from agent2028.trust.v1 import trust_pb2, trust_pb2_grpc
from clients.base import ServiceClient
from services.common import signing
from services.common.crypto import Identity
from services.common.timeutil import timestamp_ns, to_timestamp

OUTCOMES = {
    "success": common_pb2.OUTCOME_KIND_SUCCESS,
    "timeout": common_pb2.OUTCOME_KIND_TIMEOUT,
    "partial_failure": common_pb2.OUTCOME_KIND_PARTIAL_FAILURE,
    "complete_failure": common_pb2.OUTCOME_KIND_COMPLETE_FAILURE,
}


def outcome(kind: str, *, error_rate: float = 0.0, duration_ms: float = 0.0) -> common_pb2.Outcome:
    """An Outcome: success (with duration_ms), timeout, partial_failure (with
    error_rate in [0, 1]) or complete_failure."""
    return common_pb2.Outcome(kind=OUTCOMES[kind], error_rate=error_rate, duration_ms=duration_ms)


class TrustClient(ServiceClient):
    def __init__(self, target, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target, **kwargs)
        self.stub = trust_pb2_grpc.TrustServiceStub(self.channel)

    async def observe(
        self,
        observer_id: str,
        subject_id: str,
        result: common_pb2.Outcome,
        *,
        capability: str = "",
        observed_at: float | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        identity: Identity | None = None,
    ) -> trust_pb2.ObserveResponse:
        """Records an observation. With ``identity`` (whose signer_id must be
        observer_id) it is signed, which trusted roots must do; a signed
        observation always carries a request_id (one is made if none given)."""
        request = observe_request(
            observer_id,
            subject_id,
            result,
            capability=capability,
            observed_at=observed_at,
            request_id=request_id,
            identity=identity,
        )
        return await self._unary(self.stub.Observe, request, timeout_s=timeout_s)

    async def observe_batch(
        self, requests: list[trust_pb2.ObserveRequest], *, timeout_s: float | None = None
    ) -> trust_pb2.ObserveBatchResponse:
        """Records up to 1000 observations (see ``observe_request``) in one
        commit, all or none."""
        return await self._unary(
            self.stub.ObserveBatch,
            trust_pb2.ObserveBatchRequest(observations=requests),
            timeout_s=timeout_s,
        )

    async def score(
        self, observer_id: str, subject_id: str, *, capability: str = ""
    ) -> trust_pb2.TrustScore:
        response = await self._unary(
            self.stub.Score,
            trust_pb2.ScoreRequest(
                observer_id=observer_id, subject_id=subject_id, capability=capability
            ),
        )
        return response.score

    async def conservative_score(
        self,
        subject_id: str,
        *,
        capability: str = "",
        credible_level: float = 0.0,
        timeout_s: float | None = None,
    ) -> trust_pb2.ConservativeScoreResponse:
        return await self._unary(
            self.stub.ConservativeScore,
            trust_pb2.ConservativeScoreRequest(
                subject_id=subject_id, capability=capability, credible_level=credible_level
            ),
            timeout_s=timeout_s,
        )

    async def transitive_trust(
        self, from_id: str, to_id: str, *, max_depth: int = 5
    ) -> trust_pb2.TransitiveTrustResponse:
        return await self._unary(
            self.stub.TransitiveTrust,
            trust_pb2.TransitiveTrustRequest(from_id=from_id, to_id=to_id, max_depth=max_depth),
        )

    async def decay_old_scores(
        self, max_age_days: float, *, request_id: str = ""
    ) -> trust_pb2.DecayOldScoresResponse:
        return await self._unary(
            self.stub.DecayOldScores,
            trust_pb2.DecayOldScoresRequest(max_age_days=max_age_days, request_id=request_id),
        )

    async def top_trusted(
        self, *, capability: str = "", k: int = 10
    ) -> trust_pb2.TopTrustedResponse:
        return await self._unary(
            self.stub.TopTrusted, trust_pb2.TopTrustedRequest(capability=capability, k=k)
        )

    async def list_observations(
        self,
        *,
        observer_id: str = "",
        subject_id: str = "",
        capability: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> trust_pb2.ListObservationsResponse:
        return await self._unary(
            self.stub.ListObservations,
            trust_pb2.ListObservationsRequest(
                observer_id=observer_id,
                subject_id=subject_id,
                capability=capability,
                page_size=page_size,
                page_token=page_token,
            ),
        )

    async def iter_observations(
        self, *, observer_id: str = "", subject_id: str = "", capability: str = ""
    ) -> AsyncIterator[trust_pb2.Observation]:
        """Every recorded observation matching the filters, page by page."""
        token = ""
        while True:
            page = await self.list_observations(
                observer_id=observer_id,
                subject_id=subject_id,
                capability=capability,
                page_size=1000,
                page_token=token,
            )
            for observation in page.observations:
                yield observation
            token = page.next_page_token
            if not token:
                return

    async def watch(self, *, from_index: int = 0) -> AsyncIterator[trust_pb2.WatchResponse]:
        async for response in self._stream(
            self.stub.Watch, trust_pb2.WatchRequest(from_index=from_index)
        ):
            yield response


def observe_request(
    observer_id: str,
    subject_id: str,
    result: common_pb2.Outcome,
    *,
    capability: str = "",
    observed_at: float | None = None,
    request_id: str = "",
    identity: Identity | None = None,
) -> trust_pb2.ObserveRequest:
    """An ObserveRequest, signed when ``identity`` is given."""
    if identity is not None and not request_id:
        request_id = f"obs-{uuid.uuid4().hex}"
    request = trust_pb2.ObserveRequest(
        observer_id=observer_id,
        subject_id=subject_id,
        outcome=result,
        capability=capability,
        request_id=request_id,
    )
    if observed_at is not None:
        request.observe_time.CopyFrom(to_timestamp(observed_at))
    if identity is not None:
        sign_observation(request, identity)
    return request


def sign_observation(request: trust_pb2.ObserveRequest, identity: Identity) -> None:
    """Signs an ObserveRequest in place with the observer's key."""
    observe_ns = timestamp_ns(request.observe_time) if request.HasField("observe_time") else 0
    request.observer_public_key = identity.public_key
    request.observer_signature = identity.sign(
        *signing.trust_observation(
            request.observer_id,
            request.subject_id,
            request.capability,
            request.outcome.kind,
            request.outcome.error_rate,
            request.outcome.duration_ms,
            observe_ns,
            request.request_id,
        )
    )
