"""What each signed statement covers: one definition for signers and verifiers.

Every function returns ``(tag, fields)`` for ``crypto.canonical``; agents sign
with ``identity.sign(*statement)`` and services check with
``crypto.verify(public_key, signature, *statement)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

Statement = tuple[str, ...]


def registration(
    agent_id: str,
    address: str,
    capabilities: Iterable[str],
    max_concurrency: int,
    metadata: Mapping[str, str],
    public_key: bytes,
    issue_ns: int,
) -> tuple[Any, ...]:
    """Proof of possession of the key an agent registers with."""
    return (
        "register",
        agent_id,
        address,
        list(capabilities),
        max_concurrency,
        [[k, metadata[k]] for k in sorted(metadata)],
        bytes(public_key),
        issue_ns,
    )


def deregistration(agent_id: str, issue_ns: int) -> tuple[Any, ...]:
    return ("deregister", agent_id, issue_ns)


def heartbeat_open(agent_id: str, lease_id: str, send_ns: int) -> tuple[Any, ...]:
    """Authenticates a heartbeat stream (its first message)."""
    return ("heartbeat", agent_id, lease_id, send_ns)


def agent_receipt(
    command_id: str,
    session_id: str,
    agent_id: str,
    capability: str,
    start_ns: int,
    finish_ns: int,
    success: bool,
    error: str,
    output_digest: bytes,
) -> tuple[Any, ...]:
    """What an agent attests to about one execution."""
    return (
        "agent-receipt",
        command_id,
        session_id,
        agent_id,
        capability,
        start_ns,
        finish_ns,
        success,
        error,
        bytes(output_digest),
    )


def bid(
    task_id: str,
    attempt: int,
    agent_id: str,
    price: float,
    estimated_completion_s: float,
    confidence: float,
    issue_ns: int,
) -> tuple[Any, ...]:
    """A bid on a market task: what the bidder commits to. ``attempt`` 0 means
    whichever attempt of the task is open when the bid arrives."""
    return (
        "bid",
        task_id,
        attempt,
        agent_id,
        float(price),
        float(estimated_completion_s),
        float(confidence),
        issue_ns,
    )


def task_outcome(
    task_id: str,
    attempt: int,
    agent_id: str,
    success: bool,
    output_digest: bytes,
    error: str,
    issue_ns: int,
) -> tuple[Any, ...]:
    """The assigned agent's report that it completed (or failed) a market task."""
    return (
        "task-outcome",
        task_id,
        attempt,
        agent_id,
        success,
        bytes(output_digest),
        error,
        issue_ns,
    )


def deposit(
    agent_id: str,
    x: float,
    y: float,
    pheromone_type: str,
    amount: float,
    issue_ns: int,
    request_id: str,
) -> tuple[Any, ...]:
    """A pheromone deposit by an agent (stigmergy)."""
    return (
        "deposit",
        agent_id,
        float(x),
        float(y),
        pheromone_type,
        float(amount),
        issue_ns,
        request_id,
    )


def swarm_vote(
    pool_id: str,
    agent_id: str,
    decision: str,
    confidence: float,
    weight: float,
    issue_ns: int,
) -> tuple[Any, ...]:
    """An agent's vote in a swarm voting pool; a later one replaces it."""
    return (
        "swarm-vote",
        pool_id,
        agent_id,
        decision,
        float(confidence),
        float(weight),
        issue_ns,
    )


def hive_belief(
    agent_id: str,
    name: str,
    confidence: float,
    expected_generation: int | None,
    issue_ns: int,
) -> tuple[Any, ...]:
    """An agent's belief for the hive mind, optionally compare-and-set on the
    generation it last saw (-1 when it sets unconditionally)."""
    return (
        "hive-belief",
        agent_id,
        name,
        float(confidence),
        -1 if expected_generation is None else expected_generation,
        issue_ns,
    )


def hive_intention(
    agent_id: str,
    intention: str,
    expected_generation: int | None,
    issue_ns: int,
) -> tuple[Any, ...]:
    """An agent's intention for the hive mind (compare-and-set as hive_belief)."""
    return (
        "hive-intention",
        agent_id,
        intention,
        -1 if expected_generation is None else expected_generation,
        issue_ns,
    )


def vote(proposal_id: str, voter_id: str, choice: str) -> tuple[Any, ...]:
    """A voter's choice on a consensus proposal: ``choice`` is "approve" or
    "reject". The voter id is covered too, so a vote can never be replayed
    under another id that happens to share the key."""
    return ("vote", proposal_id, voter_id, choice)


def trust_observation(
    observer_id: str,
    subject_id: str,
    capability: str,
    outcome_kind: int,
    error_rate: float,
    duration_ms: float,
    observe_ns: int,
    request_id: str,
) -> tuple[Any, ...]:
    """An observer's claim about a subject's outcome (trust Observe).
    ``observe_ns`` is 0 when the observation carries no time."""
    return (
        "trust-observation",
        observer_id,
        subject_id,
        capability,
        int(outcome_kind),
        float(error_rate),
        float(duration_ms),
        observe_ns,
        request_id,
    )


def broker_receipt(
    broker_id: str,
    command_id: str,
    session_id: str,
    agent_id: str,
    capability: str,
    start_ns: int,
    finish_ns: int,
    duration_ms: float,
    success: bool,
    error: str,
    attempts: int,
    output_digest: bytes,
    args_digest: bytes,
    strategy: int,
    attempt_log: Iterable[tuple[str, str]],
    agent_public_key: bytes,
    agent_signature: bytes,
) -> tuple[Any, ...]:
    """What the broker attests to about one execution: its verdict, every
    agent it tried with the result, and the agent's own signature and key
    (so the broker's signature vouches for the agent's statement too)."""
    return (
        "broker-receipt",
        broker_id,
        command_id,
        session_id,
        agent_id,
        capability,
        start_ns,
        finish_ns,
        float(duration_ms),
        success,
        error,
        attempts,
        bytes(output_digest),
        bytes(args_digest),
        int(strategy),
        [[agent, result] for agent, result in attempt_log],
        bytes(agent_public_key),
        bytes(agent_signature),
    )


def task_command_id(task_id: str, attempt: int, dispatch: int = 0) -> str:
    """The command id under which attempt ``attempt`` of market task
    ``task_id`` runs: an ``agent_receipt`` carrying it attests to that
    attempt's outcome, which is what the market's SettleWithReceipt accepts.
    ``dispatch`` > 0 numbers a dispatcher's later tries (the broker keeps one
    receipt per command id, so a try that reached no agent cannot be
    repeated under the same id). At most 100 characters, the broker's
    request-id limit."""
    base = f"{task_id}.{attempt}"
    if len(base) > 90:
        base = "market-" + hashlib.sha256(base.encode()).hexdigest()[:32]
    return base if dispatch <= 0 else f"{base}.d{dispatch}"


def is_task_command_id(command_id: str, task_id: str, attempt: int) -> bool:
    """Whether ``command_id`` is one of ``task_command_id(task_id, attempt, n)``."""
    base = task_command_id(task_id, attempt)
    if command_id == base:
        return True
    prefix = base + ".d"
    tail = command_id[len(prefix) :]
    return (
        command_id.startswith(prefix)
        and tail.isdigit()
        and tail.isascii()
        and not tail.startswith("0")
    )
