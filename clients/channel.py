"""The one channel factory every client uses.

Channels retry only on UNAVAILABLE (a server that answers UNAVAILABLE on
purpose sends a no-retry pushback), reconnect quickly after a server restart,
keep connections alive, carry explicit message size limits, and use TLS when
TLS_CA_FILE (and for mTLS TLS_CERT_FILE/TLS_KEY_FILE) is set. Deadlines are the
typed clients' business: every call they make passes one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc

from services.common.config import TlsConfig

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, retries: bool = True
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # After a server restart, come back within a fraction of a second,
        # not after grpc's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        options.append(("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)))
    return options


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=TlsConfig.read(tls.ca_file),
        private_key=TlsConfig.read(tls.key_file),
        certificate_chain=TlsConfig.read(tls.cert_file),
    )


def create_channel(
    target: str,
    *,
    tls: TlsConfig | None = None,
    env: Mapping[str, str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retries: bool = True,
) -> grpc.aio.Channel:
    """An aio channel to ``target`` (host:port). TLS settings come from the
    argument or, when it is None, from the TLS_* environment variables."""
    tls = tls if tls is not None else TlsConfig.from_env(env)
    options = channel_options(max_message_bytes, retries=retries)
    if tls is not None:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options)
    return grpc.aio.insecure_channel(target, options=options)
