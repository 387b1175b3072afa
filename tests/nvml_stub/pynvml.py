"""Stands in for pynvml in CLI subprocess tests: put this folder first on PYTHONPATH, describe the cards in
WAN_OPT_FAKE_NVML (see tests/fakes.py)."""
import sys

from tests.fakes import from_environment

sys.modules[__name__] = from_environment()
