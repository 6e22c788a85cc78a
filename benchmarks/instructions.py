"""Instructions per call, counted by valgrind: a before/after check that machine noise cannot blur.

Wall-clock figures on a shared machine can move by tens of percent between two runs of the
same code; an instruction count for the same interpreter, code and inputs does not. Each
scenario runs in a fresh interpreter under ``valgrind --tool=callgrind`` twice, with ``SMALL``
and ``LARGE`` calls (``PYTHONHASHSEED=0``), and the difference divided by ``LARGE - SMALL`` is
the cost of one call, start-up excluded.

``python -m benchmarks.instructions`` measures this checkout; ``--tree PATH`` measures another
checkout of nodekit with the same interpreter (e.g. ``git worktree add /tmp/before <commit>``)
and prints both side by side. It writes nothing: its figures go into BENCHMARKS.md by hand.
Needs ``valgrind`` on the PATH (Debian's package).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

SMALL, LARGE = 1_000, 11_000

SCENARIO = textwrap.dedent(
    """
    import asyncio, os, sys, tempfile
    name, n = sys.argv[1], int(sys.argv[2])
    if name.startswith("structlog-"):
        import structlog  # noqa: F401 - loaded, as in most applications
    import nodekit as nk

    def add_one(x): return x + 1
    async def aadd_one(x): return x + 1

    kind = name.removeprefix("structlog-")
    sync = not kind.startswith("async-")
    body = add_one if sync else aadd_one
    if kind.endswith("bare"):
        call = body
    elif kind.endswith("node"):
        call = nk.node(retry=nk.Retry(), effect=nk.Effect.READ)(body)
    else:  # keyed: first executions or replays, on MemoryStore or SQLiteStore
        store = (nk.SQLiteStore(os.path.join(tempfile.mkdtemp(), "keys.db"))
                 if "sqlite" in kind else nk.MemoryStore())
        keyed = nk.node(name="bench", idempotency=nk.Idempotency(key=lambda x: x, store=store))(body)
        counter = iter(range(10**9))
        call = (lambda x: keyed(7)) if "replay" in kind else (lambda x: keyed(next(counter)))
    if kind == "flow-per-node":
        flow = nk.Flow("chain")
        for i in range(100):
            flow.add(nk.node(name=f"n{i}", effect=nk.Effect.NONE)(lambda x: {"x": x + 1}),
                     after=[f"n{i - 1}"] if i else [])
        for _ in range(n // 100):
            flow.run({"x": 0})
    elif sync:
        for _ in range(n):
            call(41)
    else:
        async def main():
            for _ in range(n):
                await call(41)
        asyncio.run(main())
    """
)

SCENARIOS = [
    "sync-bare",
    "sync-node",
    "async-bare",
    "async-node",
    "structlog-sync-node",
    "sync-keyed-first",
    "sync-keyed-replay",
    "async-keyed-first",
    "async-keyed-replay",
    "sync-sqlite-replay",
    "flow-per-node",
]


def _count(tree: Path | None, name: str, calls: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            SCENARIO,
            name,
            str(calls),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree or Path.cwd(),
        check=True,
    )
    line = next(line for line in out.stderr.splitlines() if "Collected" in line)
    return int(line.split()[-1])


def per_call(tree: Path | None, name: str) -> float:
    """Instructions per call (per node for the flow scenario), start-up excluded."""
    small, large = _count(tree, name, SMALL), _count(tree, name, LARGE)
    return (large - small) / (LARGE - SMALL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="another nodekit checkout to compare with")
    parser.add_argument("scenarios", nargs="*", default=SCENARIOS)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    header = "| scenario | this checkout |" + (" other tree | change |" if args.tree else "")
    print(header)
    print("| --- | ---: |" + (" ---: | ---: |" if args.tree else ""))
    for name in args.scenarios:
        here = per_call(None, name)
        row = f"| {name} | {here:,.0f} |"
        if args.tree:
            there = per_call(args.tree.resolve(), name)
            row += f" {there:,.0f} | {100 * (here - there) / there:+.1f}% |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
