"""Who may bid: the market's view of the registry.

The market follows the registry's Watch stream (through
``clients.registry.RegistryClient``) and keeps each agent's key, capabilities
and health, so checking a bid costs a dictionary lookup rather than a call to
the registry. An agent the stream has not shown yet (it registered a moment
ago) is fetched with GetAgent. When an agent leaves (deregisters, or expires
after going critical) the market is told, so its assigned tasks can be failed
and re-listed rather than waiting forever.

While the registry is unreachable the last known view stays in force; bids
from agents the market has never seen are then UNAVAILABLE, naming the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent2028.registry.v1 import registry_pb2
from clients.errors import ClientError, DeadlineExceeded, NotFound, OutOfRange, ResourceExhausted
from clients.errors import Unavailable as UnavailableError
from clients.registry import RegistryClient
from services.common.errors import Unavailable
from services.market.core import Bidder

log = logging.getLogger(__name__)

CRITICAL = 3
LEFT = (registry_pb2.EVENT_TYPE_DEREGISTERED, registry_pb2.EVENT_TYPE_EXPIRED)


def _bidder(agent: registry_pb2.Agent) -> Bidder:
    return Bidder(
        agent_id=agent.card.agent_id,
        public_key=bytes(agent.card.public_key),
        capabilities=frozenset(agent.card.capabilities),
        healthy=agent.status != CRITICAL,
    )


class RegistryDirectory:
    def __init__(
        self,
        registry_addr: str,
        *,
        timeout_s: float = 2.0,
        on_leave: Callable[[str, str], None] | None = None,
    ) -> None:
        self.registry_addr = registry_addr
        self.client = RegistryClient(registry_addr, timeout_s=timeout_s)
        self.agents: dict[str, Bidder] = {}
        self.synced = asyncio.Event()
        self.on_leave = on_leave
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="market-registry-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    def lookup(self, agent_id: str) -> Bidder | None:
        return self.agents.get(agent_id)

    async def resolve(self, agent_id: str) -> Bidder | None:
        """The registered agent, or None when the registry does not know it."""
        bidder = self.agents.get(agent_id)
        if bidder is not None:
            return bidder
        try:
            agent = await self.client.get_agent(agent_id)
        except NotFound:
            return None
        except (UnavailableError, DeadlineExceeded) as exc:
            raise Unavailable(
                f"the registry at {self.registry_addr} is unreachable, so agent {agent_id!r} "
                f"cannot be checked ({exc.code.name})",
                reason="REGISTRY_UNAVAILABLE",
                metadata={"service": "registry"},
            ) from None
        bidder = _bidder(agent)
        # The watch stream may already have moved on; never let a fetched
        # copy overwrite what the stream said since.
        self.agents.setdefault(agent_id, bidder)
        return self.agents[agent_id]

    def eligible(self, agent_id: str) -> bool:
        """May this agent's bid take part in an auction now? Registered and
        not critical; everyone, while the market has not heard from the
        registry yet."""
        if not self.synced.is_set():
            return True
        bidder = self.agents.get(agent_id)
        return bidder is not None and bidder.healthy

    async def _follow(self) -> None:
        index = 0
        delay = 0.1
        while True:
            fresh = index == 0
            try:
                async for response in self.client.watch(from_index=index, resume=False):
                    if fresh and response.snapshot:
                        # A new snapshot replaces the view (a restarted
                        # registry may have forgotten agents).
                        self.agents = {}
                        fresh = False
                    for event in response.events:
                        self._apply(event, response.snapshot)
                    index = response.index
                    self.synced.set()
                    delay = 0.1
            except OutOfRange:
                log.info("registry watch index %d is gone; taking a fresh snapshot", index)
                index = 0
            except (UnavailableError, ResourceExhausted, DeadlineExceeded) as exc:
                log.info("registry watch interrupted (%s); resuming from %d", exc.code.name, index)
            except ClientError as exc:
                log.warning("registry watch refused (%s); retrying", exc)
                index = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry watch failed; retrying")
                index = 0
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _apply(self, event: registry_pb2.WatchEvent, snapshot: bool) -> None:
        agent_id = event.agent.card.agent_id
        if event.type in LEFT and not snapshot:
            self.agents.pop(agent_id, None)
            if self.on_leave is not None:
                why = (
                    "deregistered"
                    if event.type == registry_pb2.EVENT_TYPE_DEREGISTERED
                    else "expired"
                )
                try:
                    self.on_leave(agent_id, why)
                except Exception:
                    log.exception("handling agent %s leaving failed", agent_id)
            return
        self.agents[agent_id] = _bidder(event.agent)
