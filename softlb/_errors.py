"""Errors, named by who is at fault (h11's habit), and the wire protocol's stable codes."""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Stable error codes of wire protocol v1 (docs/PROTOCOL.md). Never renamed or reused."""

    BAD_FRAME = "BAD_FRAME"  # the frame's body is not a msgpack map / not a request
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"  # length prefix above the agent's max_frame
    UNKNOWN_OP = "UNKNOWN_OP"
    BAD_ARGUMENT = "BAD_ARGUMENT"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_SERVICE = "UNKNOWN_SERVICE"
    NO_HEALTHY_ENDPOINT = "NO_HEALTHY_ENDPOINT"
    UNKNOWN_LEASE = "UNKNOWN_LEASE"
    UNAVAILABLE = "UNAVAILABLE"  # the catalog source has not answered (yet)
    INTERNAL = "INTERNAL"


class SoftLBError(Exception):
    """Base of every error the core raises."""


class ConfigError(SoftLBError):
    """A config or catalog document is invalid; the message names the key path."""


class RemoteProtocolError(SoftLBError):
    """The peer sent something that breaks the protocol.

    `fatal` means framing is lost (the connection must be closed after answering).
    """

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False, request_id: object = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id


class RequestError(SoftLBError):
    """A well-formed request that cannot be answered (unknown service, no endpoint...)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
