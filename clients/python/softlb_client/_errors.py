"""Client-side errors. Errors the agent answers carry its stable protocol code."""

from __future__ import annotations


class SoftLBError(Exception):
    """An error answer from the agent: `code` is the protocol's stable code (UNKNOWN_SERVICE...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentUnavailable(SoftLBError):
    """The agent could not be reached (not running, socket missing, connection refused)."""

    def __init__(self, message: str) -> None:
        super().__init__("AGENT_UNAVAILABLE", message)


class Timeout(SoftLBError):
    """No answer within the call's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__("TIMEOUT", message)


class ProtocolError(SoftLBError):
    """The agent's bytes did not parse as protocol v1 frames."""

    def __init__(self, message: str) -> None:
        super().__init__("PROTOCOL_ERROR", message)
