"""`python -m entropix.cli`."""

import sys

from . import main

sys.exit(main())
