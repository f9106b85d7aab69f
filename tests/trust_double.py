"""A recording TrustService: a test double of the trust *peer* (the real
service is built separately), speaking the trust proto over real gRPC, so
services that report to trust can be tested end to end. It records every
Observe, counts a repeated request_id once (as the contract says), and can
be stopped and started again on the same port to play an outage."""

from __future__ import annotations

import grpc

from agent2028.trust.v1 import trust_pb2, trust_pb2_grpc


class RecordingTrust(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self) -> None:
        self.observations: list[trust_pb2.ObserveRequest] = []
        self.calls = 0
        self._seen: set[str] = set()

    async def Observe(
        self, request: trust_pb2.ObserveRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.ObserveResponse:
        self.calls += 1
        score = trust_pb2.TrustScore(
            observer_id=request.observer_id, subject_id=request.subject_id, score=0.3
        )
        if request.request_id and request.request_id in self._seen:
            return trust_pb2.ObserveResponse(score=score, duplicate=True)
        if request.request_id:
            self._seen.add(request.request_id)
        self.observations.append(request)
        return trust_pb2.ObserveResponse(score=score)


class RecordingTrustServer:
    def __init__(self) -> None:
        self.trust = RecordingTrust()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> str:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        trust_pb2_grpc.add_TrustServiceServicer_to_server(self.trust, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
