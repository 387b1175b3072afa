"""The `wan-opt` command (and run.py in a checkout): detect the profile, then hand Hydra's config to app.run.

    wan-opt prompt="a red fox"                      # profile detected for this machine's GPU
    wan-opt --config-dir ~/my-conf hardware=my_gpu  # a profile of your own, kept outside the package
"""
import os
import sys

import hydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig

from wan_opt.app import run, with_detected_hardware
from wan_opt.config import CONF_DIR
from wan_opt.errors import config_error_sentence


# Ranks other than 0 of a torchrun group compute but write nothing: no run folder, no log file.
_SILENT_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]


def main() -> None:
    sys.argv, detected = with_detected_hardware(sys.argv)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> None:
        status = run(cfg, detected)
        if status:
            sys.exit(status)

    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += _SILENT_RANK
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises a config error instead of printing it: one sentence below
    try:
        _main()
    except (ConfigCompositionException, OverrideParseException) as error:
        if wants_traceback:
            raise
        print(f"error: {config_error_sentence(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
