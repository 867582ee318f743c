"""`python -m lowbit.cli ...`, the same as `lowbit ...`."""

import sys

from lowbit.cli.app import main

sys.exit(main())
