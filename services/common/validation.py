"""Validation of request values shared by every service.

Each helper returns the cleaned value or raises ``InvalidArgument`` naming the
field, so servicers and cores validate in one line and the client always learns
which field was wrong.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping

from services.common.errors import InvalidArgument

MAX_ID_LEN = 128
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")
MAX_CAPABILITY_LEN = 64
CAPABILITY_RE = re.compile(r"[a-z][a-z0-9_\-]*(?:\.[a-z0-9_\-]+)*")
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _require_length(value: str, field: str, max_len: int, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be text", field=field, reason="WRONG_TYPE")
    if not value and not allow_empty:
        raise InvalidArgument(f"{field} must not be empty", field=field, reason="EMPTY_FIELD")
    if len(value) > max_len:
        raise InvalidArgument(
            f"{field} is {len(value)} characters; at most {max_len} allowed",
            field=field,
            reason="FIELD_TOO_LONG",
        )


def require_id(value: str, field: str, *, max_len: int = MAX_ID_LEN) -> str:
    """An identifier: 1..max_len characters of [A-Za-z0-9._:-], starting alphanumeric."""
    _require_length(value, field, max_len)
    if not ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} may only hold letters, digits and . _ : - and must start "
            "with a letter or digit",
            field=field,
            reason="MALFORMED_ID",
        )
    return value


def optional_id(value: str, field: str, *, max_len: int = MAX_ID_LEN) -> str:
    """Like ``require_id`` but an empty string is allowed (means unset)."""
    return require_id(value, field, max_len=max_len) if value else ""


def require_capability(value: str, field: str) -> str:
    """A capability name: lowercase dotted words such as ``database.query``."""
    _require_length(value, field, MAX_CAPABILITY_LEN)
    if not CAPABILITY_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} must be lowercase dotted words of [a-z0-9_-] "
            "such as 'database.query'",
            field=field,
            reason="MALFORMED_CAPABILITY",
        )
    return value


def require_capabilities(values: Iterable[str], field: str, *, max_count: int = 64) -> list[str]:
    """A non-empty list of distinct capability names, order kept."""
    out: list[str] = []
    seen: set[str] = set()
    for i, value in enumerate(values):
        require_capability(value, f"{field}[{i}]")
        if value not in seen:
            seen.add(value)
            out.append(value)
    if not out:
        raise InvalidArgument(
            f"{field} must hold at least one capability", field=field, reason="EMPTY_FIELD"
        )
    if len(out) > max_count:
        raise InvalidArgument(
            f"{field} holds {len(out)} capabilities; at most {max_count} allowed",
            field=field,
            reason="TOO_MANY_VALUES",
        )
    return out


def require_address(value: str, field: str) -> str:
    """``host:port`` with a hostname, an IPv4 address or a bracketed IPv6 address."""
    if not value:
        raise InvalidArgument(f"{field} must not be empty", field=field, reason="EMPTY_FIELD")
    if len(value) > 261:
        raise InvalidArgument(f"{field} is too long", field=field, reason="FIELD_TOO_LONG")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgument(
            f"{field} {value!r} must be host:port", field=field, reason="MALFORMED_ADDRESS"
        )
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(
            f"{field} port {port} is outside 1..65535", field=field, reason="MALFORMED_ADDRESS"
        )
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidArgument(
                f"{field} {value!r} has a malformed IPv6 host",
                field=field,
                reason="MALFORMED_ADDRESS",
            ) from None
        return value
    if not HOSTNAME_RE.fullmatch(host):
        raise InvalidArgument(
            f"{field} {value!r} has a malformed host", field=field, reason="MALFORMED_ADDRESS"
        )
    return value


def require_finite(
    value: float,
    field: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """A finite number within [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument(
            f"{field} must be a finite number, got {value!r}", field=field, reason="NOT_FINITE"
        )
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidArgument(
            f"{field} must be {bound}, got {value}", field=field, reason="OUT_OF_RANGE"
        )
    if hi is not None and value > hi:
        raise InvalidArgument(
            f"{field} must be <= {hi}, got {value}", field=field, reason="OUT_OF_RANGE"
        )
    return float(value)


def require_unit_interval(value: float, field: str) -> float:
    """A number in [0, 1]."""
    return require_finite(value, field, lo=0.0, hi=1.0)


def require_int_range(value: int, field: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise InvalidArgument(
            f"{field} must be within {lo}..{hi}, got {value}", field=field, reason="OUT_OF_RANGE"
        )
    return value


def require_text(value: str, field: str, *, max_len: int, allow_empty: bool = False) -> str:
    """Free text of at most max_len characters."""
    _require_length(value, field, max_len, allow_empty=allow_empty)
    return value


def require_metadata(
    values: Mapping[str, str],
    field: str,
    *,
    max_entries: int = 32,
    max_key_len: int = 64,
    max_value_len: int = 512,
) -> dict[str, str]:
    if len(values) > max_entries:
        raise InvalidArgument(
            f"{field} has {len(values)} entries; at most {max_entries} allowed",
            field=field,
            reason="TOO_MANY_VALUES",
        )
    for key, value in values.items():
        if not key or len(key) > max_key_len:
            raise InvalidArgument(
                f"{field} keys must be 1..{max_key_len} characters",
                field=field,
                reason="MALFORMED_METADATA",
            )
        if len(value) > max_value_len:
            raise InvalidArgument(
                f"{field}[{key!r}] is {len(value)} characters; at most {max_value_len} allowed",
                field=field,
                reason="FIELD_TOO_LONG",
            )
    return dict(values)


def page_size(
    value: int,
    field: str = "page_size",
    *,
    default: int = DEFAULT_PAGE_SIZE,
    maximum: int = MAX_PAGE_SIZE,
) -> int:
    """0 means the default; negative is an error; above the maximum is clamped (AIP-158)."""
    if value < 0:
        raise InvalidArgument(
            f"{field} must not be negative, got {value}", field=field, reason="OUT_OF_RANGE"
        )
    if value == 0:
        return default
    return min(value, maximum)


def encode_page_token(position: Mapping[str, object]) -> str:
    """An opaque token for the position after the last item of a page."""
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, field: str = "page_token") -> dict[str, object]:
    """The position a token names; an empty token is the first page."""
    if not token:
        return {}
    if len(token) > 1024:
        raise InvalidArgument(f"{field} is too long", field=field, reason="INVALID_PAGE_TOKEN")
    try:
        padded = token + "=" * (-len(token) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            f"{field} is not a token this service issued", field=field, reason="INVALID_PAGE_TOKEN"
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"{field} is not a token this service issued", field=field, reason="INVALID_PAGE_TOKEN"
        )
    return value
