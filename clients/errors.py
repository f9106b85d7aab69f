"""One exception class per gRPC status code, carrying the server's ErrorInfo.

Modelled on google-api-core's ``exceptions``: catch ``NotFound`` or
``InvalidArgument`` rather than inspecting codes; ``reason``, ``field`` and
``metadata`` come from the ``google.rpc.ErrorInfo`` the services attach.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ClientError(Exception):
    """Base class of every error a typed client raises for a failed RPC."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field: str = "",
        cause: Exception | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field = field or self.metadata.get("field", "")
        self.cause = cause

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        if self.reason:
            parts.append(f"[{self.reason}]")
        return " ".join(parts)


class Cancelled(ClientError):
    code = grpc.StatusCode.CANCELLED


class Unknown(ClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ClientError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(ClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ClientError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[ClientError]:
    return _BY_CODE.get(code, Unknown)


def _status_details(error: Any) -> status_pb2.Status | None:
    try:
        trailers = error.trailing_metadata() or ()
    except Exception:
        return None
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:
                return None
            return status
    return None


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    """The typed exception for a failed RPC, with ErrorInfo decoded."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or ""
    reason = domain = field = ""
    metadata: dict[str, str] = {}
    status = _status_details(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    cls = error_class(code)
    return cls(message, reason=reason, domain=domain, metadata=metadata, field=field, cause=error)
