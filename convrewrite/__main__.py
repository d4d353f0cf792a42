"""`python -m convrewrite ...` is the `convrewrite` command."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while starting: one line, like every other error of the command
    sys.stderr.write("convrewrite: error: interrupted; no output was written\n")
    sys.exit(130)

sys.exit(main())
