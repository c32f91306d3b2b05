"""Balancing policies, registered by their stable config name."""

from ._base import Policy as Policy
from .round_robin import RoundRobin as RoundRobin

#: name -> class. Config validation and the agent look policies up here only.
POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (RoundRobin,)}
