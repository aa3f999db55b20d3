"""`python -m mambadm.grid GRID.yaml ...`: the scaling grid's command; the grid itself is `mambadm.study.grid`."""
import sys

from mambadm.study.grid import main

if __name__ == "__main__":
    sys.exit(main())
