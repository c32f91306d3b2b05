"""Default locations, following systemd's directories when it provides them."""

from __future__ import annotations

import os

from softlb_client import default_socket_path as default_socket_path


def default_state_dir() -> str:
    """$STATE_DIRECTORY (systemd StateDirectory=), else /var/lib/softlb for root,
    else $XDG_STATE_HOME/softlb or ~/.local/state/softlb."""
    sd = os.environ.get("STATE_DIRECTORY")
    if sd:
        return sd.split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/softlb"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "softlb")
