"""Ed25519 identities and the canonical bytes every signature covers.

Signatures never cover serialized protobuf (whose bytes are not canonical across
implementations). They cover ``canonical(tag, *fields)``:

    b"agent2028/v1\\x00" + tag + b"\\x00" + field_1 + field_2 + ...

where each field is a one-byte type, a 4-byte big-endian length and a payload:
``s`` UTF-8 text, ``b`` raw bytes, ``i`` a base-10 integer as ASCII, ``f`` an
IEEE-754 double big-endian, ``t`` one byte 0/1 for a boolean, ``l`` a list whose
length is its element count followed by its encoded elements. The tag separates
kinds of statement (a vote can never be replayed as a registration).
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Sequence

from nacl.encoding import RawEncoder
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_PREFIX = b"agent2028/v1\x00"

Field = str | bytes | int | float | bool | Sequence["Field"]


def _encode(value: Field, out: list[bytes]) -> None:
    if isinstance(value, bool):
        out.append(b"t" + struct.pack(">I", 1) + (b"\x01" if value else b"\x00"))
    elif isinstance(value, int):
        text = str(value).encode()
        out.append(b"i" + struct.pack(">I", len(text)) + text)
    elif isinstance(value, float):
        out.append(b"f" + struct.pack(">I", 8) + struct.pack(">d", value))
    elif isinstance(value, str):
        data = value.encode()
        out.append(b"s" + struct.pack(">I", len(data)) + data)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"b" + struct.pack(">I", len(data)) + data)
    elif isinstance(value, list | tuple):
        out.append(b"l" + struct.pack(">I", len(value)))
        for item in value:
            _encode(item, out)
    else:
        raise TypeError(f"cannot sign a {type(value).__name__}")


def canonical(tag: str, *fields: Field) -> bytes:
    """The bytes a signature over (tag, fields) covers."""
    out = [_PREFIX, tag.encode(), b"\x00"]
    for value in fields:
        _encode(value, out)
    return b"".join(out)


@functools.lru_cache(maxsize=65536)
def _verify_key(public_key: bytes) -> VerifyKey:
    return VerifyKey(public_key)


def valid_public_key(public_key: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        _verify_key(bytes(public_key))
    except Exception:  # nacl raises several types for malformed points
        return False
    return True


def verify(public_key: bytes, signature: bytes, tag: str, *fields: Field) -> bool:
    """True when ``signature`` is ``public_key``'s signature over (tag, fields)."""
    if len(signature) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        _verify_key(bytes(public_key)).verify(
            canonical(tag, *fields), bytes(signature), encoder=RawEncoder
        )
    except (BadSignatureError, ValueError, TypeError):
        return False
    except Exception:  # a malformed key point
        return False
    return True


class Identity:
    """An Ed25519 key pair named by an id: what an agent or a service signs with."""

    def __init__(self, signer_id: str, signing_key: SigningKey) -> None:
        self.signer_id = signer_id
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls, signer_id: str) -> Identity:
        return cls(signer_id, SigningKey.generate())

    @classmethod
    def from_seed(cls, signer_id: str, seed: bytes) -> Identity:
        return cls(signer_id, SigningKey(seed))

    @classmethod
    def load_or_create(cls, signer_id: str, path: str) -> Identity:
        """The key in ``path`` (a 32-byte seed, hex), created 0600 if missing."""
        try:
            with open(path, encoding="ascii") as fh:
                seed = bytes.fromhex(fh.read().strip())
            if len(seed) != 32:
                raise ValueError(f"{path}: expected a 32-byte hex seed")
            return cls.from_seed(signer_id, seed)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        identity = cls.generate(signer_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(bytes(identity._key).hex() + "\n")
        return identity

    def sign(self, tag: str, *fields: Field) -> bytes:
        return self._key.sign(canonical(tag, *fields), encoder=RawEncoder).signature
