"""The GPU benchmark: diffusers' WanPipeline (WanImageToVideoPipeline for image-to-video) as people run it today
against wan-opt profiles, in one process.

Builds the full-size architectures with random weights on the GPU (no checkpoint), runs the same request
(a few steps) under (a) diffusers' defaults and (b) each profile, and writes a JSON with seconds per CFG step
and per stage, achieved TFLOP/s, peak memory, the speedup over (a), and each profile's deviation from (a) on
the same inputs (one denoiser forward, and the decoded frames). Random weights say nothing of visual quality.
An image-to-video model (--model wan22_i2v_a14b) starts from a generated picture of the request's size.

A whole request is extrapolated from the measured stages; a run that runs its request's every step (--steps 40
for A14B, 4 for a distilled preset) and decodes also has it measured end to end. --baseline-steps keeps diffusers'
run short while the profiles run whole requests; --detach starts a run longer than a job may last in the
background, and --collect prints its result later.

    python -m wan_opt.bench --profiles h100 --size 1280*720 --frames 81 --steps 3
    python -m wan_opt.bench --profiles h100 h100,hardware.speed.cfg_truncation=0.25 --size 832*480
    python -m wan_opt.bench --model wan22_i2v_a14b --profiles h200 h200,mode=fast --steps 2
    python -m wan_opt.bench --profiles h200 h200,mode=fast --steps 40 --baseline-steps 2 --detach
    python -m wan_opt.bench --collect benchmarks/results    # 0: every result in, 1: a run ended without, 3: running
    python -m wan_opt.bench --tiny          # a CPU smoke of the same code path, seconds
"""
from wan_opt.bench.measure import forward_flops, main, reference_pipeline

__all__ = ["forward_flops", "main", "reference_pipeline"]
