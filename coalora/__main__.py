"""`python -m coalora`: the command line (coalora.cli)."""

import sys

from coalora.cli import main

sys.exit(main())
