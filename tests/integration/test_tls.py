"""Mutual TLS: a registry and an agent serving with certificates from a CA the
test makes; clients with a certificate get through, others do not."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients import errors
from clients.agent import Agent
from clients.agent_client import AgentClient, verify_receipt
from clients.registry import RegistryClient
from services.common.config import TlsConfig
from services.common.crypto import Identity
from services.registry.config import RegistryConfig
from services.registry.servicer import RegistryApp
from tests.conftest import FAST_REGISTRY
from tests.support import serve


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: str) -> dict[str, TlsConfig]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client
    certificate; returns the TLS settings of a server and of a client."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent2028 test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, server: bool) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path = _write(
            os.path.join(directory, f"{name}.crt"), cert.public_bytes(serialization.Encoding.PEM)
        )
        key_path = _write(os.path.join(directory, f"{name}.key"), _pem_key(key))
        return cert_path, key_path

    ca_path = _write(os.path.join(directory, "ca.crt"), ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = leaf("server", True)
    client_cert, client_key = leaf("client", False)
    return {
        # Agents serve AgentService and call the registry: one certificate for both.
        "server": TlsConfig(
            cert_file=server_cert, key_file=server_key, ca_file=ca_path, require_client_auth=True
        ),
        "client": TlsConfig(
            cert_file=client_cert, key_file=client_key, ca_file=ca_path, require_client_auth=False
        ),
        "ca_only": TlsConfig(
            cert_file=None, key_file=None, ca_file=ca_path, require_client_auth=False
        ),
    }


@pytest.fixture
async def mtls_registry(tmp_path):  # type: ignore[no-untyped-def]
    pki = make_pki(str(tmp_path))
    app = RegistryApp(RegistryConfig(settings=FAST_REGISTRY, sweep_interval_s=0.05, watch_queue=64))
    host = await serve(app, str(tmp_path), tls=pki["server"])
    try:
        yield host, app, pki
    finally:
        await host.stop(grace_s=0.5)


async def test_clients_with_a_certificate_get_through(mtls_registry) -> None:  # type: ignore[no-untyped-def]
    host, _app, pki = mtls_registry
    async with RegistryClient(host.address, tls=pki["client"]) as client:
        await client.register(
            Identity.generate("tls-agent"), address="127.0.0.1:9000", capabilities=["compute"]
        )
        found = await client.find_by_capability("compute")
        assert [a.card.agent_id for a in found.agents] == ["tls-agent"]


@pytest.mark.parametrize("who", ["no certificate", "plaintext"])
async def test_clients_without_one_are_turned_away(mtls_registry, who: str) -> None:  # type: ignore[no-untyped-def]
    host, app, pki = mtls_registry
    from clients.channel import create_channel

    channel = (
        create_channel(host.address, tls=pki["ca_only"], retries=False)
        if who == "no certificate"
        else create_channel(host.address, tls=None, env={}, retries=False)
    )
    async with RegistryClient(channel, timeout_s=3) as client:
        with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
            await client.list_agents()
    await channel.close()
    assert not app.core.agents


async def test_an_agent_serves_and_registers_over_mtls(mtls_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, app, pki = mtls_registry
    agent = Agent(
        "tls-worker",
        registry=host.address,
        capabilities=["compute"],
        data_dir=os.path.join(str(tmp_path), "agent"),
        tls=pki["server"],
    )
    await agent.start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert app.core.agents["tls-worker"].address == agent.address
        async with AgentClient(agent.address, tls=pki["client"]) as client:
            response = await client.execute(
                "compute", ["sum", "2", "3"], command_id="tls-1", timeout_s=5
            )
            assert json.loads(response.output)["sum"] == 5.0
            assert verify_receipt(response, agent.identity.public_key)
        async with AgentClient(agent.address, tls=pki["ca_only"], timeout_s=3) as stranger:
            with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
                await stranger.ping()
    finally:
        await agent.stop()
