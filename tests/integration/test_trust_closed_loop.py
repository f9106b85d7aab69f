"""Trust as the other services use it, with the real trust service: consensus
reports an equivocator and its standing falls; the market's trust-adjusted
auction reads standing that a root earned for an agent."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from clients import errors
from clients.consensus import ConsensusClient
from clients.market import MarketClient
from clients.registry import RegistryClient
from clients.trust import TrustClient, outcome
from services.common.crypto import Identity
from services.consensus.config import ConsensusConfig
from services.consensus.core import ConsensusSettings
from services.consensus.servicer import ConsensusApp
from services.market.config import MarketConfig
from services.market.core import MarketSettings
from services.market.servicer import MarketApp
from services.trust.config import TrustConfig
from services.trust.servicer import TrustApp
from tests.support import eventually, serve


@pytest.fixture
async def trust(tmp_path) -> AsyncIterator[tuple[str, TrustClient]]:  # type: ignore[no-untyped-def]
    # The default roots: the cluster's own observers, broker and consensus.
    config = TrustConfig.from_env({})
    app = TrustApp(config, os.path.join(str(tmp_path), "trust"))
    host = await serve(app, os.path.join(str(tmp_path), "trust"))
    client = TrustClient(host.address)
    try:
        yield host.address, client
    finally:
        await client.close()
        await host.stop(grace_s=0.5)


async def register(
    address: str, *ids: str, capability: str = "database.query"
) -> dict[str, Identity]:
    identities = {}
    async with RegistryClient(address) as registry:
        for i, agent_id in enumerate(ids):
            identity = Identity.generate(agent_id)
            await registry.register(
                identity, address=f"127.0.0.1:{9100 + i}", capabilities=[capability], lease_ttl_s=60
            )
            identities[agent_id] = identity
    return identities


async def test_an_equivocator_loses_standing_with_the_real_trust_service(
    registry_server, trust, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    trust_addr, trust_client = trust
    config = ConsensusConfig(
        settings=ConsensusSettings(),
        registry_addr=registry_server.address,
        trust_addr=trust_addr,
        observer_id="consensus",
        verify_workers=0,
        watch_queue=64,
        registry_timeout_s=3.0,
        db_synchronous="NORMAL",
    )
    data = os.path.join(str(tmp_path), "consensus")
    host = await serve(ConsensusApp(config, data), data)
    try:
        voters = await register(
            registry_server.address, "honest-1", "honest-2", "honest-3", "cheat"
        )
        async with ConsensusClient(host.address) as consensus:
            proposal = (
                await consensus.propose(
                    "rotate_keys", proposer_id="ops", voter_ids=list(voters), voting_period_s=60
                )
            ).proposal
            await consensus.vote(voters["cheat"], proposal.proposal_id, "approve")
            with pytest.raises(errors.AlreadyExists):
                await consensus.vote(voters["cheat"], proposal.proposal_id, "reject")
            for name in ("honest-1", "honest-2", "honest-3"):
                await consensus.vote(voters[name], proposal.proposal_id, "approve")

        async def reported() -> bool:
            return (await trust_client.score("consensus", "cheat")).observations == 1

        await eventually(reported, timeout_s=30, what="the equivocation reaching trust")
        edge = await trust_client.score("consensus", "cheat")
        assert edge.score < 0.2  # one complete failure
        cheat = await trust_client.conservative_score("cheat")
        honest = await trust_client.conservative_score("honest-1")
        # Consensus signs its reports and is a root: its evidence counts fully.
        assert cheat.observers == 1 and cheat.mean < 0.3
        assert cheat.lower_bound < honest.lower_bound and cheat.mean < honest.mean
        # Its key is bound now: an unsigned report claiming to be consensus is refused.
        with pytest.raises(errors.ClientError):
            await trust_client.observe(
                "consensus", "honest-1", outcome("complete_failure"), request_id="forged-report"
            )
        assert (await trust_client.score("consensus", "honest-1")).observations == 0
    finally:
        await host.stop(grace_s=0.5)


async def test_trust_adjusted_auctions_read_standing_earned_from_a_root(
    registry_server, trust, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    trust_addr, trust_client = trust
    bidders = await register(
        registry_server.address, "cheap-flaky", "dear-reliable", capability="compute"
    )
    broker = Identity.generate("broker")  # a root; its first signed observation binds its key
    for i in range(8):
        await trust_client.observe(
            "broker",
            "dear-reliable",
            outcome("success", duration_ms=40),
            request_id=f"ok-{i}",
            identity=broker,
        )
        await trust_client.observe(
            "broker",
            "cheap-flaky",
            outcome("complete_failure"),
            request_id=f"bad-{i}",
            identity=broker,
        )
    config = MarketConfig(
        settings=MarketSettings(),
        registry_addr=registry_server.address,
        trust_addr=trust_addr,
        registry_timeout_s=2.0,
        trust_timeout_s=2.0,
        watch_queue=1000,
        db_synchronous="NORMAL",
    )
    data = os.path.join(str(tmp_path), "market")
    host = await serve(MarketApp(config, data), data)
    try:
        async with MarketClient(host.address) as market:
            for task_id in ("plain", "trusted"):
                await market.list_task("compute", ["compute"], task_id=task_id)
                await market.place_bid(
                    bidders["cheap-flaky"],
                    task_id,
                    price=10.0,
                    estimated_completion_s=10.0,
                    confidence=0.9,
                )
                await market.place_bid(
                    bidders["dear-reliable"],
                    task_id,
                    price=14.0,
                    estimated_completion_s=10.0,
                    confidence=0.9,
                )
            assert (await market.run_auction("plain")).winning_bid.agent_id == "cheap-flaky"
            trusted = await market.run_auction("trusted", scoring="trust")
            assert trusted.winning_bid.agent_id == "dear-reliable"
            standing = await trust_client.conservative_score("dear-reliable")
            assert trusted.winning_bid.trust == pytest.approx(standing.lower_bound, rel=1e-6)
    finally:
        await host.stop(grace_s=0.5)
