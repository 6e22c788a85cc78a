"""Rewrite one big file atomically, forever, until killed (used by test_files.py).

    python _kill_worker.py TARGET SIZE [sync|async]

Version ``n`` of the file is ``SIZE`` copies of the byte ``n % 251 + 1``: any mix of two
versions, or a short file, is visible at a glance. Prints ``ready`` once the first version is
in place, then keeps writing until SIGKILL arrives at an arbitrary step.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from nodekit.files import awrite_atomic, write_atomic


def version(n: int, size: int) -> bytes:
    return bytes([n % 251 + 1]) * size


def run_sync(target: str, size: int) -> None:
    for n in itertools.count():
        write_atomic(target, version(n, size))
        if n == 0:
            print("ready", flush=True)


async def run_async(target: str, size: int) -> None:
    for n in itertools.count():
        await awrite_atomic(target, version(n, size))
        if n == 0:
            print("ready", flush=True)


if __name__ == "__main__":
    path, length = sys.argv[1], int(sys.argv[2])
    if sys.argv[3:] == ["async"]:
        asyncio.run(run_async(path, length))
    else:
        run_sync(path, length)
