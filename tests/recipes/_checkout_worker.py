"""Run `recipes.checkout.main` in a child process, nodekit's waits made instant.

    python tests/recipes/_checkout_worker.py --api-url URL --data-dir DIR --orders N ...

The crash test SIGKILLs this process mid-batch, then runs it again with the same arguments.
"""

from __future__ import annotations

import sys

from nodekit.testing import instant
from recipes import checkout

if __name__ == "__main__":
    with instant():
        raise SystemExit(checkout.main(sys.argv[1:]))
