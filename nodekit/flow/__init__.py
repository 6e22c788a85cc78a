"""The flow runner: nodes, their dependencies, a state, run in sync or async mode.

Layers, lowest first (a module imports only those before it): `_schema` (the state) and
`_graph` (compiling the declared nodes into a plan), `_run` (one run's state), `_journal`
(durable runs) and `_scheduler` (the sync and async drivers), `_flow` (the `Flow` facade).
"""

from ._flow import Flow

__all__ = ["Flow"]
