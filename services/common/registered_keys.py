"""Public keys of registered agents, fetched from the registry and cached, for
services that verify what agents sign (deposits, votes, hive writes).

An agent's identity is the key it registered with. ``RegisteredKeys.verify``
checks a signature against that key: an id the registry does not know is
NOT_FOUND (the agent must register first), a bad signature UNAUTHENTICATED, and
an unreachable registry UNAVAILABLE (keys already cached keep working). A
signature that fails against a cached key is checked once more against a fresh
lookup, because an agent whose lease lapsed may have registered again with a
new key. Concurrent lookups of one id share one registry call. The fetch function
over the registry is ``clients.registry.public_key_fetch``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from services.common import crypto
from services.common.errors import NotFound, Unauthenticated

Fetch = Callable[[str], Awaitable[bytes | None]]


class RegisteredKeys:
    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_s: float = 30.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # agent id -> (public key or None for "not registered", fetched at)
        self._cache: OrderedDict[str, tuple[bytes | None, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self.lookups = 0

    async def _lookup(self, agent_id: str) -> bytes | None:
        future = self._inflight.get(agent_id)
        if future is not None:
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._inflight[agent_id] = future
        try:
            self.lookups += 1
            key = await self._fetch(agent_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            self._inflight.pop(agent_id, None)
        self._cache[agent_id] = (key, self._clock())
        self._cache.move_to_end(agent_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        future.set_result(key)
        return key

    async def key(self, agent_id: str, *, refresh: bool = False) -> bytes:
        """The agent's registered public key (NOT_FOUND when it is not registered)."""
        cached = self._cache.get(agent_id)
        now = self._clock()
        key: bytes | None
        if cached is not None and not refresh:
            key, at = cached
            ttl = self.ttl_s if key is not None else self.negative_ttl_s
            if now - at > ttl:
                key = await self._lookup(agent_id)
        else:
            key = await self._lookup(agent_id)
        if key is None:
            raise NotFound(
                f"agent {agent_id!r} is not registered; register with the registry first",
                field="agent_id",
                reason="AGENT_NOT_REGISTERED",
            )
        return key

    async def verify(
        self,
        agent_id: str,
        signature: bytes,
        statement: tuple[Any, ...],
        *,
        field: str = "signature",
    ) -> None:
        """Raises unless ``signature`` is the registered agent's over ``statement``."""
        if len(signature) != crypto.SIGNATURE_BYTES:
            raise Unauthenticated(
                f"{field} must be a {crypto.SIGNATURE_BYTES}-byte Ed25519 signature, "
                f"got {len(signature)} bytes",
                field=field,
                reason="MALFORMED_SIGNATURE",
            )
        key = await self.key(agent_id)
        if crypto.verify(key, signature, *statement):
            return
        fresh = await self.key(agent_id, refresh=True)
        if fresh != key and crypto.verify(fresh, signature, *statement):
            return
        raise Unauthenticated(
            f"{field} is not {agent_id}'s signature over this request",
            field=field,
            reason="BAD_SIGNATURE",
        )
