"""What every CLI command shares: addresses, output, running coroutines and
turning client errors into a one-line message and exit status 1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import grpc
import uvloop
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape

from clients.base import ServiceClient
from clients.errors import ClientError
from clients.launcher import SERVICES, saved_address

T = TypeVar("T")

console = Console()
# soft_wrap: an error stays one line however narrow the terminal (or pipe).
err_console = Console(stderr=True, soft_wrap=True)

HEALTH_NAMES = {0: "unspecified", 1: "passing", 2: "warning", 3: "critical"}
HEALTH_STYLES = {1: "green", 2: "yellow", 3: "red"}


def state_dir() -> str:
    return os.environ.get("AGENT2028_STATE_DIR", ".agent2028")


def service_address(service: str, override: str | None = None) -> str:
    """Where to reach ``service``: the flag, then <SERVICE>_ADDR, then a
    detached cluster's saved state, then the default port on loopback."""
    if override:
        return override
    env = os.environ.get(SERVICES[service].addr_env) if service in SERVICES else None
    if env:
        return env
    saved = saved_address(service, state_dir())
    if saved:
        return saved
    return f"127.0.0.1:{SERVICES[service].default_port}"


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Any) -> None:
    if isinstance(value, Message):
        value = to_dict(value)
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_json_line(value: Any) -> None:
    """One compact JSON object on one line: what streaming commands print with
    --json, so ``| jq -c`` or a line-by-line reader can follow them."""
    if isinstance(value, Message):
        value = to_dict(value)
    sys.stdout.write(json.dumps(value, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    # The message often carries text from the user or a server, e.g. a
    # pattern like [a-z0-9_-]: never let Rich read it as markup.
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise SystemExit(code)


def plural(count: int, word: str, words: str | None = None) -> str:
    """ "1 task", "2 tasks" (``words`` for an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Ten years: beyond it a deadline no longer fits the protobuf types it goes in.
MAX_DURATION_S = 3650 * 86400.0


def parse_duration(text: str, option: str) -> float:
    """Seconds from a duration option: a bare number of seconds ("90", "1.5")
    or a number with a unit: ms, s, m, h or d ("500ms", "10s", "1.5m", "2h",
    "1d"). Every duration option of the CLI goes through here; anything else
    (or zero, or more than ten years) is a one-line error naming ``option``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        fail(
            f"{option} {text!r}: expected a duration such as 500ms, 10s, 1.5m, 2h or 1d "
            "(a bare number is seconds)"
        )
    seconds = float(match[1]) * _UNITS[match[2] or ""]
    if seconds <= 0:
        fail(f"{option} {text!r}: the duration must be more than zero")
    if seconds > MAX_DURATION_S:
        fail(f"{option} {text!r}: the duration must be at most 3650d")
    return seconds


SERVICE_NAMES = {
    "consensus": "consensus service",
    "trust": "trust service",
    "stigmergy": "stigmergy service",
    "swarm": "swarm service",
}
CONNECT_TIMEOUT_S = 10.0


async def require_reachable(client: ServiceClient, service: str) -> None:
    """Before a long-lived stream: exit 1 at once when the first connection
    to the service fails. The clients' watches resume by themselves after
    UNAVAILABLE, which is right once a stream was established but would
    leave a command against a service that is not up silent forever."""
    channel = client.channel
    address = client.target
    name = SERVICE_NAMES.get(service, service)
    hint = "is the cluster up? (`agent2028 cluster status`)"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_S
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            fail(f"cannot reach the {name} at {address} (UNAVAILABLE): {hint}")
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            fail(
                f"cannot reach the {name} at {address} (no answer within "
                f"{CONNECT_TIMEOUT_S:g}s): {hint}"
            )
        state = channel.get_state(try_to_connect=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a command's coroutine; a failed RPC becomes a clear message."""
    try:
        return uvloop.run(coro)
    except ClientError as exc:
        detail = f" (field {exc.field})" if exc.field else ""
        fail(f"{exc.code.name}: {exc.message}{detail}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def health_text(status: int) -> str:
    name = HEALTH_NAMES.get(status, str(status))
    style = HEALTH_STYLES.get(status)
    return f"[{style}]{name}[/{style}]" if style else name
