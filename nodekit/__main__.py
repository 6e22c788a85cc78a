"""`python -m nodekit`: the command line."""

from .cli import main

raise SystemExit(main())
