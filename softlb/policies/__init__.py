"""Balancing policies, registered by their stable config name."""

from ._base import Policy as Policy
from ._base import effective_weights as effective_weights
from ._load import LoadBoard as LoadBoard
from .least_connections import LeastConnections as LeastConnections
from .least_request import LeastRequest as LeastRequest
from .maglev import Maglev as Maglev
from .never_queue import NeverQueue as NeverQueue
from .ring_hash import RingHash as RingHash
from .round_robin import RoundRobin as RoundRobin
from .shortest_expected_delay import ShortestExpectedDelay as ShortestExpectedDelay
from .source_hash import SourceHash as SourceHash
from .weighted_random import Random as Random
from .weighted_round_robin import WeightedRoundRobin as WeightedRoundRobin

#: name -> class. Config validation and the agent look policies up here only.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        Random,
        LeastConnections,
        LeastRequest,
        RingHash,
        Maglev,
        SourceHash,
        ShortestExpectedDelay,
        NeverQueue,
    )
}
