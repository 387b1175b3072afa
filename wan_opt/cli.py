"""The `wan-opt` command (and run.py in a checkout): detect the profile, then hand Hydra's config to app.run.

    wan-opt prompt="a red fox"                      # profile detected for this machine's GPU
    wan-opt --config-dir ~/my-conf hardware=my_gpu  # a profile of your own, kept outside the package
"""
import sys

import hydra
from omegaconf import DictConfig

from wan_opt.app import run, with_detected_hardware
from wan_opt.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    status = run(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    sys.argv = with_detected_hardware(sys.argv)
    _main()


if __name__ == "__main__":
    main()
