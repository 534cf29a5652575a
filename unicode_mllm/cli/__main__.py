"""`python -m unicode_mllm.cli ...` (and `accelerate launch -m unicode_mllm.cli ...`): the console script."""

import sys

from unicode_mllm.cli import main

sys.exit(main())
