"""The identity a CLI command signs with: an agent's own key file.

Deposits, votes and hive writes are signed by a registered agent. The CLI acts
as one: ``--agent ID`` loads ``<state dir>/agents/ID/agent.key`` (where the
local cluster and a default agent keep it), or ``--key-file PATH``.
"""

from __future__ import annotations

import os

from clients.cli.common import fail, state_dir
from services.common.crypto import Identity


def load_identity(agent_id: str, key_file: str | None) -> Identity:
    path = key_file or os.path.join(state_dir(), "agents", agent_id, "agent.key")
    if not os.path.isfile(path):
        fail(
            f"no key for agent {agent_id!r} at {path}; pass --key-file, or run the command "
            "where that agent's key lives (AGENT2028_STATE_DIR)"
        )
    try:
        with open(path, encoding="ascii") as fh:
            seed = bytes.fromhex(fh.read().strip())
        if len(seed) != 32:
            raise ValueError("expected a 32-byte hex seed")
    except (OSError, ValueError) as exc:
        fail(f"cannot read the key in {path}: {exc}")
    return Identity.from_seed(agent_id, seed)
