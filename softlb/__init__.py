"""softlb core: the sans-I/O heart of the per-host load balancer.

Never imports trio, socket, asyncio or threading; never reads the clock or the global random
generator. Time comes in as `now` (float seconds), randomness as an injected random.Random.
"""

from ._config import AgentConfig as AgentConfig
from ._config import ServiceConfig as ServiceConfig
from ._config import ProxyConfig as ProxyConfig
from ._config import ProxyRoute as ProxyRoute
from ._config import route as route
from ._config import parse_agent_config as parse_agent_config
from ._durations import parse_duration as parse_duration
from ._errors import ConfigError as ConfigError
from ._errors import ErrorCode as ErrorCode
from ._health import EndpointHealth as EndpointHealth
from ._health import HealthTracker as HealthTracker
from ._health import ProbeState as ProbeState
from ._health import ServiceHealth as ServiceHealth
from ._types import Endpoint as Endpoint
from ._types import RegistryHealth as RegistryHealth

__version__ = "0.1.0"

# Consul discovery (sans-I/O parts)
from ._backoff import Backoff as Backoff
from ._backoff import RetryPolicy as RetryPolicy
from ._consul import ConsulDataError as ConsulDataError
from ._consul import EmptySetGuard as EmptySetGuard
from ._consul import MappingOptions as MappingOptions
from ._consul import endpoints_from_health as endpoints_from_health
from ._consul import next_index as next_index
from ._watchplan import WatchPlanner as WatchPlanner
