"""wan-opt's command line: `python run.py prompt="..."` (see README.md)."""
import sys

import hydra
from omegaconf import DictConfig

import wan_opt.config  # noqa: F401  (registers the schema before Hydra composes)
from wan_opt.app import run, with_detected_hardware


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    status = run(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    sys.argv = with_detected_hardware(sys.argv)
    main()
