"""Runnable programs that compose nodekit nodes for real API, database and file work.

Each recipe is a module: ``python -m recipes.<name> --help``. With no flags it runs on
embedded defaults — SQLite in ``demo-data/`` and the demo shop API (`recipes._demo_api`, a
`nodekit.testing.LocalAPI` with the shop's routes) on a loopback port — and takes a real API
base URL and database URL by flag.
"""
