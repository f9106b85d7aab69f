"""The compose testnet: the cluster of docker-compose.yml in containers, as
tests/compose/manifest.toml describes it, with what perturbations and
invariants need to see and touch it.

testcontainers' DockerCompose brings it up (``docker compose up --wait``) under
a project name of its own, so concurrent runs never meet, with every port
published on an ephemeral host port; ``stop`` removes every container,
network and volume it made. The Docker SDK does the rest: finding containers
by their compose labels, pausing, disconnecting, killing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container
from testcontainers.compose import DockerCompose

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = Path(__file__).with_name("manifest.toml")
PROBES = Path(__file__).with_name("probes.py")
# docker-compose.yml publishes only the orchestrator; the tests reach every
# service from the host, as `-f deploy/compose.publish-all.yml` lets a user.
COMPOSE_FILES = [
    "docker-compose.yml",
    "deploy/compose.publish-all.yml",
    "deploy/compose.test.yml",
]
PROJECT_PREFIX = "agent2028-test-"
NETWORK = "cluster"
IMAGE = os.environ.get("AGENT2028_IMAGE", "agent2028:latest")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


@dataclass(frozen=True)
class ServiceNode:
    name: str
    port: int
    metrics_port: int
    published: bool
    perturb: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    agents: int
    scale_to: int
    agent_port: int
    agent_perturb: tuple[str, ...]
    services: tuple[ServiceNode, ...]

    @classmethod
    def load(cls, path: Path = MANIFEST) -> Manifest:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        agents = data["agents"]
        return cls(
            agents=int(agents["count"]),
            scale_to=int(agents["scale_to"]),
            agent_port=int(agents["port"]),
            agent_perturb=tuple(agents["perturb"]),
            services=tuple(
                ServiceNode(
                    name=name,
                    port=int(spec["port"]),
                    metrics_port=int(spec["metrics_port"]),
                    published=bool(spec.get("published", False)),
                    perturb=tuple(spec.get("perturb", ())),
                )
                for name, spec in data["services"].items()
            ),
        )

    def service(self, name: str) -> ServiceNode:
        return next(s for s in self.services if s.name == name)

    def cases(self) -> list[tuple[str, str]]:
        """(target, perturbation) pairs: agents first, then each service."""
        pairs = [("agent", p) for p in self.agent_perturb]
        for service in self.services:
            pairs += [(service.name, p) for p in service.perturb]
        return pairs


@dataclass(frozen=True)
class Timing:
    """The registry's failure detection in the running cluster, and the bound
    within which the registry must reflect what happened to a container."""

    heartbeat_s: float
    lease_ttl_s: float
    deregister_after_s: float
    # Room for a loaded two-core machine: process start, reconnect backoff.
    slack_s: float = 25.0

    @property
    def reflect_within_s(self) -> float:
        return self.lease_ttl_s + self.deregister_after_s + 2 * self.heartbeat_s + self.slack_s


def docker_problem() -> str | None:
    """Why the compose tier cannot run here, or None."""
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: `docker info` failed ({exc})"
    if info.returncode != 0:
        return f"no Docker engine: `docker info` says {info.stderr.strip()[:300]}"
    compose = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if compose.returncode != 0:
        return "`docker compose` (v2) is missing: `make compose-plugin` installs it"
    image = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, text=True, timeout=30
    )
    if image.returncode != 0:
        return f"the image {IMAGE} is missing: `make image` builds it"
    return None


def remove_stale_projects() -> None:
    """Takes down test projects whose pytest process is gone (a run killed
    before its teardown), so their containers, networks and volumes do not
    pile up."""
    client = docker.from_env()
    try:
        projects = {
            c.labels.get(PROJECT_LABEL, "")
            for c in client.containers.list(all=True, filters={"label": PROJECT_LABEL})
        }
        projects |= {
            n.attrs.get("Labels", {}).get(PROJECT_LABEL, "")
            for n in client.networks.list(filters={"label": PROJECT_LABEL})
        }
        for project in sorted(p for p in projects if p.startswith(PROJECT_PREFIX)):
            pid = project[len(PROJECT_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            subprocess.run(
                ["docker", "compose", "-p", project, "down", "--volumes", "--remove-orphans"],
                cwd=ROOT,
                capture_output=True,
                timeout=120,
            )
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Compose reads its variables from the environment, where a value set by
    the caller wins over an env file; the testnet's own values must win."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Testnet:
    __test__ = False  # not a test class, whatever its name says

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.project = f"{PROJECT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.env = {
            "COMPOSE_PROJECT_NAME": self.project,
            "AGENT2028_IMAGE": IMAGE,
            "AGENT2028_AGENTS": str(manifest.agents),
            "AGENT2028_PUBLISH_HOST": "127.0.0.1",
        }
        for service in manifest.services:
            # Empty: an ephemeral host port, so runs on one machine never clash.
            self.env[f"{service.name.upper()}_PUBLISH_PORT"] = ""
            self.env[f"{service.name.upper()}_METRICS_PUBLISH_PORT"] = ""
        self.compose = DockerCompose(ROOT, compose_file_name=COMPOSE_FILES, wait=True)
        self.docker = docker.from_env()
        self._env_patch: contextlib.AbstractContextManager[None] | None = None
        self.timing = Timing(10.0, 10.0, 30.0)
        self.started_s = 0.0
        self._turn = 0

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._env_patch = patched_environ(self.env)
        self._env_patch.__enter__()
        began = time.monotonic()
        try:
            self.compose.start()
        except subprocess.CalledProcessError as exc:
            logs = self.logs()
            self.stop()
            stderr = (exc.stderr or b"").decode(errors="replace")[-3000:]
            raise AssertionError(
                f"docker compose up exited {exc.returncode}: {stderr}\n{logs}"
            ) from None
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        self.timing = self._timing()

    def stop(self) -> None:
        try:
            self.compose.stop(down=True)
        finally:
            self.docker.close()
            if self._env_patch is not None:
                self._env_patch.__exit__(None, None, None)
                self._env_patch = None

    def compose_command(self, *args: str, timeout_s: float = 300) -> str:
        """Runs ``docker compose <args>`` on this project; its stdout."""
        result = subprocess.run(
            [*self.compose.docker_compose_command(), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}"
            )
        return result.stdout

    def config(self) -> dict[str, Any]:
        return json.loads(self.compose_command("config", "--format", "json"))

    def _timing(self) -> Timing:
        env = self.config()["services"]["registry"].get("environment") or {}
        return Timing(
            heartbeat_s=float(env.get("REGISTRY_HEARTBEAT_INTERVAL_S", 2.0)),
            lease_ttl_s=float(env.get("REGISTRY_LEASE_TTL_S", 10.0)),
            deregister_after_s=float(env.get("REGISTRY_DEREGISTER_CRITICAL_AFTER_S", 30.0)),
        )

    # --- looking at it --------------------------------------------------------

    def containers(self, service: str) -> list[Container]:
        """The service's containers, running or not, by replica number."""
        found = self.docker.containers.list(
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]},
        )
        return sorted(found, key=lambda c: int(c.labels.get(NUMBER_LABEL, "0")))

    def agents(self) -> list[Container]:
        return self.containers("agent")

    def next_agent(self) -> Container:
        """The next agent container that is up, in turn, so each perturbation
        hits a different one."""
        up = [c for c in self.agents() if self.is_up(c)]
        assert up, "no agent container is up"
        self._turn += 1
        return up[self._turn % len(up)]

    def service_container(self, service: str) -> Container:
        found = self.containers(service)
        assert len(found) == 1, f"{service}: expected one container, found {len(found)}"
        return found[0]

    @property
    def network(self) -> str:
        return f"{self.project}_{NETWORK}"

    def is_up(self, container: Container) -> bool:
        """Running, not paused, and on the cluster network."""
        container.reload()
        state = container.attrs["State"]
        networks = container.attrs["NetworkSettings"]["Networks"] or {}
        return state["Status"] == "running" and not state["Paused"] and self.network in networks

    @staticmethod
    def hostname(container: Container) -> str:
        return container.attrs["Config"]["Hostname"]

    def agent_id(self, container: Container) -> str:
        """What clients.agent calls itself in this container: agent-<hostname>."""
        return f"agent-{self.hostname(container)}"

    def agent_address(self, container: Container) -> str:
        return f"{self.hostname(container)}:{self.manifest.agent_port}"

    def published(self, service: str, port: int) -> str:
        """host:port where the service's ``port`` is published now (an
        ephemeral host port may change when the container restarts)."""
        container = self.service_container(service)
        container.reload()
        bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp") or []
        assert bindings, f"{service}:{port} is not published"
        host = bindings[0]["HostIp"] or "127.0.0.1"
        return f"{'127.0.0.1' if host == '0.0.0.0' else host}:{bindings[0]['HostPort']}"

    @property
    def registry_address(self) -> str:
        return self.published("registry", self.manifest.service("registry").port)

    @property
    def orchestrator_address(self) -> str:
        return self.published("orchestrator", self.manifest.service("orchestrator").port)

    def probe(self, container: Container, *args: str, timeout_s: float = 60) -> Any:
        """Runs tests/compose/probes.py inside ``container`` (so it sees the
        cluster network as the services do) and returns its JSON answer."""
        result = subprocess.run(
            ["docker", "exec", "-i", container.id, "python", "-", *args],
            input=PROBES.read_bytes(),
            capture_output=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"probe {args} in {container.name} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )
        return json.loads(result.stdout)

    def prober(self) -> Container:
        """A container on the cluster network to run probes from."""
        for service in self.manifest.services:
            container = self.service_container(service.name)
            if self.is_up(container):
                return container
        for container in self.agents():
            if self.is_up(container):
                return container
        raise AssertionError("no container is up to probe from")

    def logs(self, tail: int = 30) -> str:
        """The last lines of every container's log, for a failure message."""
        parts = []
        for service in [s.name for s in self.manifest.services] + ["agent"]:
            for container in self.containers(service):
                try:
                    text = container.logs(tail=tail).decode(errors="replace")
                except docker.errors.APIError as exc:
                    text = str(exc)
                parts.append(f"--- {container.name} ({container.status})\n{text}")
        return "\n".join(parts)
