"""The flow runner: nodes, their dependencies, a state, run in sync or async mode.

Layers, lowest first (a module imports only those before it): `_schema` (the state) and
`_graph` (compiling the declared nodes into a plan), `_run` (one run's state), `_journal`
(durable runs), `_compensate` (undoing a failed run's completed nodes), `_routes` and
`_routed` (routing and loops: the plan, its drivers),
`_scheduler` (the sync and async drivers),
`_subflow` (a flow run as a node), `_flow` (the `Flow` facade).
"""

from ._flow import Flow
from ._routes import END

__all__ = ["END", "Flow"]
