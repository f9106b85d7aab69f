"""Resolving a proposal's electorate through the registry: explicit ids or
every passing agent holding a capability, each with its registered Ed25519
public key (the key its votes must verify under)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from clients import errors as client_errors
from clients.registry import RegistryClient
from services.common.errors import InvalidArgument, NotFound, Unavailable

# GetAgent calls in flight at once for an explicit electorate.
CONCURRENCY = 32


def _unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the registry could not be asked for the electorate ({exc}); retry",
        reason="REGISTRY_UNAVAILABLE",
    )


class RegistryElectorate:
    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    async def by_ids(self, voter_ids: Sequence[str], timeout_s: float) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int, voter_id: str) -> tuple[str, bytes]:
            async with limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _unreachable(TimeoutError("deadline passed"))
                try:
                    async with asyncio.timeout(remaining):
                        agent = await self.registry.get_agent(voter_id)
                except client_errors.NotFound:
                    raise NotFound(
                        f"voter {voter_id} is not registered",
                        field=f"voter_ids[{i}]",
                        reason="VOTER_NOT_REGISTERED",
                    ) from None
                except client_errors.InvalidArgument as exc:
                    raise InvalidArgument(
                        exc.message, field=f"voter_ids[{i}]", reason="MALFORMED_ID"
                    ) from None
                except (client_errors.ClientError, TimeoutError) as exc:
                    raise _unreachable(exc) from None
                return voter_id, bytes(agent.card.public_key)

        return list(await asyncio.gather(*(one(i, v) for i, v in enumerate(voter_ids))))

    async def by_capability(
        self, capability: str, limit: int, timeout_s: float
    ) -> list[tuple[str, bytes]]:
        """Every passing holder of ``capability``; stops after limit + 1 so the
        caller can tell the electorate is too large."""
        out: list[tuple[str, bytes]] = []
        try:
            async with asyncio.timeout(timeout_s):
                async for agent in self.registry.iter_agents(
                    capability=capability, statuses=["passing"], page_size=min(limit + 1, 1000)
                ):
                    out.append((agent.card.agent_id, bytes(agent.card.public_key)))
                    if len(out) > limit:
                        break
        except client_errors.InvalidArgument as exc:
            raise InvalidArgument(
                exc.message, field="electorate_capability", reason="MALFORMED_CAPABILITY"
            ) from None
        except (client_errors.ClientError, TimeoutError) as exc:
            raise _unreachable(exc) from None
        return out
