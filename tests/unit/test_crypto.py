"""Canonical signing bytes, signatures and key files."""

from __future__ import annotations

import os
import stat

import pytest

from services.common import crypto, signing
from services.common.crypto import Identity, canonical


def test_canonical_encoding_separates_fields_types_and_tags() -> None:
    assert canonical("t", "ab", "c") != canonical("t", "a", "bc")
    assert canonical("t", "1") != canonical("t", 1)
    assert canonical("t", b"x") != canonical("t", "x")
    assert canonical("t", True) != canonical("t", 1)
    assert canonical("vote", "p", "approve") != canonical("bid", "p", "approve")
    assert canonical("t", ["a", "b"]) != canonical("t", ["ab"])
    assert canonical("t", 1.0) != canonical("t", 1)


def test_canonical_encoding_is_stable() -> None:
    # A fixed vector: changing the encoding breaks every signature in the field.
    assert canonical("x", "ab", 7, True).hex() == (
        b"agent2028/v1\x00x\x00".hex()
        + "73"
        + "00000002"
        + "6162"
        + "69"
        + "00000001"
        + "37"
        + "74"
        + "00000001"
        + "01"
    )


def test_sign_and_verify() -> None:
    alice = Identity.generate("alice")
    mallory = Identity.generate("alice")
    sig = alice.sign("vote", "p-1", "approve")
    assert crypto.verify(alice.public_key, sig, "vote", "p-1", "approve")
    assert not crypto.verify(alice.public_key, sig, "vote", "p-1", "reject")
    assert not crypto.verify(mallory.public_key, sig, "vote", "p-1", "approve")
    assert not crypto.verify(alice.public_key, sig[:-1], "vote", "p-1", "approve")
    assert not crypto.verify(b"\x00" * 32, sig, "vote", "p-1", "approve")
    assert not crypto.verify(b"short", sig, "vote", "p-1", "approve")


def test_valid_public_key() -> None:
    assert crypto.valid_public_key(Identity.generate("a").public_key)
    assert not crypto.valid_public_key(b"\x01" * 31)


def test_key_file_is_created_private_and_reloaded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "keys", "agent.key")
    first = Identity.load_or_create("agent-1", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Identity.load_or_create("agent-1", path)
    assert again.public_key == first.public_key


def test_corrupt_key_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "agent.key")
    with open(path, "w") as fh:
        fh.write("abcd\n")
    with pytest.raises(ValueError):
        Identity.load_or_create("agent-1", path)


def test_signed_statements_differ_by_kind() -> None:
    reg = signing.registration("a", "h:1", ["c"], 1, {"k": "v"}, b"k" * 32, 5)
    dereg = signing.deregistration("a", 5)
    assert reg[0] == "register" and dereg[0] == "deregister"
    # metadata order does not change what is signed
    assert signing.registration(
        "a", "h:1", ["c"], 1, {"x": "1", "y": "2"}, b"k" * 32, 5
    ) == signing.registration("a", "h:1", ["c"], 1, {"y": "2", "x": "1"}, b"k" * 32, 5)
