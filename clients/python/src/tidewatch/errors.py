"""Typed exceptions: one class per gRPC status a caller handles differently."""

from __future__ import annotations

import grpc

__all__ = [
    "TidewatchError",
    "NotFoundError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "SessionClosedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "ProtocolError",
    "from_rpc_error",
    "from_status",
]


class TidewatchError(Exception):
    """Base class of every error the client raises.

    ``code`` is the gRPC status code when the server (or the transport) gave one and
    ``details`` its message.
    """

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code.name.lower()}: {details}" if code else details)
        self.code = code
        self.details = details

    @property
    def retryable(self) -> bool:
        """Whether re-sending on a new stream can succeed (the Ingest session does so)."""
        return self.code in _RETRYABLE


class NotFoundError(TidewatchError):
    """The device (Analyze) or health service is unknown: ``NOT_FOUND``."""


class InvalidArgumentError(TidewatchError):
    """The request is invalid, such as too many samples in one message."""


class ResourceExhaustedError(TidewatchError):
    """A message is too large or the server has too many open streams."""


class UnavailableError(TidewatchError):
    """The server is unreachable or shutting down; retrying later can work."""


class DeadlineExceededError(TidewatchError):
    """The call's deadline passed, or the server ended a silent stream."""


class SessionClosedError(TidewatchError):
    """A sample was sent to an ingest session that is closed or has failed."""


class UnauthenticatedError(TidewatchError):
    """No credentials, or credentials the server does not accept (a wrong or expired token)."""


class PermissionDeniedError(TidewatchError):
    """The caller lacks the scope for the call, or the device is outside its namespace."""


class ProtocolError(TidewatchError):
    """The server broke the Ingest contract (for example, a wrong number of verdicts)."""


_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)

# What grpc-python reports when sending on a stream whose connection is gone.
_CORE_WRITE_FAILURE = "Internal error from Core"

_BY_CODE: dict[grpc.StatusCode, type[TidewatchError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> TidewatchError:
    """The typed exception for a failed call."""
    code = error.code()
    if code == grpc.StatusCode.INTERNAL and error.details() == _CORE_WRITE_FAILURE:
        # grpc-python's own status for a write that failed on a dead connection: the
        # server never said INTERNAL, the transport broke.
        return UnavailableError(
            f"connection lost while writing ({error.debug_error_string()})",
            grpc.StatusCode.UNAVAILABLE,
        )
    return from_status(code, error.details() or "")


def from_status(code: grpc.StatusCode, details: str) -> TidewatchError:
    """The typed exception for a call that ended with ``code``."""
    cls = _BY_CODE.get(code, TidewatchError)
    return cls(details, code)
