"""Side-by-side benchmarks of nodekit against the libraries users would pick instead.

Run them all with ``python -m benchmarks.run``; each module also runs alone
(``python -m benchmarks.bench_node``, ``--quick`` for a smoke run that writes nothing).
Every module owns one section of ``BENCHMARKS.md`` at the repository root.
"""
