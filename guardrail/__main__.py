"""`python -m guardrail ...` is the `guardrail` command (for environments without the script on PATH)."""

import sys

from guardrail.cli import main

sys.exit(main())
