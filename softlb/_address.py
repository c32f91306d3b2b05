"""Endpoint addresses every catalog source accepts: an IP address or a usable host name."""

from __future__ import annotations

import ipaddress
import re

#: One DNS label (RFC 1123, plus '_' as DNS-SD names use it), no hyphen at either end.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def address_problem(addr: str) -> str:
    """Why `addr` is neither an IP address nor a usable host name ("" if it is one).

    Callers hand endpoint addresses to getaddrinfo and connect; a name with an empty label
    ("db..internal") or a label over 63 characters makes Python's IDNA codec raise
    UnicodeError there instead of a lookup failure, so such names are refused up front,
    in every source, rather than failing later in every caller and probe.
    """
    try:
        ipaddress.ip_address(addr)
        return ""
    except ValueError:
        pass
    name = addr[:-1] if addr.endswith(".") else addr  # a trailing dot is fully qualified
    if not name or len(name) > 253:
        return "a host name must be 1 to 253 characters"
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return ("not an IP address or host name (each dot-separated label must be 1 to 63 "
                "letters, digits, '-' or '_', not starting or ending with '-')")
    return ""
