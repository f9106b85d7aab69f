"""What must hold in the testnet whatever was done to it, checked against
Docker's view of the containers (the reality) while a perturbation lasts and
after it heals.

An invariant may record what must survive before the perturbation
(``before``: e.g. acknowledged receipts, votes or tasks) and then, in
``check``, polls until it holds within its bound, returning a note for the
test's output, or None when it does not apply in that state (e.g. the
registry itself is down). Adding one is a class here and a line in
INVARIANTS; every perturbation of the manifest then checks it. The services
bring theirs: no acknowledged vote (ConsensusDecides), receipt (ReceiptsKept)
or task (TasksKept) lost, and decisions still reached with f faulty of n.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import docker.errors

from clients.errors import ClientError
from clients.health import check as health_check
from clients.registry import RegistryClient
from tests.compose.testnet import Testnet
from tests.support import eventually

PASSING = 1
PERTURBED = "perturbed"
HEALED = "healed"


async def holds_within(
    net: Testnet, check: Callable[[], Awaitable[None]], *, within_s: float, what: str
) -> float:
    """Polls ``check`` (which raises AssertionError, or a client or Docker
    error, while the invariant does not hold yet) until it passes; returns the
    seconds it took. On the deadline it fails with the last reason and the
    containers' log tails."""
    began = time.monotonic()

    async def passes() -> bool:
        try:
            await check()
        except (ClientError, docker.errors.APIError, TimeoutError) as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}") from None
        return True

    try:
        await eventually(passes, timeout_s=within_s, interval_s=0.25, what=what)
    except AssertionError as exc:
        raise AssertionError(
            f"{what} did not hold within {within_s:.0f}s: {exc}\n{net.logs()}"
        ) from None
    return time.monotonic() - began


class Invariant:
    name = ""

    async def before(self, net: Testnet) -> None:
        """Records what must survive the perturbation that follows."""

    async def check(self, net: Testnet, phase: str) -> str | None:
        raise NotImplementedError


class ServicesServing(Invariant):
    """Every service whose container is up answers SERVING on grpc.health.v1
    inside the cluster network and, when published, from outside; once
    healed, Docker's own health check (the same protocol) says healthy."""

    name = "services serving"

    async def check(self, net: Testnet, phase: str) -> str | None:
        checked = []
        for service in net.manifest.services:
            container = net.service_container(service.name)
            if not net.is_up(container):
                continue

            async def serving(service=service, container=container) -> None:  # type: ignore[no-untyped-def]
                inside = f"{service.name}:{service.port}"
                status = net.probe(net.prober(), "health", inside)[inside]
                assert status == "SERVING", f"{inside} is {status} inside the network"
                if service.published:
                    outside = net.published(service.name, service.port)
                    status = await health_check(outside, timeout_s=3.0)
                    assert status == "SERVING", f"{outside} is {status} from outside"
                if phase == HEALED:
                    container.reload()
                    docker_health = container.attrs["State"].get("Health", {}).get("Status")
                    assert docker_health == "healthy", (
                        f"Docker says {service.name} is {docker_health}"
                    )

            took = await holds_within(
                net, serving, within_s=90, what=f"{service.name} serving ({phase})"
            )
            checked.append(f"{service.name} {took:.1f}s")
        return ", ".join(checked) or None


class ConsensusDecides(Invariant):
    """Active once the manifest runs consensus. Decided proposals stay decided
    with the same verifying quorum certificate whatever is restarted or killed
    (no acknowledged vote lost: votes are durable in the service's volume),
    and a new proposal to every agent the registry knows is still decided,
    approved, while up to f = (n-1)//3 of those n agents are out. It runs
    before the registry check so that, while a perturbation lasts, the agent
    that is out is usually still known (critical) and counts among the n."""

    name = "consensus decides"

    def __init__(self) -> None:
        self.decided: dict[str, tuple[int, list[str]]] = {}
        self._rounds = 0

    @staticmethod
    def active(net: Testnet) -> bool:
        return any(s.name == "consensus" for s in net.manifest.services)

    def reachable(self, net: Testnet) -> bool:
        return self.active(net) and all(
            net.is_up(net.service_container(name)) for name in ("registry", "consensus")
        )

    async def before(self, net: Testnet) -> None:
        if self.reachable(net):
            await self._decide(net, "before")

    async def check(self, net: Testnet, phase: str) -> str | None:
        if not self.reachable(net):
            return None
        from clients.consensus import ConsensusClient, certificate_problems

        address = net.published("consensus", net.manifest.service("consensus").port)

        async def kept() -> None:
            async with ConsensusClient(address) as client:
                for proposal_id, (status, voters) in self.decided.items():
                    proposal = await client.get_proposal(proposal_id)
                    assert proposal.status == status, f"{proposal_id} is now {proposal.status}"
                    assert sorted(v.voter_id for v in proposal.certificate.votes) == voters, (
                        f"{proposal_id}'s certificate changed"
                    )
                    assert not certificate_problems(proposal), certificate_problems(proposal)

        await holds_within(net, kept, within_s=60, what=f"decided proposals kept ({phase})")
        return f"{len(self.decided)} kept; {await self._decide(net, phase)}"

    async def _decide(self, net: Testnet, phase: str) -> str:
        # Imported here: the generated consensus code exists only where the
        # service does, and this invariant is inert without it.
        from agent2028.consensus.v1 import consensus_pb2
        from clients.consensus import ConsensusClient, certificate_problems

        self._rounds += 1
        operation = f"compose-{phase}-{self._rounds}"
        address = net.published("consensus", net.manifest.service("consensus").port)
        outcome: dict[str, str] = {}

        async def decided() -> None:
            async with RegistryClient(net.registry_address) as registry:
                known = sorted([a.card.agent_id async for a in registry.iter_agents()])
            up = {net.agent_id(c) for c in net.agents() if net.is_up(c)}
            voters = [v for v in known if v.startswith("agent-")]
            out = [v for v in voters if v not in up]
            f = (len(voters) - 1) // 3
            assert len(out) <= f, f"{len(out)} of {len(voters)} voters are out, more than f={f}"
            async with ConsensusClient(address) as client:
                # A fresh proposal per attempt: a voter deregistered between
                # the two reads makes the proposal fail (NOT_FOUND), not hang.
                response = await client.propose(
                    f"{operation}-{secrets.token_hex(3)}",
                    proposer_id="compose-tests",
                    voter_ids=voters,
                    voting_period_s=60,
                )
                proposal_id = response.proposal.proposal_id
                proposal = await client.wait_decided(proposal_id, timeout_s=60)
            assert proposal.status == consensus_pb2.PROPOSAL_STATUS_APPROVED, proposal.status
            assert not certificate_problems(proposal), certificate_problems(proposal)
            self.decided[proposal_id] = (
                proposal.status,
                sorted(v.voter_id for v in proposal.certificate.votes),
            )
            outcome["note"] = f"decided with {len(out)} of n={len(voters)} out (f={f})"

        await holds_within(net, decided, within_s=120, what=f"a proposal decided ({phase})")
        return outcome["note"]


class ReceiptsKept(Invariant):
    """Active once the manifest runs the broker. Every receipt the broker
    acknowledged is still there, unchanged, with its broker and agent
    signatures verifying, whatever is restarted or killed (receipts are
    durable in the broker's volume); and a new command through the broker
    still succeeds whenever the broker and the registry are up."""

    name = "receipts kept"

    def __init__(self) -> None:
        self.receipts: dict[str, bytes] = {}
        self._rounds = 0

    @staticmethod
    def active(net: Testnet) -> bool:
        return any(s.name == "broker" for s in net.manifest.services)

    async def before(self, net: Testnet) -> None:
        if self.active(net) and self._up(net, "broker", "registry"):
            await self._execute(net, "before")

    @staticmethod
    def _up(net: Testnet, *services: str) -> bool:
        return all(net.is_up(net.service_container(name)) for name in services)

    async def check(self, net: Testnet, phase: str) -> str | None:
        if not (self.active(net) and self._up(net, "broker")):
            return None
        from clients.broker import BrokerClient, verify_agent_signature, verify_broker_signature

        address = net.published("broker", net.manifest.service("broker").port)

        async def kept() -> None:
            async with BrokerClient(address) as client:
                key = (await client.identity()).public_key
                for command_id, acknowledged in self.receipts.items():
                    receipt = (await client.get_receipt(command_id)).receipt
                    assert receipt.SerializeToString(deterministic=True) == acknowledged, (
                        f"receipt {command_id} changed"
                    )
                    assert verify_broker_signature(receipt, key), command_id
                    assert verify_agent_signature(receipt), command_id

        await holds_within(net, kept, within_s=60, what=f"acknowledged receipts kept ({phase})")
        note = f"{len(self.receipts)} kept"
        if self._up(net, "registry"):
            note += f"; {await self._execute(net, phase)}"
        return note

    async def _execute(self, net: Testnet, phase: str) -> str:
        from clients.broker import BrokerClient

        self._rounds += 1
        request_id = f"compose-{phase}-{self._rounds}-{secrets.token_hex(3)}"
        address = net.published("broker", net.manifest.service("broker").port)
        outcome: dict[str, str] = {}

        async def executed() -> None:
            async with BrokerClient(address) as client:
                # One request id for every attempt: a retry after an
                # unacknowledged try returns the first receipt, runs nothing.
                response = await client.execute(
                    "compute", ["primes", "1000"], session_id="compose-tests", request_id=request_id
                )
            receipt = response.receipt
            assert receipt.success, f"{receipt.agent_id}: {receipt.error}"
            assert json.loads(response.output)["primes"] == 168, response.output
            self.receipts[receipt.command_id] = receipt.SerializeToString(deterministic=True)
            outcome["note"] = f"executed on {receipt.agent_id} in {receipt.attempts} attempt(s)"

        await holds_within(
            net, executed, within_s=90, what=f"a command through the broker ({phase})"
        )
        return outcome["note"]


class TasksKept(Invariant):
    """Active once the manifest runs the market. Every task the market
    acknowledged and the agents completed stays completed, with the same
    winner, winning bid and output, whatever is restarted or killed (tasks,
    bids and assignments are durable in the market's volume); and a task
    listed now is still bid for by the agent containers, auctioned when its
    window closes, run by its winner and completed, whenever the market and
    the registry are up."""

    name = "tasks kept"

    def __init__(self) -> None:
        self.tasks: dict[str, tuple[Any, ...]] = {}
        self._rounds = 0

    @staticmethod
    def active(net: Testnet) -> bool:
        return any(s.name == "market" for s in net.manifest.services)

    @staticmethod
    def _up(net: Testnet, *services: str) -> bool:
        return all(net.is_up(net.service_container(name)) for name in services)

    async def before(self, net: Testnet) -> None:
        if self.active(net) and self._up(net, "market", "registry"):
            await self._complete_one(net, "before")

    async def check(self, net: Testnet, phase: str) -> str | None:
        if not (self.active(net) and self._up(net, "market")):
            return None
        from clients.market import MarketClient

        address = net.published("market", net.manifest.service("market").port)

        async def kept() -> None:
            async with MarketClient(address) as client:
                for task_id, acknowledged in self.tasks.items():
                    now = await self._summary(client, task_id)
                    assert now == acknowledged, f"task {task_id} was {acknowledged}, is now {now}"

        await holds_within(net, kept, within_s=60, what=f"completed tasks kept ({phase})")
        note = f"{len(self.tasks)} kept"
        if self._up(net, "registry"):
            note += f"; {await self._complete_one(net, phase)}"
        return note

    @staticmethod
    async def _summary(client, task_id: str) -> tuple[Any, ...]:  # type: ignore[no-untyped-def]
        """What must not change once acknowledged: state, winner, winning
        bid, output, and every bid of the attempt (read back from storage)."""
        from clients.market import STATE_NAMES

        task = await client.get_task(task_id)
        bids = (await client.list_bids(task_id, attempt=task.attempt)).bids
        return (
            STATE_NAMES.get(task.state, str(task.state)),
            task.assigned_agent_id,
            task.winning_bid.price,
            task.output,
            tuple(sorted((b.agent_id, b.price, b.confidence) for b in bids)),
        )

    async def _complete_one(self, net: Testnet, phase: str) -> str:
        from agent2028.market.v1 import market_pb2
        from clients.market import MarketClient

        self._rounds += 1
        task_id = f"compose-{phase}-{self._rounds}-{secrets.token_hex(3)}"
        address = net.published("market", net.manifest.service("market").port)
        outcome: dict[str, str] = {}

        async def completed() -> None:
            async with MarketClient(address) as client:
                # One request id for every attempt: a retried listing is
                # acknowledged once and lists one task.
                await client.list_task(
                    "compose.primes",
                    ["compute"],
                    task_id=task_id,
                    capability="compute",
                    args=["primes", "1000"],
                    bidding_window_s=1.0,
                    max_attempts=3,
                    request_id=task_id,
                )
                task = await client.get_task(task_id)
                assert task.state == market_pb2.TASK_STATE_COMPLETED, (
                    f"{task_id} is {market_pb2.TaskState.Name(task.state)}"
                )
                assert json.loads(task.output)["primes"] == 168, task.output
                summary = await self._summary(client, task_id)
            bidders = summary[-1]
            assert task.assigned_agent_id in {agent for agent, _, _ in bidders}, summary
            self.tasks[task_id] = summary
            outcome["note"] = (
                f"won by {task.assigned_agent_id} of {len(bidders)} bidders and completed"
            )

        await holds_within(net, completed, within_s=90, what=f"a task completed ({phase})")
        return outcome["note"]


class RegistryReflectsReality(Invariant):
    """Within TTL + grace (plus room for a loaded machine) the registry lists
    exactly the agent containers that are up, each once, passing, at the
    address it advertises (agent-<hostname> at <hostname>:<port>); a container
    that is killed, paused, stopped or cut off is gone from it."""

    name = "registry reflects reality"

    async def check(self, net: Testnet, phase: str) -> str | None:
        if not net.is_up(net.service_container("registry")):
            return None

        async def reflects() -> None:
            containers = net.agents()
            up = {net.agent_id(c): net.agent_address(c) for c in containers if net.is_up(c)}
            out = {net.agent_id(c) for c in containers} - set(up)
            assert len(up) + len(out) == len(containers), "two containers share an agent id"
            async with RegistryClient(net.registry_address) as client:
                listed = [a async for a in client.iter_agents()]
            by_id = {a.card.agent_id: a for a in listed}
            assert len(by_id) == len(listed), "an agent is listed twice"
            strangers = set(by_id) - set(up) - out
            assert not strangers, f"registered without a container: {sorted(strangers)}"
            for agent_id, address in up.items():
                agent = by_id.get(agent_id)
                assert agent is not None, f"{agent_id} is up but not registered"
                assert agent.status == PASSING, f"{agent_id} is up but status {agent.status}"
                assert agent.card.address == address, f"{agent_id} at {agent.card.address}"
            lingering = {i: by_id[i].status for i in out if i in by_id}
            assert not lingering, f"out of the cluster but still registered: {lingering}"

        took = await holds_within(
            net,
            reflects,
            within_s=net.timing.reflect_within_s,
            what=f"the registry reflecting the containers ({phase})",
        )
        return f"{took:.1f}s"


class AdvertisedAddressesAnswer(Invariant):
    """Agents answer at the addresses they advertise, from inside the cluster
    network (container hostnames resolve, agents listen): every agent
    container that is up, whatever happens to the registry, and every agent
    the registry lists as passing."""

    name = "advertised addresses answer"

    async def check(self, net: Testnet, phase: str) -> str | None:
        async def answer() -> None:
            addresses = {net.agent_address(c) for c in net.agents() if net.is_up(c)}
            assert addresses, "no agent container is up"
            if net.is_up(net.service_container("registry")):
                async with RegistryClient(net.registry_address) as client:
                    passing = [a async for a in client.iter_agents(statuses=["passing"])]
                addresses |= {a.card.address for a in passing}
            statuses = net.probe(net.prober(), "health", *sorted(addresses))
            bad = {a: s for a, s in statuses.items() if s != "SERVING"}
            assert not bad, f"advertised addresses not serving: {bad}"

        took = await holds_within(net, answer, within_s=60, what=f"agents answering ({phase})")
        return f"{took:.1f}s"


class AgentsExecute(Invariant):
    """Once healed, the cluster still does real work: the best compute agent,
    found through the registry, runs a command and signs a receipt that
    verifies against the key it registered."""

    name = "agents execute"

    async def check(self, net: Testnet, phase: str) -> str | None:
        if phase != HEALED:
            return None
        registry = f"registry:{net.manifest.service('registry').port}"

        async def executes() -> None:
            result = net.probe(net.prober(), "execute", registry, "compute", "primes", "10000")
            assert result.get("found"), f"no compute agent found: {result}"
            assert result["success"], result
            assert result["verified"], f"receipt does not verify: {result}"
            assert result["receipt_agent_id"] == result["agent_id"], result
            assert json.loads(result["output"])["primes"] == 1229, result

        took = await holds_within(net, executes, within_s=60, what="a command executing")
        return f"{took:.1f}s"


INVARIANTS: list[Invariant] = [
    ServicesServing(),
    ConsensusDecides(),
    ReceiptsKept(),
    TasksKept(),
    RegistryReflectsReality(),
    AdvertisedAddressesAnswer(),
    AgentsExecute(),
]


async def check_all(net: Testnet, phase: str) -> list[str]:
    """Checks every invariant; notes on how long each took to hold."""
    notes = []
    for invariant in INVARIANTS:
        note = await invariant.check(net, phase)
        if note is not None:
            notes.append(f"{invariant.name}: {note}")
    return notes
