"""Who holds a key: this process's identity, written into every claim, and whether the
process a claim names is gone.

A claim records its holder as compact JSON: host name, the Linux boot id, the PID
namespace, the process id and the process's start time (clock ticks after boot, from
``/proc/<pid>/stat``). A caller on the same host, boot and PID namespace can then tell a dead
holder from a live one: the pid is gone, it is a zombie, or it now belongs to a process that
started at another time (pid reuse). Such a claim is taken over at once instead of after its
lease (fenced, as every takeover).

Safety first: anything unsure counts as alive — another host, another boot or PID namespace
(a container), a record without a holder (an older nodekit), a holder that cannot be parsed,
a ``/proc`` that hides other users' processes. A live holder is never taken over early; the
worst an unsure answer costs is the wait for the lease, as before. Where ``/proc`` is missing
(not Linux), a holder on the same host counts as dead only when its pid no longer exists.

The identity is computed once per process (again in a forked child) and kept as its JSON
text, so writing it costs a store nothing but the bytes; the liveness check runs only when
an acquire finds a live lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALIVE",
    "DEAD",
    "UNSURE",
    "Identity",
    "KeyHolder",
    "alive",
    "holder_of",
    "holder_text",
    "identity",
    "key_holder",
    "parse",
    "state_of",
    "when",
]

# what `alive` answers
ALIVE, DEAD, UNSURE = "alive", "dead", "unsure"


@dataclass(frozen=True, slots=True)
class Identity:
    """A process, as a claim records it. Empty strings and None mean "could not be read"."""

    host: str
    pid: int
    start: int | None  # clock ticks after boot (Linux), None elsewhere
    boot: str  # /proc/sys/kernel/random/boot_id: a new one on every boot
    pidns: str  # the PID namespace (a container has its own): pids compare only within one


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """Who holds (or held) a key, as an error reports it (`.holder`): host, pid, since when
    (seconds since the epoch), the lease's end, and whether that process is `"alive"`,
    `"dead"` or `"unsure"` (another host, or not known). `host` and `pid` are None for a
    claim written by a nodekit that did not record its holder."""

    host: str | None
    pid: int | None
    since: float
    lease_ends: float
    state: str
    this_process: bool = False

    def describe(self, now: float | None = None) -> str:
        """E.g. "held by pid 4242 on host build-7 since 21:03:05 CET; its lease ends 21:04:05
        CET (in 58 s)": local times, never the key or the payload."""
        now = time.time() if now is None else now
        if self.pid is None:
            who = "held by a caller that did not record itself (an older nodekit)"
        elif self.this_process:
            who = f"held by this process (pid {self.pid} on host {self.host})"
        else:
            who = f"held by pid {self.pid} on host {self.host}"
            if self.state == DEAD:
                who += " (that process is gone)"
        left = self.lease_ends - now
        ends = (
            f"its lease ends {when(self.lease_ends, now)} (in {left:.0f} s)"
            if left > 0
            else f"its lease ended {when(self.lease_ends, now)}"
        )
        return f"{who} since {when(self.since, now)}; {ends}"


def when(seconds: float, now: float) -> str:
    """A local time: ``21:04:05 CET``, with the date when it is not today's."""
    moment = time.localtime(seconds)
    shown = time.strftime("%H:%M:%S %Z", moment)
    if time.localtime(now)[:3] != moment[:3]:
        shown = time.strftime("%Y-%m-%d ", moment) + shown
    return shown


# ---------------------------------------------------------------------------- this process


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read().strip()
    except OSError:
        return ""


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, from ``/proc/<pid>/stat``."""
    text = _read(f"/proc/{pid}/stat")
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    rest = text.rpartition(")")[2].split()
    if len(rest) < 20 or not rest[19].isdigit():
        return None
    return rest[0], int(rest[19])  # fields 3 (state) and 22 (starttime)


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _identity() -> Identity:
    pid = os.getpid()
    stat = _stat("self")
    return Identity(
        host=socket.gethostname(),
        pid=pid,
        start=None if stat is None else stat[1],
        boot=_read("/proc/sys/kernel/random/boot_id"),
        pidns=_pidns(),
    )


class _Here:
    """This process's identity and its JSON text, computed on first use (again after a fork).

    The fork hook matters for safety, not only accuracy: a child that recorded its parent's
    identity could be taken over while it runs, once the parent is gone. Every fork made by
    Python (``os.fork``, multiprocessing) runs it; `identity` also checks the pid, since it is
    off the hot path.
    """

    __slots__ = ("identity", "pid", "text")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.identity: Identity | None = None
        self.text: str | None = None
        self.pid = 0

    def get(self) -> tuple[Identity, str]:
        identity, text = self.identity, self.text
        if identity is None or text is None or self.pid != os.getpid():
            identity = _identity()
            fields: dict[str, Any] = {"host": identity.host, "pid": identity.pid}
            if identity.start is not None:
                fields["start"] = identity.start
            if identity.boot:
                fields["boot"] = identity.boot
            if identity.pidns:
                fields["pidns"] = identity.pidns
            text = json.dumps(fields, separators=(",", ":"))
            self.identity, self.text, self.pid = identity, text, identity.pid
        return identity, text


_HERE = _Here()
os.register_at_fork(after_in_child=_HERE.reset)


def identity() -> Identity:
    """This process's identity (computed once per process)."""
    return _HERE.get()[0]


def holder_text() -> str:
    """This process's identity as a claim records it (compact JSON, computed once)."""
    text = _HERE.text
    return text if text is not None else _HERE.get()[1]


# ---------------------------------------------------------------------------- other processes


def parse(text: str | None) -> Identity | None:
    """A recorded holder, or None (none recorded, or not one nodekit writes: never trusted)."""
    if not text:
        return None
    try:
        fields = json.loads(text)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    host, pid, start = fields.get("host"), fields.get("pid"), fields.get("start")
    boot, pidns = fields.get("boot", ""), fields.get("pidns", "")
    if (
        not isinstance(host, str)
        or type(pid) is not int
        or pid <= 0
        or not (start is None or type(start) is int)
        or not isinstance(boot, str)
        or not isinstance(pidns, str)
    ):
        return None
    return Identity(host, pid, start, boot, pidns)


def alive(holder: Identity | None) -> str:
    """`ALIVE`, `DEAD` or `UNSURE`: whether the process `holder` names still runs.

    `DEAD` only when certain: the same host, boot and PID namespace as this process, and the
    pid gone, a zombie, or owned by a process that started at another time. On a host
    without ``/proc`` (no boot id, no start times), the same host name and a pid that does
    not exist.
    """
    if holder is None:
        return UNSURE
    me = identity()
    if holder.host != me.host or holder.boot != me.boot or holder.pidns != me.pidns:
        return UNSURE
    if not me.boot and me.start is not None:
        return UNSURE  # a Linux process without a boot id: the host cannot be told apart
    if holder.pid == me.pid:
        # our own pid: this process, unless the recorded one started at another time (it
        # died, and the pid came round to us)
        if holder.start is not None and me.start is not None and holder.start != me.start:
            return DEAD
        return ALIVE
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return DEAD
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return UNSURE
    if holder.start is None or me.start is None:
        return ALIVE  # no start times to compare: the pid exists, so it may be the holder
    stat = _stat(holder.pid)
    if stat is None:
        return ALIVE  # hidden (hidepid) or it just ended: unsure, so not taken over
    state, start = stat
    if start != holder.start:
        return DEAD  # the pid came round to another process
    if state in ("Z", "X") and not _other_threads(holder.pid):
        return DEAD  # exited, not yet reaped (a leader that exited alone leaves its threads)
    return ALIVE


def _other_threads(pid: int) -> bool:
    """Whether a process whose main thread is a zombie still has threads that run."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False  # gone meanwhile


def state_of(text: str | None) -> str:
    """`alive` for a recorded holder's text (this process's own at the cost of a compare)."""
    if text is not None and text == _HERE.text:
        return ALIVE
    return alive(parse(text))


def key_holder(
    text: str | None, since: float, lease_ends: float, state: str | None = None
) -> KeyHolder:
    """What an error reports about a claim's holder (its liveness checked unless given)."""
    holder = parse(text)
    if state is None:
        state = alive(holder)
    if holder is None:
        return KeyHolder(None, None, since, lease_ends, state)
    me = identity()
    mine = (holder.host, holder.pid, holder.start, holder.boot, holder.pidns) == (
        me.host,
        me.pid,
        me.start,
        me.boot,
        me.pidns,
    )
    return KeyHolder(holder.host, holder.pid, since, lease_ends, state, this_process=mine)


def holder_of(record: Any) -> KeyHolder:
    """Who holds (or held) a stored record's key, its liveness checked from this host: what
    `nodekit store show` prints."""
    return key_holder(record.holder, record.created_at, record.lease_expires_at)
