"""`python -m convrewrite ...` is the `convrewrite` command."""

import sys

from .cli import main

sys.exit(main())
