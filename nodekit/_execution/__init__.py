"""Running a node's attempts: the I/O-free decisions and one sync and one async driver.

`Attempts` (in `_attempts`) decides after each failed attempt whether and how long to wait;
`_timed` runs one attempt under a deadline; `_drivers` holds `run_sync` / `run_async`, the
one attempt loop per mode, and `call_sync` / `call_async`, one node call in its context.
"""

from ._attempts import Attempts
from ._drivers import bind_log, call_async, call_sync, run_async, run_sync, unbind_log
from ._guarded import guarded_async, guarded_sync

__all__ = [
    "Attempts",
    "bind_log",
    "call_async",
    "call_sync",
    "guarded_async",
    "guarded_sync",
    "run_async",
    "run_sync",
    "unbind_log",
]
