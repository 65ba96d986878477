"""`python -m exaflop.plan ...` == `exaflop plan ...` (useful before the main CLI is installed)."""

import sys

from exaflop.plan.cli import main

sys.exit(main())
