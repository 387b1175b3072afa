"""Speed: the speed policy (kernels, compilation, guidance scheduling), attention processors, fp8 linears
and the step caches. Nothing here changes where weights live; that is wan_opt.memory's.
"""
