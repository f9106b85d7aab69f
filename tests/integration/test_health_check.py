"""python -m clients.health_check, the containers' health check, against a
real server: exit 0 only while it is SERVING, 1 otherwise, 2 on misuse."""

from __future__ import annotations

import asyncio
import os
import sys

from grpc_health.v1 import health_pb2

from clients.health_check import default_address


async def health_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.health_check",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_serving_server_passes(registry_server) -> None:  # type: ignore[no-untyped-def]
    code, out = await health_check(registry_server.address)
    assert (code, out.split()[-1]) == (0, "SERVING"), out
    code, out = await health_check(
        registry_server.address, "--service", "agent2028.registry.v1.RegistryService"
    )
    assert code == 0, out


async def test_not_serving_and_unknown_services_fail(registry_server) -> None:  # type: ignore[no-untyped-def]
    code, out = await health_check(registry_server.address, "--service", "no.such.Service")
    assert (code, out.split()[-1]) == (1, "SERVICE_UNKNOWN"), out
    await registry_server.host.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, out = await health_check(registry_server.address)
    assert (code, out.split()[-1]) == (1, "NOT_SERVING"), out


async def test_unreachable_fails(registry_server) -> None:  # type: ignore[no-untyped-def]
    address = registry_server.address
    await registry_server.host.stop(grace_s=0)
    code, out = await health_check(address, "--timeout", "1")
    assert (code, out.split()[-1]) == (1, "UNREACHABLE"), out


async def test_address_from_the_environment(registry_server) -> None:  # type: ignore[no-untyped-def]
    port = registry_server.address.rsplit(":", 1)[1]
    code, out = await health_check(env={"PORT": port, "AGENT_PORT": "1"})
    assert code == 0, out
    code, out = await health_check(env={"PORT": "", "AGENT_PORT": port})
    assert code == 0, out


async def test_misuse_exits_2() -> None:
    code, out = await health_check(env={"PORT": "", "AGENT_PORT": "", "HEALTH_CHECK_ADDR": ""})
    assert code == 2 and "no address" in out, out
    code, out = await health_check("127.0.0.1:1", "--timeout", "nan")
    assert code == 2, out


def test_default_address_order() -> None:
    assert default_address({"HEALTH_CHECK_ADDR": "h:1", "PORT": "2"}) == "h:1"
    assert default_address({"PORT": "50051", "AGENT_PORT": "50100"}) == "127.0.0.1:50051"
    assert default_address({"PORT": "0", "AGENT_PORT": "50100"}) == "127.0.0.1:50100"
    assert default_address({}) is None
