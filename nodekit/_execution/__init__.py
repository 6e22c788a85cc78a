"""Running a node's attempts: the I/O-free decisions and one sync and one async driver.

`Attempts` (in `_attempts`) decides after each failed attempt whether and how long to wait;
`_timed` runs one attempt under a deadline; `_drivers` holds `run_sync` / `run_async`, the
one attempt loop per mode, and `call_sync` / `call_async`, one node call in its context.
`_inline` is the same loop as a block of code: `nk.attempts(...)`.
"""

from ._attempts import Attempts
from ._drivers import bind_log, call_async, call_sync, run_async, run_sync, unbind_log
from ._guarded import guarded_async, guarded_sync
from ._inline import Attempt, AttemptBlock, attempts
from ._timed import thread_bound_error

__all__ = [
    "Attempt",
    "AttemptBlock",
    "Attempts",
    "attempts",
    "bind_log",
    "call_async",
    "call_sync",
    "guarded_async",
    "guarded_sync",
    "run_async",
    "run_sync",
    "thread_bound_error",
    "unbind_log",
]
