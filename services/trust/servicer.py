"""TrustService over gRPC: converts protos to core calls and back."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from agent2028.common.v1 import common_pb2
from agent2028.trust.v1 import trust_pb2, trust_pb2_grpc
from services.common.bootstrap import ServiceApp
from services.common.config import ServerConfig
from services.common.errors import DomainError, InvalidArgument, ResourceExhausted
from services.common.timeutil import require_timestamp, timestamp_ns, to_timestamp
from services.common.validation import page_size
from services.trust.config import TrustConfig, database_path
from services.trust.core import (
    MAX_BATCH,
    Conservative,
    Observation,
    Score,
    Trust,
    TrustEvent,
    TrustStore,
    in_batch,
)

log = logging.getLogger(__name__)

OBSERVATIONS = Counter(
    "agent2028_trust_observations_total", "Observations recorded, by outcome kind.", ["kind"]
)
EDGES = Gauge("agent2028_trust_edges", "Directed (observer, subject) edges with evidence.")


def score_to_proto(score: Score) -> trust_pb2.TrustScore:
    out = trust_pb2.TrustScore(
        observer_id=score.observer_id,
        subject_id=score.subject_id,
        score=score.score,
        confidence=score.confidence,
        positive_evidence=score.positive,
        negative_evidence=score.negative,
        observations=score.observations,
    )
    if score.last_at:
        out.last_observe_time.CopyFrom(to_timestamp(score.last_at))
    return out


def outcome_to_proto(obs: Observation) -> common_pb2.Outcome:
    return common_pb2.Outcome(
        kind=int(obs.kind), error_rate=obs.error_rate, duration_ms=obs.duration_ms
    )


def observation_to_proto(obs: Observation) -> trust_pb2.Observation:
    return trust_pb2.Observation(
        sequence=obs.sequence,
        observer_id=obs.observer_id,
        subject_id=obs.subject_id,
        capability=obs.capability,
        outcome=outcome_to_proto(obs),
        observe_time=to_timestamp(obs.observed_at),
        record_time=to_timestamp(obs.recorded_at),
        weight=obs.weight,
        signed=obs.signed,
        request_id=obs.request_id,
    )


def event_to_proto(event: TrustEvent) -> trust_pb2.TrustEvent:
    out = trust_pb2.TrustEvent(
        index=event.index,
        score=score_to_proto(event.score),
        capability=event.capability,
        decayed=event.observation is None,
    )
    if event.observation is not None:
        out.outcome.CopyFrom(outcome_to_proto(event.observation))
    return out


def _trusted(c: Conservative) -> trust_pb2.TrustedSubject:
    return trust_pb2.TrustedSubject(
        subject_id=c.subject_id, lower_bound=c.lower_bound, mean=c.mean, observers=c.observers
    )


def observation_fields(request: trust_pb2.ObserveRequest) -> dict[str, Any]:
    """The core's keyword arguments for one ObserveRequest."""
    if not request.HasField("outcome"):
        raise InvalidArgument("outcome is required", field="outcome", reason="EMPTY_FIELD")
    observed_at = None
    observe_ns = 0
    if request.HasField("observe_time"):
        observed_at = require_timestamp(request.observe_time, "observe_time", present=True)
        observe_ns = timestamp_ns(request.observe_time)
    outcome = request.outcome
    return dict(
        observer_id=request.observer_id,
        subject_id=request.subject_id,
        kind=outcome.kind,
        error_rate=outcome.error_rate,
        duration_ms=outcome.duration_ms,
        capability=request.capability,
        observed_at=observed_at,
        observe_ns=observe_ns,
        request_id=request.request_id,
        public_key=request.observer_public_key,
        signature=request.observer_signature,
    )


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self, trust: Trust, config: TrustConfig) -> None:
        self.trust = trust
        self.config = config

    async def Observe(
        self, request: trust_pb2.ObserveRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ObserveResponse:
        score, duplicate = await self.trust.observe(**observation_fields(request))
        if not duplicate:
            OBSERVATIONS.labels(common_pb2.OutcomeKind.Name(request.outcome.kind)).inc()
        return trust_pb2.ObserveResponse(score=score_to_proto(score), duplicate=duplicate)

    async def ObserveBatch(
        self, request: trust_pb2.ObserveBatchRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ObserveBatchResponse:
        if len(request.observations) > MAX_BATCH:
            raise InvalidArgument(
                f"observations holds {len(request.observations)}; at most {MAX_BATCH} allowed",
                field="observations",
                reason="TOO_MANY_VALUES",
            )
        batch = []
        for i, item in enumerate(request.observations):
            try:
                batch.append(observation_fields(item))
            except DomainError as exc:
                raise in_batch(exc, i) from None
        results = await self.trust.observe_many(batch)
        for item, (_, duplicate) in zip(request.observations, results, strict=True):
            if not duplicate:
                OBSERVATIONS.labels(common_pb2.OutcomeKind.Name(item.outcome.kind)).inc()
        return trust_pb2.ObserveBatchResponse(
            results=[
                trust_pb2.ObserveResponse(score=score_to_proto(score), duplicate=duplicate)
                for score, duplicate in results
            ]
        )

    async def Score(
        self, request: trust_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ScoreResponse:
        score = self.trust.score(request.observer_id, request.subject_id, request.capability)
        return trust_pb2.ScoreResponse(score=score_to_proto(score))

    async def ConservativeScore(
        self, request: trust_pb2.ConservativeScoreRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ConservativeScoreResponse:
        c = self.trust.conservative(
            request.subject_id,
            capability=request.capability,
            credible_level=request.credible_level,
        )
        return trust_pb2.ConservativeScoreResponse(
            subject_id=c.subject_id,
            lower_bound=c.lower_bound,
            mean=c.mean,
            confidence=c.confidence,
            observers=c.observers,
            unvouched_evidence=c.unvouched_evidence,
            vouched_evidence=c.vouched_evidence,
        )

    async def TransitiveTrust(
        self, request: trust_pb2.TransitiveTrustRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.TransitiveTrustResponse:
        trust, path = self.trust.transitive(request.from_id, request.to_id, request.max_depth)
        return trust_pb2.TransitiveTrustResponse(trust=trust, path=path)

    async def DecayOldScores(
        self, request: trust_pb2.DecayOldScoresRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.DecayOldScoresResponse:
        edges = await self.trust.decay_old_scores(request.max_age_days, request.request_id)
        log.info("decayed evidence older than %.1f days on %d edges", request.max_age_days, edges)
        return trust_pb2.DecayOldScoresResponse(edges_decayed=edges)

    async def TopTrusted(
        self, request: trust_pb2.TopTrustedRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.TopTrustedResponse:
        top = self.trust.top_trusted(capability=request.capability, k=request.k)
        return trust_pb2.TopTrustedResponse(subjects=[_trusted(c) for c in top])

    async def ListObservations(
        self, request: trust_pb2.ListObservationsRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ListObservationsResponse:
        rows, token = await self.trust.list_observations(
            page_size=page_size(request.page_size),
            page_token=request.page_token,
            observer_id=request.observer_id,
            subject_id=request.subject_id,
            capability=request.capability,
        )
        return trust_pb2.ListObservationsResponse(
            observations=[observation_to_proto(o) for o in rows], next_page_token=token
        )

    async def Watch(
        self, request: trust_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trust_pb2.WatchResponse]:
        if request.from_index < 0:
            raise InvalidArgument(
                "from_index must not be negative", field="from_index", reason="OUT_OF_RANGE"
            )
        queue: asyncio.Queue[TrustEvent] = asyncio.Queue(maxsize=self.config.watch_queue)
        lagged: list[int] = []

        def on_event(event: TrustEvent) -> None:
            if lagged:
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                lagged.append(event.index)

        # Subscribing and reading the backlog with no await between them: no
        # change falls in the gap and none is delivered twice.
        self.trust.add_listener(on_event)
        try:
            current = self.trust.index
            backlog = self.trust.events_since(request.from_index) if request.from_index else []
            for start in range(0, len(backlog), 256):
                batch = backlog[start : start + 256]
                yield trust_pb2.WatchResponse(
                    events=[event_to_proto(e) for e in batch], index=batch[-1].index
                )
            if not backlog:
                yield trust_pb2.WatchResponse(index=current)
            while True:
                event = await queue.get()
                events = [event]
                while not queue.empty():
                    events.append(queue.get_nowait())
                yield trust_pb2.WatchResponse(
                    events=[event_to_proto(e) for e in events], index=events[-1].index
                )
                if lagged and queue.empty():
                    last = events[-1].index
                    raise ResourceExhausted(
                        f"watcher fell behind at index {last}; watch again from {last}",
                        reason="WATCHER_LAGGED",
                        metadata={"resume_index": str(last)},
                    )
        finally:
            self.trust.remove_listener(on_event)


class TrustApp(ServiceApp):
    label = "trust"

    def __init__(self, config: TrustConfig, data_dir: str) -> None:
        super().__init__()
        self.config = config
        self.trust = Trust(
            config.settings, TrustStore(database_path(data_dir), synchronous=config.synchronous)
        )
        self.servicer = TrustServicer(self.trust, config)
        self.trust.add_listener(lambda event: EDGES.set(len(self.trust.graph.pairs)))

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(self.servicer, trust_pb2.DESCRIPTOR.services_by_name["TrustService"])]

    async def start(self) -> None:
        await self.trust.open()
        # Everything alive now (modules, grpc, protobuf, the loaded state) lives
        # as long as the process: keep it out of the collector's full passes,
        # whose pauses otherwise show up in the latency tail.
        gc.collect()
        gc.freeze()
        EDGES.set(len(self.trust.graph.pairs))
        log.info(
            "trust ledger open: %d observations on %d edges; roots %s",
            self.trust.graph.observations,
            len(self.trust.graph.pairs),
            ", ".join(self.trust.settings.roots) or "none",
        )

    async def stop(self) -> None:
        await self.trust.close()


async def build(server_config: ServerConfig) -> TrustApp:
    return TrustApp(TrustConfig.from_env(), server_config.data_dir)
