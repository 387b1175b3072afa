"""GPU kernels in Triton and Gluon, each behind a launcher that takes PyTorch tensors.

Imported only where they run (a CUDA device, or Triton's interpreter in the tests): the rest of wan-opt
calls them through wan_opt.optim. Each has a reference in PyTorch that its tests compare it with.
"""
