"""Domain errors: what core code raises, and the canonical gRPC status each maps to.

This module does not import grpc so that every ``core.py`` can raise these;
``services.common.rpc`` turns them into statuses carrying a
``google.rpc.ErrorInfo`` (reason, domain, metadata naming the field) and, when a
field is named, a ``google.rpc.BadRequest`` field violation.
"""

from __future__ import annotations

from collections.abc import Mapping

ERROR_DOMAIN = "agent2028.dev"


class DomainError(Exception):
    """Base class; ``code`` is the name of a canonical gRPC status code."""

    code = "UNKNOWN"
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        if field:
            self.metadata.setdefault("field", field)


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"
    default_reason = "BAD_SIGNATURE"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = "ABORTED"
    default_reason = "ABORTED"


class OutOfRange(DomainError):
    code = "OUT_OF_RANGE"
    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(DomainError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    """The operation cannot be served now. Carries a no-retry pushback so a
    client's transparent UNAVAILABLE retries do not hammer a decided answer."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"
