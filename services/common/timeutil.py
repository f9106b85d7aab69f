"""Conversions between protobuf Timestamp/Duration and plain numbers.

Cores work in float seconds (wall clock for what is persisted or shown,
monotonic for timers); servicers convert at the edge with these helpers.
"""

from __future__ import annotations

import math

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument


def _split(seconds: float) -> tuple[int, int]:
    """Whole seconds and nanoseconds, the nanoseconds always in [0, 1e9)."""
    whole = math.floor(seconds)
    return int(whole), min(round((seconds - whole) * 1e9), 999_999_999)


def to_timestamp(seconds: float) -> Timestamp:
    whole, nanos = _split(seconds)
    return Timestamp(seconds=whole, nanos=nanos)


def timestamp_from_ns(ns: int) -> Timestamp:
    """Exact: what is signed as nanoseconds must travel as the same nanoseconds."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def from_timestamp(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def timestamp_ns(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def to_duration(seconds: float) -> Duration:
    whole, nanos = _split(seconds)
    return Duration(seconds=whole, nanos=nanos)


def from_duration(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def require_timestamp(ts: Timestamp, field: str, *, present: bool) -> float:
    """The timestamp's seconds; INVALID_ARGUMENT naming the field when it is
    missing or out of protobuf's valid range."""
    if not present:
        raise InvalidArgument(f"{field} is required", field=field, reason="EMPTY_FIELD")
    if not (0 <= ts.nanos <= 999_999_999) or not (-62135596800 <= ts.seconds <= 253402300799):
        raise InvalidArgument(
            f"{field} is not a valid timestamp", field=field, reason="INVALID_TIMESTAMP"
        )
    return from_timestamp(ts)


def require_duration(d: Duration, field: str, *, lo: float, hi: float) -> float:
    """The duration's seconds; INVALID_ARGUMENT naming the field when outside [lo, hi]."""
    if (
        d.nanos < -999_999_999
        or d.nanos > 999_999_999
        or (d.seconds > 0 > d.nanos)
        or (d.seconds < 0 < d.nanos)
    ):
        raise InvalidArgument(
            f"{field} is not a valid duration", field=field, reason="INVALID_DURATION"
        )
    value = from_duration(d)
    if not lo <= value <= hi:
        raise InvalidArgument(
            f"{field} must be within {lo}s..{hi}s, got {value}s", field=field, reason="OUT_OF_RANGE"
        )
    return value
