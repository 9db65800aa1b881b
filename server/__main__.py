"""`python -m server ...` is the `credits` command."""

import sys

from server.cli import main

sys.exit(main())
