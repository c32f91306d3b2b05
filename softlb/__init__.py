"""softlb core: the sans-I/O heart of the per-host load balancer.

Never imports trio, socket, asyncio or threading; never reads the clock or the global random
generator. Time comes in as `now` (float seconds), randomness as an injected random.Random.

This module is the core's public surface: the agent (and any other front end or tool) imports
from here only, never from a `softlb._x` module (tests/test_exports.py keeps it so).
"""

__version__ = "0.1.0"

# The engine and its typed API
from ._answers import Reported as Reported
from ._answers import respond as respond
from ._balancer import ServiceBalancer as ServiceBalancer
from ._engine import AGENT_NAME as AGENT_NAME
from ._engine import NO_CHANGES as NO_CHANGES
from ._engine import Changes as Changes
from ._engine import Engine as Engine
from ._engine import Pending as Pending
from ._engine import Pick as Pick
from ._engine import PickError as PickError
from ._leases import LeaseScope as LeaseScope
from .policies._consistent import TableBuild as TableBuild
from ._set_build import EndpointSetBuild as EndpointSetBuild

# The wire protocol (sans-I/O protocol object, typed requests)
from ._protocol import CLOSED as CLOSED
from ._protocol import OPS as OPS
from ._protocol import Endpoints as Endpoints
from ._protocol import Hello as Hello
from ._protocol import Rejected as Rejected
from ._protocol import Report as Report
from ._protocol import Request as Request
from ._protocol import Resolve as Resolve
from ._protocol import ServerConnection as ServerConnection
from ._protocol import Services as Services
from ._protocol import Unwatch as Unwatch
from ._protocol import Watch as Watch
from ._protocol import parse_request as parse_request
from ._protocol import resolve_frame as resolve_frame
from ._wire import NEED_DATA as NEED_DATA
from ._wire import PROTOCOL_VERSIONS as PROTOCOL_VERSIONS
from ._wire import encode_frame as encode_frame

# Config, catalog model, errors
from ._config import AgentConfig as AgentConfig
from ._config import ConsulConfig as ConsulConfig
from ._config import ConsulQuery as ConsulQuery
from ._config import ProbeConfig as ProbeConfig
from ._config import ProvideConfig as ProvideConfig
from ._config import ServiceConfig as ServiceConfig
from ._config import ProxyConfig as ProxyConfig
from ._config import ProxyRoute as ProxyRoute
from ._config import check_listen as check_listen
from ._config import ProxyPlan as ProxyPlan
from ._config import plan_proxies as plan_proxies
from ._config import route as route
from ._config import parse_agent_config as parse_agent_config
from ._config import parse_agent_config_text as parse_agent_config_text
from ._config import with_overrides as with_overrides
from ._durations import format_duration as format_duration
from ._durations import parse_duration as parse_duration
from ._durations import plural as plural
from ._errors import ConfigError as ConfigError
from ._errors import ErrorCode as ErrorCode
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import RequestError as RequestError
from ._filecatalog import parse_catalog_text as parse_catalog_text
from ._types import Endpoint as Endpoint
from ._types import RegistryHealth as RegistryHealth

# Why endpoints are (not) served; counters read by metrics
from ._counters import EndpointCounters as EndpointCounters
from ._counters import ServiceCounters as ServiceCounters
from ._explain import REASONS as REASONS
from ._explain import Why as Why
from ._explain import explain as explain
from ._explain import explain_empty as explain_empty

# Health
from ._health import EndpointHealth as EndpointHealth
from ._health import HealthTracker as HealthTracker
from ._health import ProbeState as ProbeState
from ._health import ServiceHealth as ServiceHealth

# Consul discovery (sans-I/O parts)
from ._backoff import Backoff as Backoff
from ._backoff import RetryPolicy as RetryPolicy
from ._consul import MAX_WEIGHT as MAX_WEIGHT
from ._consul import ConsulDataError as ConsulDataError
from ._consul import EmptySetGuard as EmptySetGuard
from ._consul import MappingOptions as MappingOptions
from ._consul import address_problem as address_problem
from ._consul import decode_health_body as decode_health_body
from ._consul import endpoints_from_health as endpoints_from_health
from ._consul import index_changed as index_changed
from ._consul import next_index as next_index
from ._consul import service_name_problem as service_name_problem
from ._consul import AnswerMeta as AnswerMeta
from ._consul import CheckFeed as CheckFeed
from ._consul import Freshness as Freshness
from ._consul import acl_filtered_message as acl_filtered_message
from ._consul import answer_freshness as answer_freshness
from ._consul import catalog_service_names as catalog_service_names
from ._consul import decode_json_body as decode_json_body
from ._consul import feed_filter as feed_filter
from ._consul import parse_answer_meta as parse_answer_meta
from ._consul import parse_index as parse_index
from ._consul import parse_retry_after as parse_retry_after
from ._watchplan import DEFAULT_MAX_POLL_RATE as DEFAULT_MAX_POLL_RATE
from ._watchplan import DEFAULT_POLL_PERIOD as DEFAULT_POLL_PERIOD
from ._watchplan import OnDemandLimitError as OnDemandLimitError
from ._watchplan import PlanChange as PlanChange
from ._watchplan import WatchPlanner as WatchPlanner
from ._watchplan import NegativeCache as NegativeCache
from ._watchplan import TokenBucket as TokenBucket

# HTTP/2 (sans-I/O): the http2 proxy's connections, either side
from ._h2connection import H2Connection as H2Connection
from ._h2events import DataReceived as DataReceived
from ._h2events import GoawayReceived as GoawayReceived
from ._h2events import H2ConnectionError as H2ConnectionError
from ._h2events import H2FlowControlBlocked as H2FlowControlBlocked
from ._h2events import H2StreamClosedError as H2StreamClosedError
from ._h2events import H2StreamRefused as H2StreamRefused
from ._h2events import H2UsageError as H2UsageError
from ._h2events import InformationalResponseReceived as InformationalResponseReceived
from ._h2events import PingAcknowledged as PingAcknowledged
from ._h2events import RemoteSettingsChanged as RemoteSettingsChanged
from ._h2events import RequestReceived as RequestReceived
from ._h2events import ResponseReceived as ResponseReceived
from ._h2events import StreamReset as StreamReset
from ._h2events import TrailersReceived as TrailersReceived
from ._h2events import WindowUpdated as WindowUpdated
from ._h2frames import H2ErrorCode as H2ErrorCode
from ._hpack_static import never_indexed as never_indexed
