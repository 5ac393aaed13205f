"""`python -m corexp.report`: the paper-style tables (corexp.report.tables)."""

import sys

from corexp.report.tables import main

sys.exit(main())
