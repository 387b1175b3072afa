"""wan-opt's command line in a checkout: `python run.py prompt="..."` (the installed command is `wan-opt`)."""
from wan_opt.cli import main

if __name__ == "__main__":
    main()
