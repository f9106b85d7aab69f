"""Agent behaviour: propose beliefs and intentions to the hive mind.

Given ``--belief NAME=CONFIDENCE`` and ``--intend TEXT`` (repeatable; or
AGENT_BELIEFS="a=0.7,b=0.8" and AGENT_INTENTIONS="x,y"), the agent proposes
each once, signed, as soon as it is registered, retrying with backoff until
the swarm service has them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random

from clients.errors import ClientError, InvalidArgument
from clients.swarm import SwarmClient
from services.common.validation import require_id, require_text

log = logging.getLogger(__name__)


def parse_beliefs(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=CONFIDENCE")
            require_id(name.strip(), "name", max_len=129)
            confidence = float(value)
        except Exception as exc:
            raise ValueError(f"belief {item!r}: {exc}") from None
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"belief {item!r}: confidence must be within [0, 1]")
        out.append((name.strip(), confidence))
    return out


def parse_intentions(items: list[str]) -> list[str]:
    out = []
    for item in items:
        try:
            text = require_text(item.strip(), "intention", max_len=256)
        except Exception as exc:
            raise ValueError(f"intention {item!r}: {exc}") from None
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError(f"intention {item!r}: control characters are not allowed")
        out.append(text)
    return out


def behaviour(beliefs: list[tuple[str, float]], intentions: list[str], swarm_addr: str):  # type: ignore[no-untyped-def]
    """The coroutine for ``Agent.add_behaviour``."""

    async def propose_to_hive(agent) -> None:  # type: ignore[no-untyped-def]
        todo: list[tuple[str, object]] = [("belief", b) for b in beliefs] + [
            ("intention", i) for i in intentions
        ]
        agent.hive_proposals = []
        delay = 0.1
        async with SwarmClient(swarm_addr, timeout_s=3.0) as client:
            while todo and not agent.stopping.is_set():
                kind, item = todo[0]
                try:
                    if kind == "belief":
                        name, confidence = item  # type: ignore[misc]
                        response = await client.propose_belief(agent.identity, name, confidence)
                    else:
                        response = await client.propose_intention(agent.identity, str(item))
                    log.info(
                        "agent %s proposed %s %s (generation %d)",
                        agent.agent_id,
                        kind,
                        item,
                        response.generation,
                    )
                    agent.hive_proposals.append((kind, item, response.generation))
                    todo.pop(0)
                    delay = 0.1
                except InvalidArgument as exc:
                    log.warning("agent %s: hive refused %s %s: %s", agent.agent_id, kind, item, exc)
                    todo.pop(0)
                except ClientError as exc:
                    log.info("agent %s: hive not reachable (%s); retrying", agent.agent_id, exc)
                    try:
                        await asyncio.wait_for(
                            agent.stopping.wait(), random.uniform(delay / 2, delay)
                        )
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, 2.0)

    return propose_to_hive
