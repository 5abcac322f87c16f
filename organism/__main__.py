"""`python -m organism ...`: the organism command on its own."""

import sys

from .cli import main

sys.exit(main())
