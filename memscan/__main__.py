"""``python -m memscan`` runs the CLI."""

import sys

from memscan.cli import main

sys.exit(main())
