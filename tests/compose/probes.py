"""Probes the compose tests run INSIDE a container of the cluster (piped to
``python -``), so they see the cluster network as the services do: container
hostnames resolve, advertised agent addresses are reachable. Only the image's
own packages are imported. Each probe prints one JSON document.

  health ADDRESS...                        {address: SERVING | NOT_SERVING | UNREACHABLE}
  execute REGISTRY CAPABILITY ARG...       the best passing agent runs it; the receipt is checked
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys


async def health(addresses: list[str]) -> dict[str, str]:
    from clients.health import check

    statuses = await asyncio.gather(*(check(a, timeout_s=3.0) for a in addresses))
    return dict(zip(addresses, statuses, strict=True))


async def execute(registry: str, capability: str, args: list[str]) -> dict[str, object]:
    from clients.agent_client import AgentClient, verify_receipt
    from clients.registry import RegistryClient

    async with RegistryClient(registry) as client:
        found = await client.find_by_capability(capability, top_k=1)
    if not found.agents:
        return {"found": 0}
    best = found.agents[0]
    async with AgentClient(best.card.address) as agent:
        response = await agent.execute(
            capability,
            args,
            command_id=f"compose-probe-{secrets.token_hex(6)}",
            session_id="compose-tests",
            timeout_s=10,
        )
    return {
        "found": len(found.agents),
        "agent_id": best.card.agent_id,
        "address": best.card.address,
        "success": response.receipt.success,
        "error": response.receipt.error,
        "output": response.output,
        "receipt_agent_id": response.receipt.agent_id,
        "verified": verify_receipt(response, best.card.public_key),
    }


def main(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    if command == "health":
        result: object = asyncio.run(health(rest))
    elif command == "execute":
        result = asyncio.run(execute(rest[0], rest[1], rest[2:]))
    else:
        raise SystemExit(f"unknown probe {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
