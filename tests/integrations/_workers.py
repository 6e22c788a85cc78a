"""A worker script in its own interpreter, for the tests that kill a process mid-call.

`Worker` runs ``python <script> <args>``; the script reports its stages on stdout, a line
each, and the test waits for one (`wait_for`) and kills the worker there (`kill`). `spawner`
makes a pytest fixture that starts workers of one script and closes them all afterwards.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """`script` in its own interpreter; reports stages on stdout, killed at one."""

    def __init__(self, script: Path, args: list[str], log: Path) -> None:
        self.log = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
        )
        self._buffer = b""
        self.lines: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 20.0) -> str:
        """Block until the worker prints a line starting with `prefix`; return that line."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                self.close()
                raise AssertionError(
                    f"worker never reported {prefix!r}; it said {self.lines}; "
                    f"stderr: {self.log.read_text()}"
                )
            self._buffer += chunk

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()


def spawner(script: Path, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """The body of a `spawn` fixture: start workers of `script`, close them all at the end."""
    workers: list[Worker] = []

    def start(*args: str) -> Worker:
        worker = Worker(script, list(args), tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()
