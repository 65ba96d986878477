import sys

from exaflop.cli import main

sys.exit(main())
