"""Fault modes for tests (all off by default).

Given as ``--fault SPEC`` (repeatable) or AGENT_FAULTS=SPEC,SPEC:

- ``crash``: the process exits abruptly (status 137) when a command arrives,
  as if killed mid-command.
- ``slow:MS``: every command waits MS milliseconds before running.
- ``fail``: every command fails (a signed receipt with success = false).
- ``unhealthy``: heartbeats report health 0.1.
- ``forge-receipts``: receipts are signed with a key that is not the agent's.
- ``lie-bids``: market bids claim a tiny price and time with full confidence,
  and a task won that way is reported failed without being run.
- ``silent``: never votes on proposals (it still watches them).
- ``equivocate``: signs and sends both choices on every proposal it votes on.
- ``forge``: votes are signed with a key that is not the agent's.
- ``vote-for-others``: besides its own vote, casts votes claiming to be every
  other member of the electorate (signed with its own key).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KNOWN = ("crash", "slow", "fail", "unhealthy", "forge-receipts", "lie-bids")
# Voting faults (clients/agent/voting.py).
KNOWN += ("silent", "equivocate", "forge", "vote-for-others")


@dataclass(frozen=True)
class FaultPlan:
    crash: bool = False
    slow_ms: int = 0
    fail: bool = False
    unhealthy: bool = False
    forge_receipts: bool = False
    lie_bids: bool = False
    silent: bool = False
    equivocate: bool = False
    forge_votes: bool = False
    vote_for_others: bool = False

    @classmethod
    def parse(cls, specs: Iterable[str]) -> FaultPlan:
        values: dict[str, object] = {}
        for raw in specs:
            spec = raw.strip()
            if not spec:
                continue
            name, _, arg = spec.partition(":")
            if name == "crash":
                values["crash"] = True
            elif name == "slow":
                try:
                    ms = int(arg)
                except ValueError:
                    raise ValueError(
                        f"fault {spec!r}: slow needs milliseconds, e.g. slow:500"
                    ) from None
                if not 0 <= ms <= 600_000:
                    raise ValueError(f"fault {spec!r}: milliseconds must be within 0..600000")
                values["slow_ms"] = ms
            elif name == "fail":
                values["fail"] = True
            elif name == "unhealthy":
                values["unhealthy"] = True
            elif name == "forge-receipts":
                values["forge_receipts"] = True
            elif name == "lie-bids":
                values["lie_bids"] = True
            elif name == "silent":
                values["silent"] = True
            elif name == "equivocate":
                values["equivocate"] = True
            elif name == "forge":
                values["forge_votes"] = True
            elif name == "vote-for-others":
                values["vote_for_others"] = True
            else:
                raise ValueError(f"unknown fault {spec!r}; known: {', '.join(KNOWN)}")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        return self != FaultPlan()
