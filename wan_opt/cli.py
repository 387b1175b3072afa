"""The `wan-opt` command (and run.py in a checkout): detect the profile, then hand Hydra's config to app.run.

    wan-opt prompt="a red fox"                      # profile detected for this machine's GPU
    wan-opt --config-dir ~/my-conf hardware=my_gpu  # a profile of your own, kept outside the package
    wan-opt serve multirun/                         # a local page over the runs (the `web` extra)
"""
import logging
import os
import sys

import hydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig

from wan_opt import interrupts
from wan_opt.app import run, with_detected_hardware
from wan_opt.checks import check_command_line
from wan_opt.config import CONF_DIR
from wan_opt.errors import WanOptError, config_error_sentence


# Ranks other than 0 of a torchrun group compute but write nothing: no run folder, no log file.
_SILENT_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]


def run_folder_sentence(error: BaseException) -> str | None:
    """The sentence for Hydra failing to make or write its run folder (the OSError, perhaps wrapped by
    logging's set-up of the log file); None for any other error."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    folder = "hydra.sweep.dir" if {"-m", "--multirun"} & set(sys.argv) else "hydra.run.dir"
    return (f"Cannot write the run folder ({error.filename or 'its files'}: {error.strerror or error}): "
            f"pass {folder}= a writable folder with free space.")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:  # `wan-opt serve [DIR ...]`: the page over the runs (wan_opt.serve), not a run
        from wan_opt.serve.command import main as serve

        sys.exit(serve(sys.argv[2:]))
    interrupts.exit_at_once()  # until Hydra starts: nothing is written yet, so a signal just ends the command
    logging.raiseExceptions = False  # a full disk under the log file: the writer that hits it says so, once
    try:
        check_command_line(sys.argv[1:])  # before Hydra builds anything a config names
    except WanOptError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.argv, detected = with_detected_hardware(sys.argv)
    in_job = False  # Hydra makes and writes the run folder outside the job function

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> None:
        nonlocal in_job
        in_job = True
        status = run(cfg, detected)
        in_job = False  # only on a normal return: an error that left the job function is the job's
        if status:
            sys.exit(status)

    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += _SILENT_RANK
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises a config error instead of printing it: one sentence below
    interrupts.install()
    try:
        _main()
    except (ConfigCompositionException, OverrideParseException) as error:
        if wants_traceback:
            raise
        print(f"error: {config_error_sentence(error)}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as error:
        sentence = None if in_job or wants_traceback else run_folder_sentence(error)
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM, after every clean-up on the way out ran
        line, status = interrupts.exit_line(interrupt)
        if int(os.environ.get("RANK", 0)) == 0:
            print(line, file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
