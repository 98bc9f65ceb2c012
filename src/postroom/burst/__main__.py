"""``python -m postroom.burst FILE.pdf …`` runs ``postroom burst``."""

from __future__ import annotations

import sys

from postroom.burst.cli import main

if __name__ == "__main__":
    sys.exit(main())
