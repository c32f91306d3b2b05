"""A Consul HTTP API test server: real blocking queries, ACL 403s and fault switches.

In-process:  `with SimServer() as srv: srv.sim.add_instance("web", port=80)`.
Subprocess:  `python -m tests.consulsim --port N` (see `SimProcess`), controlled over HTTP
with `SimControl(url)`, which has the same control methods as `ConsulSim`.
What it does not model: docs/CONSUL_TESTSERVER.md.
"""

from .process import SimControl as SimControl
from .process import SimProcess as SimProcess
from .server import SimServer as SimServer
from .state import AGENT_NODE as AGENT_NODE
from .state import ConsulSim as ConsulSim
