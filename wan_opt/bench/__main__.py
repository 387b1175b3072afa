"""`python -m wan_opt.bench`."""
import sys

from wan_opt.bench.measure import main

sys.exit(main())
