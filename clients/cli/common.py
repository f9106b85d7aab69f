"""What every CLI command shares: addresses, output, running coroutines and
turning client errors into a one-line message and exit status 1."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import uvloop
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

from clients.errors import ClientError
from clients.launcher import SERVICES, saved_address

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

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


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise SystemExit(code)


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
