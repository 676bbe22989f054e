"""``python -m mimkit`` (also what ``torchrun -m mimkit`` runs)."""

import sys

from mimkit.cli import main

sys.exit(main())
