"""The consensus chapter: a critical operation submitted to the orchestrator
as ExecuteWithConsensus (the guide's 8.1 in one call). Real agent processes
vote, a silent and an equivocating one among them; once the quorum
certificate is in, the broker runs the command and trust hears of it."""

from __future__ import annotations

import contextlib
import os

from agent2028.consensus.v1 import consensus_pb2
from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from clients.consensus import (
    CHOICE_NAMES,
    STATUS_NAMES,
    ConsensusClient,
    certificate_problems,
    vote_verifies,
)
from clients.scenario.scene import Scene

JOINING = [
    ("agent-006", [], []),
    ("agent-007", [], []),
    ("agent-008", ["silent"], []),
    # Rejects first, then signs an approval too.
    ("agent-009", ["equivocate"], ["--vote-policy", "reject"]),
]
OPERATION = "deploy_production_v2.0"
# What the approved deployment runs: a real query on the chosen agent's database.
COMMAND = ["SELECT count(*) AS active_users FROM users WHERE active = 1"]


async def byzantine_consensus(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("A critical operation passes Byzantine consensus")
    n.say("Four more database.query agents join: two honest, agent-008 which is silent")
    n.say("(it never votes) and agent-009 which equivocates (signs a reject and an approve).")
    for agent_id, faults, args in JOINING:
        await scene.cluster.spawn_agent(
            agent_id, ["database.query"], faults=faults, extra_args=args, wait=False
        )
    for agent_id, _, _ in JOINING:
        ready = os.path.join(scene.cluster.state_dir, "run", f"{agent_id}.ready.json")
        await scene.wait_for(
            lambda ready=ready: os.path.exists(ready),
            timeout_s=20,
            what=f"{agent_id} registering",
        )
    assert scene.orchestrator is not None
    n.say(f"{OPERATION} is submitted to the orchestrator as one ExecuteWithConsensus: it proposes")
    n.say("the operation to every passing database.query agent (electorate and keys snapshotted")
    n.say("from the registry), waits for the quorum certificate, runs the command through the")
    n.say("broker on consensus, and records coordinator-001's own observation in trust.")
    since = scene.cursor
    response = await scene.orchestrator.execute_with_consensus(
        "database.query",
        COMMAND,
        operation=OPERATION,
        coordinator_id="coordinator-001",
        voting_period_s=15,
        session_id="make-run",
        timeout_s=40,
    )
    op = response.operation
    result = op.execute_with_consensus
    decided = result.proposal
    size = decided.tally.electorate_size
    n.say(
        f"{size} voters: {', '.join(v.voter_id for v in decided.electorate)}; "
        f"f = {(size - 1) // 3} faulty tolerated, quorum {decided.tally.quorum}"
    )
    if op.status != pb.OPERATION_STATUS_SUCCEEDED:
        raise AssertionError(f"expected the operation to succeed: {op.message}")
    # Let the stragglers' votes (and the equivocation) show too.
    with contextlib.suppress(TimeoutError):
        await scene.wait_for(
            lambda: bool(scene.of("consensus.equivocation", since=since)),
            timeout_s=5,
            what="the equivocation",
        )
    keys = {v.voter_id: v.public_key for v in decided.electorate}
    n.table(
        f"Quorum certificate of {decided.proposal_id[:8]}: {STATUS_NAMES[decided.status]}",
        ["voter", "choice", "signature", "verified"],
        [
            [
                v.voter_id,
                CHOICE_NAMES[v.choice],
                v.signature.hex()[:24] + "...",
                "yes" if vote_verifies(v, keys[v.voter_id]) else "NO",
            ]
            for v in decided.certificate.votes
        ],
    )
    problems = certificate_problems(decided)
    if problems:
        raise AssertionError("certificate problems: " + "; ".join(problems))
    n.ok(
        f"{OPERATION} approved; certificate verifies: "
        f"{len(decided.certificate.votes)} signatures checked against the snapshotted keys"
    )
    r = result.receipt
    n.ok(
        f"then, through the broker: {r.agent_id} ran it in {r.duration_ms:.1f} ms and answered "
        f"{result.output}; coordinator-001's trust in {r.agent_id} is now "
        f"{result.coordinator_trust.score:.3f}"
    )
    async with ConsensusClient(scene.cluster.address("consensus")) as consensus:
        final = await consensus.get_proposal(decided.proposal_id)
        voted = {v.voter_id for v in final.votes}
        silent = sorted(set(keys) - voted)
        n.say(
            f"never voted: {', '.join(silent) or 'nobody'}; excluded: "
            f"{', '.join(final.excluded_voter_ids) or 'nobody'}"
        )
        for evidence in (await consensus.list_evidence(proposal_id=decided.proposal_id)).evidence:
            n.ok(
                f"evidence {evidence.evidence_id[:11]}...: {evidence.voter_id} signed "
                f"{CHOICE_NAMES[evidence.first_vote.choice]} and "
                f"{CHOICE_NAMES[evidence.conflicting_vote.choice]}; both signed votes kept, "
                + (
                    "a CompleteFailure reported to trust"
                    if evidence.reported_to_trust
                    else "a CompleteFailure queued for trust"
                )
            )
    assert decided.status == consensus_pb2.PROPOSAL_STATUS_APPROVED
