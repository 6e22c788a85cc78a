"""Run every benchmark module, each in a fresh interpreter, and rewrite its BENCHMARKS.md section.

``python -m benchmarks.run`` runs them all; ``python -m benchmarks.run node flow`` only those;
``--quick`` passes the smoke-run flag through (nothing is written). A fresh interpreter per
module keeps one module's imports (structlog, say) from changing another's figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from ._common import BENCHMARKS_MD, ROOT

# One entry per module `benchmarks/bench_<name>.py`, which owns the section `<name>` of
# BENCHMARKS.md. Add new modules here in the order their sections should be run.
MODULES: list[str] = [
    "node",
    "idempotency",
    "flow",
    "checkout",
    "resilience",
    "sql",
    "observe",
    "batch",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("modules", nargs="*", metavar="name", help=f"any of {MODULES}")
    parser.add_argument(
        "--quick", action="store_true", help="fast smoke runs; BENCHMARKS.md is not written"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.modules if name not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {MODULES}")
    failed = []
    started = time.perf_counter()
    for name in args.modules or MODULES:
        command = [sys.executable, "-m", f"benchmarks.bench_{name}"]
        if args.quick:
            command.append("--quick")
        print(f"== bench_{name}", file=sys.stderr, flush=True)
        if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
            failed.append(name)
    took = time.perf_counter() - started
    if failed:
        print(f"failed: {', '.join(failed)} ({took:.1f}s)", file=sys.stderr)
        return 1
    where = "nothing written" if args.quick else f"see {BENCHMARKS_MD}"
    print(f"all benchmarks done in {took:.1f}s; {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
