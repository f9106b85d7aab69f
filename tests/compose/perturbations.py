"""What is done to a container of the testnet, in the style of CometBFT's e2e
perturbations: each one takes its target out of the cluster (``apply``) and
brings it back (``heal``). The manifest names them per target; the invariants
are checked while the target is out and after it is back.

- kill: SIGKILL, no chance to drain (a crash or kill -9); healed by a start.
- pause: frozen by the cgroup freezer (a hung process that holds its sockets).
- disconnect: cut from the cluster network (a partition); healed by
  reconnecting with the same aliases.
- restart: SIGTERM, which must drain and exit 0; then a start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import docker.errors
from docker.models.containers import Container

from tests.compose.testnet import Testnet

STOP_TIMEOUT_S = 30


def wait_status(container: Container, statuses: tuple[str, ...], timeout_s: float = 60) -> str:
    """Blocks until Docker reports one of ``statuses`` for the container."""
    deadline = time.monotonic() + timeout_s
    while True:
        container.reload()
        if container.status in statuses:
            return container.status
        if time.monotonic() > deadline:
            raise AssertionError(f"{container.name} is {container.status}, not {statuses}")
        time.sleep(0.1)


class Perturbation:
    name = ""

    def apply(self, net: Testnet, container: Container) -> None:
        raise NotImplementedError

    def heal(self, net: Testnet, container: Container) -> None:
        raise NotImplementedError


class Kill(Perturbation):
    name = "kill"

    def apply(self, net: Testnet, container: Container) -> None:
        container.kill()
        wait_status(container, ("exited",))
        # A killed container stays down: Docker does not apply the restart
        # policy to a container someone stopped on purpose.
        assert container.attrs["State"]["ExitCode"] == 137, container.attrs["State"]

    def heal(self, net: Testnet, container: Container) -> None:
        container.start()
        wait_status(container, ("running",))


class Pause(Perturbation):
    name = "pause"

    def apply(self, net: Testnet, container: Container) -> None:
        container.pause()
        wait_status(container, ("paused",))

    def heal(self, net: Testnet, container: Container) -> None:
        container.unpause()
        wait_status(container, ("running",))


@dataclass
class Disconnect(Perturbation):
    name = "disconnect"
    # The compose aliases (the service name, the container name) to restore;
    # Docker adds the short container id, which is the hostname, by itself.
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def apply(self, net: Testnet, container: Container) -> None:
        container.reload()
        endpoint = container.attrs["NetworkSettings"]["Networks"][net.network]
        short_id = container.id[:12]
        self.aliases[container.id] = [a for a in endpoint.get("Aliases") or [] if a != short_id]
        net.docker.networks.get(net.network).disconnect(container)

    def heal(self, net: Testnet, container: Container) -> None:
        try:
            net.docker.networks.get(net.network).connect(
                container, aliases=self.aliases.pop(container.id, None)
            )
        except docker.errors.APIError as exc:
            if "already exists" not in str(exc):
                raise


class Restart(Perturbation):
    name = "restart"

    def apply(self, net: Testnet, container: Container) -> None:
        container.stop(timeout=STOP_TIMEOUT_S)
        wait_status(container, ("exited",))
        state = container.attrs["State"]
        # SIGTERM drains: NOT_SERVING, in-flight calls finish, exit 0.
        assert state["ExitCode"] == 0, f"{container.name} exited {state['ExitCode']} on SIGTERM"
        assert not state["OOMKilled"], f"{container.name} was killed for memory"

    def heal(self, net: Testnet, container: Container) -> None:
        container.start()
        wait_status(container, ("running",))


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p for p in (Kill(), Pause(), Disconnect(), Restart())
}
