"""`python -m wan_opt.serve [DIR ...]`: the same as `wan-opt serve`."""
import sys

from wan_opt.serve.command import main

if __name__ == "__main__":
    sys.exit(main())
