"""``python -m fused_dropout [--build]``: the environment report for bug reports
(fused_dropout/_loader/report.py)."""

import sys

from fused_dropout._loader import report

sys.exit(report.main())
