"""Thin Python client for the softlb agent (wire protocol v1, docs/PROTOCOL.md).

Depends on msgpack only; the trio client needs trio. Nothing here imports the agent.
"""

from ._errors import AgentUnavailable as AgentUnavailable
from ._errors import ProtocolError as ProtocolError
from ._errors import SoftLBError as SoftLBError
from ._errors import Timeout as Timeout
from ._paths import default_socket_path as default_socket_path
from ._sync import Client as Client
from ._types import Resolved as Resolved

__version__ = "0.1.0"

__all__ = ["AgentUnavailable", "Client", "ProtocolError", "Resolved", "SoftLBError", "Timeout", "default_socket_path"]
