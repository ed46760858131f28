"""`python -m serving CONFIG.yaml [--port N] [--set k=v]` (for `ray job submit`)."""

import sys

from serving.run import main

sys.exit(main())
