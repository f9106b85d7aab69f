"""Every RPC of every service, and of an agent, fed hostile input over the
network: undecodable bytes, empty requests, and requests whose fields of one
kind at a time are set to what a careless or malicious caller sends (huge and
control-character strings, negative and extreme integers, NaN and infinite
floats, enum numbers the proto does not define, oversized bytes and lists).

Whatever it is, the answer is a canonical status that is not INTERNAL or
UNKNOWN (or a result), and every process still serves afterwards: bad input
gets a clear status and crashes nothing. The methods are read from the
protos' descriptors, so an RPC added later is covered without a line here.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from clients.health import check as health_check
from clients.launcher import SERVICES, LocalCluster

pytestmark = pytest.mark.cluster

# The proto package of each server: the services, and agents.
PACKAGES = {name: name for name in SERVICES} | {"agent": "agent"}
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT_S = 3.0
# Long-lived streams (watches, subscriptions) legitimately outlive a call's
# deadline: for them the deadline ending the call is an answer too.
STREAM_TIMEOUT_S = 1.5

T = FieldDescriptor
INTS = {T.TYPE_INT32, T.TYPE_INT64, T.TYPE_SINT32, T.TYPE_SINT64, T.TYPE_SFIXED32, T.TYPE_SFIXED64}
UINTS = {T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_FIXED32, T.TYPE_FIXED64}
FLOATS = {T.TYPE_DOUBLE, T.TYPE_FLOAT}
INT_MAX = {32: 2**31 - 1, 64: 2**63 - 1}


def _bits(field: FieldDescriptor) -> int:
    return (
        32
        if field.type
        in {T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32, T.TYPE_UINT32, T.TYPE_FIXED32}
        else 64
    )


# Each variant: a value for the fields of the kinds it touches, or None.
Variant = Callable[[FieldDescriptor], Any]
VARIANTS: dict[str, Variant] = {
    "long strings": lambda f: "x" * 70_000 if f.type == T.TYPE_STRING else None,
    "control characters": lambda f: "a\x00b\n../\u202e" if f.type == T.TYPE_STRING else None,
    "unicode ids": lambda f: "agent-é🙂" if f.type == T.TYPE_STRING else None,
    "negative numbers": lambda f: -1 if f.type in INTS else (-1.0 if f.type in FLOATS else None),
    "extreme integers": lambda f: (
        -INT_MAX[_bits(f)] - 1
        if f.type in INTS
        else (2 ** _bits(f) - 1 if f.type in UINTS else None)
    ),
    "NaN": lambda f: math.nan if f.type in FLOATS else None,
    "infinity": lambda f: math.inf if f.type in FLOATS else None,
    "unknown enums": lambda f: 99 if f.type == T.TYPE_ENUM else None,
    "big bytes": lambda f: b"\xff" * 70_000 if f.type == T.TYPE_BYTES else None,
    "junk bytes": lambda f: b"\x00\x01junk" if f.type == T.TYPE_BYTES else None,
}


def _fill(message: Message, variant: Variant, depth: int = 0) -> None:
    """Sets every field the variant touches, in nested messages too, and
    lists to many copies."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                key = variant(key_field)
                if key is not None and value_field.message_type is None:
                    value = variant(value_field)
                    if value is not None:
                        getattr(message, field.name)[key] = value
                continue
            if depth >= 2 or field.message_type.full_name.startswith("google.protobuf."):
                continue
            if field.is_repeated:
                child = getattr(message, field.name).add()
            else:
                child = getattr(message, field.name)
            _fill(child, variant, depth + 1)
            if not field.is_repeated and child.ByteSize() == 0:
                message.ClearField(field.name)
            continue
        value = variant(field)
        if value is None:
            continue
        if field.is_repeated:
            small = not isinstance(value, str | bytes) or len(value) < 100
            getattr(message, field.name).extend([value] * (200 if small and not depth else 3))
        else:
            setattr(message, field.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _services() -> Iterator[tuple[str, ServiceDescriptor]]:
    for server, package in PACKAGES.items():
        module = importlib.import_module(f"agent2028.{package}.v1.{package}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            yield server, service


def _payloads(method: MethodDescriptor) -> Iterator[tuple[str, bytes]]:
    yield "undecodable bytes", b"\xff\xff\xff\xff\x0f"
    yield "an empty request", b""
    # Field 1, length-delimited, 5 MiB: over every server's message limit.
    size = 5 * 1024 * 1024
    yield "an oversized message", b"\x0a" + _varint(size) + b"a" * size
    cls = GetMessageClass(method.input_type)
    for name, variant in VARIANTS.items():
        request = cls()
        _fill(request, variant)
        if request.ByteSize():
            yield name, request.SerializeToString()


async def _call(
    channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor, payload: bytes
) -> tuple[grpc.StatusCode, list[int]]:
    """The call's status, and the status codes streamed responses carry in a
    ``code`` field (StreamVotes answers each vote in band)."""
    path = f"/{service.full_name}/{method.name}"
    streaming = method.server_streaming or method.client_streaming
    timeout = STREAM_TIMEOUT_S if streaming else CALL_TIMEOUT_S
    decode = GetMessageClass(method.output_type).FromString
    in_band: list[int] = []

    def note(response: Message) -> None:
        if "code" in response.DESCRIPTOR.fields_by_name:
            in_band.append(response.code)  # type: ignore[attr-defined]

    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(path)(payload, timeout=timeout)
        elif not method.client_streaming:
            stream = channel.unary_stream(path, response_deserializer=decode)
            async for response in stream(payload, timeout=timeout):
                note(response)
        else:

            async def one() -> AsyncIterator[bytes]:
                yield payload

            if method.server_streaming:
                bidi = channel.stream_stream(path, response_deserializer=decode)
                async for response in bidi(one(), timeout=timeout):
                    note(response)
            else:
                await channel.stream_unary(path)(one(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), in_band
    return grpc.StatusCode.OK, in_band


async def test_no_rpc_answers_hostile_input_with_internal_or_crashes(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster({"LOG_LEVEL": "ERROR"})
    await cluster.start()
    [agent] = await cluster.spawn_agents(1, [["compute", "echo"]])
    addresses = {name: cluster.address(name) for name in SERVICES} | {"agent": agent.address}

    bad: list[str] = []
    calls = 0
    in_band_answers = 0
    channels = {
        name: grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 8 * 1024 * 1024),
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ],
        )
        for name, address in addresses.items()
    }
    try:
        for server, service in _services():
            channel = channels[server]
            jobs = [
                (method, label, payload)
                for method in service.methods
                for label, payload in _payloads(method)
            ]
            codes = await asyncio.gather(
                *(_call(channel, service, method, payload) for method, _, payload in jobs)
            )
            calls += len(jobs)
            for (method, label, _), (code, in_band) in zip(jobs, codes, strict=True):
                if code in FORBIDDEN:
                    bad.append(f"{service.name}.{method.name} given {label}: {code.name}")
                forbidden = [c for c in in_band if c in {s.value[0] for s in FORBIDDEN}]
                if forbidden:
                    bad.append(f"{service.name}.{method.name} given {label}: in band {forbidden}")
                in_band_answers += len(in_band)
    finally:
        for channel in channels.values():
            await channel.close()

    assert calls > 500 and in_band_answers > 0
    assert not bad, "\n".join(bad)
    for name, address in addresses.items():
        assert await health_check(address, timeout_s=5.0) == "SERVING", name
        assert cluster.procs[agent.name if name == "agent" else name].alive(), name
