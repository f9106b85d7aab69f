"""How each operation kind is carried out through the services' clients.

Every downstream call carries a request id derived from the operation's own
(``<request_id>.exec``, ``.propose``, ``.observe``, ``.pool``, ``.list``), so a
retried operation finishes the work of an interrupted one instead of doing
it twice, and a deadline taken from what is left of the operation's time.
A failed call becomes a domain error with the same canonical code, the
field prefixed with the operation's name (``execute.capability``), and
ErrorInfo metadata naming the service (``service=broker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from agent2028.broker.v1 import broker_pb2
from agent2028.consensus.v1 import consensus_pb2
from agent2028.market.v1 import market_pb2
from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from agent2028.swarm.v1 import swarm_pb2
from clients import errors
from clients.broker import STRATEGY_NAMES as BROKER_STRATEGIES
from clients.broker import BrokerClient
from clients.consensus import STRATEGY_NAMES as CONSENSUS_STRATEGIES
from clients.consensus import ConsensusClient
from clients.market import MarketClient
from clients.stigmergy import StigmergyClient
from clients.swarm import SwarmClient
from clients.trust import TrustClient, outcome
from services.common import errors as domain
from services.common.crypto import Identity
from services.common.timeutil import from_duration, require_duration
from services.common.validation import (
    optional_id,
    require_capabilities,
    require_capability,
    require_finite,
    require_id,
    require_int_range,
    require_text,
)
from services.orchestrator.bridge import Bridge
from services.orchestrator.bus import EventBus
from services.orchestrator.core import ROUTES, Kind, Status
from services.orchestrator.events import Draft

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_OPERATION_LEN = 256
MAX_TOPIC_LEN = 256
# Time kept back from an operation's deadline for its own bookkeeping.
RESERVE_S = 0.25
POLL_S = 0.1
THRESHOLD_NAMES = {0: "simple", 1: "simple", 2: "super", 3: "unanimous"}
_DOMAIN: dict[str, type[domain.DomainError]] = {
    "INVALID_ARGUMENT": domain.InvalidArgument,
    "NOT_FOUND": domain.NotFound,
    "ALREADY_EXISTS": domain.AlreadyExists,
    "PERMISSION_DENIED": domain.PermissionDenied,
    "UNAUTHENTICATED": domain.Unauthenticated,
    "FAILED_PRECONDITION": domain.FailedPrecondition,
    "ABORTED": domain.Aborted,
    "OUT_OF_RANGE": domain.OutOfRange,
    "RESOURCE_EXHAUSTED": domain.ResourceExhausted,
    "DEADLINE_EXCEEDED": domain.DeadlineExceeded,
}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def budget(self, cap: float | None = None) -> float:
        """What a call may take now: what is left (less the reserve), at
        least a moment, at most ``cap``."""
        left = max(self.left() - RESERVE_S, 0.05)
        return min(left, cap) if cap is not None else left


def downstream_error(exc: errors.ClientError, service: str, prefix: str) -> domain.DomainError:
    """A client error as this service's own, naming the service."""
    cls = _DOMAIN.get(exc.code.name, domain.Unavailable)
    metadata = {k: v for k, v in exc.metadata.items() if k != "field"}
    metadata["service"] = service
    if exc.reason:
        reason = exc.reason
    elif cls is domain.Unavailable:
        reason = "SERVICE_UNAVAILABLE"
    else:
        reason = exc.code.name
    if cls is domain.Unavailable and exc.code.name != "UNAVAILABLE":
        metadata["code"] = exc.code.name
    field = f"{prefix}.{exc.field}" if exc.field and prefix else (exc.field or None)
    return cls(
        f"{service}: {exc.message or exc.code.name}", reason=reason, field=field, metadata=metadata
    )


@contextlib.asynccontextmanager
async def via(service: str, prefix: str = "") -> AsyncIterator[None]:
    try:
        yield
    except errors.ClientError as exc:
        raise downstream_error(exc, service, prefix) from None


def _enum(value: int, known: Any, field: str) -> int:
    if value not in known.values():
        raise domain.InvalidArgument(
            f"{field} has no value {value}", field=field, reason="UNKNOWN_ENUM_VALUE"
        )
    return value


def _duration(message: Any, name: str, field: str, *, hi: float) -> float | None:
    if not message.HasField(name):
        return None
    return require_duration(getattr(message, name), field, lo=0.001, hi=hi)


def _args(args: Any, field: str) -> list[str]:
    values = list(args)
    if len(values) > MAX_ARGS:
        raise domain.InvalidArgument(
            f"{field} has {len(values)} values; at most {MAX_ARGS} allowed",
            field=field,
            reason="TOO_MANY_VALUES",
        )
    return values


class Runner:
    def __init__(
        self,
        *,
        orchestrator_id: str,
        identity: Identity,
        bus: EventBus,
        bridge: Bridge,
        broker: BrokerClient,
        consensus: ConsensusClient,
        trust: TrustClient,
        market: MarketClient,
        swarm: SwarmClient,
        stigmergy: StigmergyClient,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.orchestrator_id = orchestrator_id
        self.identity = identity
        self.bus = bus
        self.bridge = bridge
        self.broker = broker
        self.consensus = consensus
        self.trust = trust
        self.market = market
        self.swarm = swarm
        self.stigmergy = stigmergy
        self.call_timeout_s = call_timeout_s

    # --- validation (no I/O) -----------------------------------------------------------

    def validate(self, kind: Kind, op: Any, timeout_s: float) -> None:
        """Bad input names its field (``<kind>.<field>``) before anything runs."""
        if kind is Kind.EXECUTE:
            require_capability(op.capability, "execute.capability")
            _args(op.args, "execute.args")
            _enum(op.strategy, broker_pb2.Strategy, "execute.strategy")
            optional_id(op.session_id, "execute.session_id")
            optional_id(op.agent_id, "execute.agent_id")
        elif kind is Kind.EXECUTE_WITH_CONSENSUS:
            p = "execute_with_consensus"
            require_capability(op.capability, f"{p}.capability")
            _args(op.args, f"{p}.args")
            _enum(op.strategy, broker_pb2.Strategy, f"{p}.strategy")
            _enum(op.consensus_strategy, consensus_pb2.Strategy, f"{p}.consensus_strategy")
            optional_id(op.session_id, f"{p}.session_id")
            optional_id(op.coordinator_id, f"{p}.coordinator_id")
            require_text(
                op.operation, f"{p}.operation", max_len=MAX_OPERATION_LEN, allow_empty=True
            )
            for i, voter in enumerate(op.voter_ids):
                require_id(voter, f"{p}.voter_ids[{i}]")
            if op.electorate_capability:
                require_capability(op.electorate_capability, f"{p}.electorate_capability")
            period = _duration(op, "voting_period", f"{p}.voting_period", hi=timeout_s)
            if period is not None and period >= timeout_s:
                raise domain.InvalidArgument(
                    f"{p}.voting_period must be shorter than the operation's timeout ({timeout_s:g}s)",
                    field=f"{p}.voting_period",
                    reason="OUT_OF_RANGE",
                )
        elif kind is Kind.COLLECTIVE_DECISION:
            p = "collective_decision"
            require_text(op.topic, f"{p}.topic", max_len=MAX_TOPIC_LEN)
            _enum(op.threshold, swarm_pb2.Threshold, f"{p}.threshold")
            if not op.HasField("duration"):
                raise domain.InvalidArgument(
                    f"{p}.duration is required (how long the pool takes votes)",
                    field=f"{p}.duration",
                    reason="EMPTY_FIELD",
                )
            duration = require_duration(op.duration, f"{p}.duration", lo=0.001, hi=timeout_s)
            if duration >= timeout_s:
                raise domain.InvalidArgument(
                    f"{p}.duration must be shorter than the operation's timeout ({timeout_s:g}s)",
                    field=f"{p}.duration",
                    reason="OUT_OF_RANGE",
                )
            if op.min_votes < 0:
                raise domain.InvalidArgument(
                    f"{p}.min_votes must not be negative",
                    field=f"{p}.min_votes",
                    reason="OUT_OF_RANGE",
                )
        elif kind is Kind.ALLOCATE:
            p = "allocate"
            requirements = require_capabilities(list(op.requirements), f"{p}.requirements")
            if op.capability:
                require_capability(op.capability, f"{p}.capability")
                if op.capability not in requirements:
                    raise domain.InvalidArgument(
                        f"{p}.capability must be one of the requirements",
                        field=f"{p}.capability",
                        reason="CAPABILITY_NOT_REQUIRED",
                    )
            elif len(requirements) > 1:
                raise domain.InvalidArgument(
                    f"{p}.capability is required with more than one requirement (which runs it?)",
                    field=f"{p}.capability",
                    reason="EMPTY_FIELD",
                )
            optional_id(op.task_id, f"{p}.task_id")
            _args(op.args, f"{p}.args")
            require_int_range(op.priority, f"{p}.priority", 0, 100)
            require_finite(op.reward, f"{p}.reward", lo=0.0)
            require_int_range(op.max_attempts, f"{p}.max_attempts", 0, 100)
            _enum(op.scoring, market_pb2.Scoring, f"{p}.scoring")
            window = _duration(op, "bidding_window", f"{p}.bidding_window", hi=timeout_s)
            if window is not None and window >= timeout_s - 1.0:
                raise domain.InvalidArgument(
                    f"{p}.bidding_window must end well before the operation's timeout "
                    f"({timeout_s:g}s)",
                    field=f"{p}.bidding_window",
                    reason="OUT_OF_RANGE",
                )
        elif kind is Kind.SIGNAL:
            if not op.HasField("deposit"):
                raise domain.InvalidArgument(
                    "signal.deposit is required: a deposit signed by the depositing agent",
                    field="signal.deposit",
                    reason="EMPTY_FIELD",
                )
            require_id(op.deposit.agent_id, "signal.deposit.agent_id")
            require_text(op.deposit.pheromone_type, "signal.deposit.pheromone_type", max_len=64)
            for name in ("x", "y", "amount"):
                require_finite(getattr(op.deposit, name), f"signal.deposit.{name}")
            if not op.deposit.signature:
                raise domain.InvalidArgument(
                    "signal.deposit.signature is required: the agent signs its deposit",
                    field="signal.deposit.signature",
                    reason="EMPTY_FIELD",
                )

    # --- running ----------------------------------------------------------------------------

    async def run(self, kind: Kind, op: Any, request_id: str, timeout_s: float) -> pb.Operation:
        """Carries out one validated operation; the result has its kind,
        tier, status, message, services and result set."""
        deadline = Deadline(timeout_s)
        route = ROUTES[kind]
        result = pb.Operation(
            request_id=request_id, kind=int(kind), tier=int(route.tier), services=route.services
        )
        try:
            async with asyncio.timeout(max(deadline.left(), 0.01)):
                if kind is Kind.EXECUTE:
                    await self._execute(op, request_id, deadline, result)
                elif kind is Kind.EXECUTE_WITH_CONSENSUS:
                    await self._with_consensus(op, request_id, deadline, result)
                elif kind is Kind.COLLECTIVE_DECISION:
                    await self._collective(op, request_id, deadline, result)
                elif kind is Kind.ALLOCATE:
                    await self._allocate(op, request_id, deadline, result)
                else:
                    await self._signal(op, result)
        except TimeoutError:
            raise domain.DeadlineExceeded(
                f"{kind.name.lower()} did not finish within its timeout of {timeout_s:g}s; "
                "retry with the same request_id to pick it up",
                reason="OPERATION_TIMEOUT",
                metadata={"request_id": request_id},
            ) from None
        return result

    async def _execute(self, op: Any, rid: str, dl: Deadline, out: pb.Operation) -> None:
        async with via("broker", "execute"):
            response = await self.broker.execute(
                op.capability,
                list(op.args),
                session_id=op.session_id,
                strategy=BROKER_STRATEGIES.get(op.strategy, "best_fit"),
                request_id=f"{rid}.exec",
                deadline_s=dl.budget(),
                agent_id=op.agent_id,
                timeout_s=dl.budget() + RESERVE_S / 2,
            )
        r = response.receipt
        out.execute.CopyFrom(pb.ExecuteResult(receipt=r, output=response.output))
        out.status = Status.SUCCEEDED if r.success else Status.FAILED
        out.message = _receipt_text(r)

    async def _with_consensus(self, op: Any, rid: str, dl: Deadline, out: pb.Operation) -> None:
        p = "execute_with_consensus"
        coordinator = op.coordinator_id or self.orchestrator_id
        period = (
            from_duration(op.voting_period)
            if op.HasField("voting_period")
            else min(10.0, dl.seconds / 3)
        )
        voters = list(op.voter_ids)
        async with via("consensus", p):
            proposed = await self.consensus.propose(
                op.operation or op.capability,
                proposer_id=coordinator,
                strategy=CONSENSUS_STRATEGIES.get(op.consensus_strategy, "byzantine"),
                voter_ids=voters,
                capability="" if voters else (op.electorate_capability or op.capability),
                voting_period_s=period,
                request_id=f"{rid}.propose",
                timeout_s=dl.budget(self.call_timeout_s),
            )
            proposal_id = proposed.proposal.proposal_id
            try:
                proposal = await self.consensus.wait_decided(proposal_id, timeout_s=dl.budget())
            except TimeoutError:
                raise domain.DeadlineExceeded(
                    f"consensus did not decide {proposal_id} within the operation's timeout",
                    reason="CONSENSUS_UNDECIDED",
                    metadata={"service": "consensus", "proposal_id": proposal_id},
                ) from None
        result = out.execute_with_consensus
        result.proposal.CopyFrom(proposal)
        tally = proposal.tally
        counts = (
            f"{tally.approvals} approve, {tally.rejections} reject of {tally.electorate_size}, "
            f"quorum {tally.quorum}"
        )
        if proposal.status == consensus_pb2.PROPOSAL_STATUS_REJECTED:
            out.status = Status.REJECTED
            out.message = f"consensus rejected {proposal.operation} ({counts}); nothing executed"
            return
        if proposal.status != consensus_pb2.PROPOSAL_STATUS_APPROVED:
            out.status = Status.EXPIRED
            out.message = f"voting on {proposal.operation} expired ({counts}); nothing executed"
            return
        async with via("broker", p):
            response = await self.broker.execute(
                op.capability,
                list(op.args),
                session_id=op.session_id,
                strategy=BROKER_STRATEGIES.get(op.strategy, "best_fit"),
                request_id=f"{rid}.exec",
                deadline_s=dl.budget(),
                timeout_s=dl.budget() + RESERVE_S / 2,
            )
        r = response.receipt
        result.receipt.CopyFrom(r)
        result.output = response.output
        out.status = Status.SUCCEEDED if r.success else Status.FAILED
        out.message = f"approved ({counts}); {_receipt_text(r)}"
        # The coordinator's own observation of the outcome, as the guide does
        # after execute_distributed (the broker reports its receipt too);
        # not for arguments the agent refused, which are not its fault.
        if _refused_arguments(r):
            result.observation_error = "not observed: the agent refused the arguments"
            return
        try:
            async with asyncio.timeout(dl.budget(self.call_timeout_s)):
                await self.trust.observe(
                    coordinator,
                    r.agent_id,
                    _outcome(r),
                    capability=op.capability,
                    request_id=f"{rid}.observe",
                    identity=self.identity if coordinator == self.orchestrator_id else None,
                    timeout_s=dl.budget(self.call_timeout_s),
                )
                result.coordinator_trust.CopyFrom(await self.trust.score(coordinator, r.agent_id))
        except (errors.ClientError, TimeoutError) as exc:
            result.observation_error = str(exc) or "trust did not answer in time"
            log.warning("coordinator observation of %s not recorded: %s", r.agent_id, exc)

    async def _collective(self, op: Any, rid: str, dl: Deadline, out: pb.Operation) -> None:
        p = "collective_decision"
        async with via("swarm", p):
            pool = await self.swarm.create_pool(
                op.topic,
                threshold=THRESHOLD_NAMES.get(op.threshold, "simple"),
                duration_s=from_duration(op.duration),
                min_votes=op.min_votes,
                request_id=f"{rid}.pool",
            )
            if op.adopt:
                await self.bridge.track_pool(pool.pool_id, adopt=True)
            while not pool.closed and not (
                op.settle_early and pool.status == swarm_pb2.POOL_STATUS_DECIDED
            ):
                await asyncio.sleep(POLL_S)
                pool = await self.swarm.get_pool(pool.pool_id)
            result = out.collective_decision
            if op.adopt and pool.status == swarm_pb2.POOL_STATUS_DECIDED:
                adopted = await self.bridge.adopt(pool)
                if adopted is not None:
                    result.adopted.CopyFrom(adopted.decision)
                    result.hive_generation = adopted.generation
        result.pool.CopyFrom(pool)
        share = f"confidence {pool.confidence:.3f}, {pool.vote_count} votes"
        if pool.status == swarm_pb2.POOL_STATUS_DECIDED:
            out.status = Status.SUCCEEDED
            out.message = f"{pool.topic}: {pool.decision} ({share})" + (
                f"; the hive adopted it at generation {result.hive_generation}"
                if result.hive_generation
                else ""
            )
        else:
            out.status = Status.NO_CONSENSUS
            out.message = f"{pool.topic}: no consensus ({share})"

    async def _allocate(self, op: Any, rid: str, dl: Deadline, out: pb.Operation) -> None:
        p = "allocate"
        requirements = list(op.requirements)
        capability = op.capability or requirements[0]
        window = from_duration(op.bidding_window) if op.HasField("bidding_window") else 1.0
        async with via("market", p):
            listed = await self.market.list_task(
                op.task_type or capability.replace(".", "_"),
                requirements,
                task_id=op.task_id or f"alloc-{rid}",
                capability=capability,
                args=list(op.args),
                priority=op.priority,
                reward=op.reward,
                # Closed before the operation's own time is up, so its end is seen.
                deadline=time.time() + max(dl.left() - 1.0, window + 0.1),
                bidding_window_s=window,
                max_attempts=op.max_attempts,
                scoring="trust" if op.scoring == market_pb2.SCORING_TRUST_ADJUSTED else "plain",
                request_id=f"{rid}.list",
                dispatch="broker",
                timeout_s=dl.budget(self.call_timeout_s),
            )
            task = listed.task
            while task.state not in (
                market_pb2.TASK_STATE_COMPLETED,
                market_pb2.TASK_STATE_FAILED,
                market_pb2.TASK_STATE_EXPIRED,
            ):
                await asyncio.sleep(POLL_S)
                task = await self.market.get_task(task.task_id)
        result = out.allocate
        result.task.CopyFrom(task)
        settled = None
        if task.assignments:
            with contextlib.suppress(errors.ClientError):
                settled = await self.bridge.find_settlement(task.task_id, task.attempt)
        if settled is not None:
            result.receipt.CopyFrom(settled.receipt)
            result.output = settled.output
        if task.state == market_pb2.TASK_STATE_COMPLETED:
            out.status = Status.SUCCEEDED
            out.message = (
                f"{task.task_id} won by {task.assigned_agent_id} (score "
                f"{task.winning_bid.score:.4f}), run through the broker, completed"
            )
        elif task.state == market_pb2.TASK_STATE_FAILED:
            out.status = Status.FAILED
            out.message = f"{task.task_id} failed after {task.attempt} attempt(s): {task.error}"
        else:
            out.status = Status.EXPIRED
            out.message = f"{task.task_id} expired before it was done"

    async def _signal(self, op: Any, out: pb.Operation) -> None:
        d = op.deposit
        async with via("stigmergy", "signal.deposit"):
            response = await self.stigmergy.send_deposit(d, timeout_s=self.call_timeout_s)
        out.signal.CopyFrom(pb.SignalResult(deposit=response))
        out.status = Status.SUCCEEDED
        out.message = (
            f"{d.agent_id} marked ({d.x:g}, {d.y:g}) with {d.pheromone_type}: "
            f"intensity {response.intensity:.3g}" + (" (duplicate)" if response.duplicate else "")
        )
        if not response.duplicate:
            await self.bus.publish_one(
                Draft(
                    "stigmergy.signal",
                    "orchestrator",
                    d.agent_id,
                    {
                        "pheromone_type": d.pheromone_type,
                        "x": f"{d.x:g}",
                        "y": f"{d.y:g}",
                        "amount": f"{d.amount:g}",
                        "intensity": f"{response.intensity:.4g}",
                    },
                    out.message,
                )
            )


def _receipt_text(r: broker_pb2.ExecutionReceipt) -> str:
    if r.success:
        return f"{r.agent_id} ran {r.capability} in {r.duration_ms:.1f} ms"
    return f"{r.capability} failed on {r.agent_id}: {r.error}"


def _refused_arguments(r: broker_pb2.ExecutionReceipt) -> bool:
    return bool(r.attempt_log) and r.attempt_log[-1].result == "INVALID_ARGUMENT"


def _outcome(r: broker_pb2.ExecutionReceipt) -> Any:
    if r.success:
        return outcome("success", duration_ms=max(r.duration_ms, 0.0))
    last = r.attempt_log[-1].result if r.attempt_log else ""
    if last == "DEADLINE_EXCEEDED":
        return outcome("timeout")
    return outcome("complete_failure")


__all__ = ["Deadline", "Runner", "downstream_error"]
