"""Test-session set-up that must come before any test module imports the libraries."""
import os

import torch

# Without a CUDA GPU, Triton kernels run in Triton's interpreter, on the CPU. Triton reads the switch when it is
# first imported (wan_opt's imports bring it in through torch._inductor), so it is set here, before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
