#!/usr/bin/env python
"""Paper-layout tables from run records (same as the ``adamerge-tables`` command).

    python scripts/make_tables.py results/raw/demo.jsonl --out results/tables/demo
"""

import sys

from adamerge.results.tables import main

if __name__ == "__main__":
    sys.exit(main())
