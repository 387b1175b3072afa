#!/usr/bin/env bash
# The speed measurements of docs/measured.md on a Hopper GPU, in one go within BUDGET seconds (590 unless set),
# the steps in this order (STEPS selects some of them):
#   kernels  the exact Hopper kernel (attention=hopper) against cuDNN's bf16 attention, and the fp8 kernels, at
#            75,600 and 32,760 tokens (benchmarks/attention_kernels.py), after its GPU test;
#   schedules both Hopper kernels in each of their schedules (attention_hopper.SCHEDULES), timed in turn at the
#            same sizes (attention_kernels.py --schedules), after the GPU test that they agree to the bit;
#   schedule_step  the exact kernel's schedules `turns` and `turns+overlap` inside the lossless profile's 720p CFG
#            step, in turn in one process on the same modules (benchmarks/schedule_step.py);
#   lossless the lossless profile's 720p CFG step (auto: the exact Hopper kernel without FlashAttention-4) beside
#            the same on cuDNN, against diffusers' WanPipeline in the same run (python -m wan_opt.bench, 2 steps,
#            no decode);
#   pytest   the GPU tests of the decode and of the frames' conversion (tests/test_vae.py, tests/test_pipeline.py);
#   frames   benchmarks/host_frames.py on the GPU: the decoded 720p video to pixels, diffusers' way and wan-opt's;
#   decode   the 720p decode with hardware.speed.fuse_vae's modules beside the profiles' float16 decode, against the
#            exact float32 decode (benchmarks/vae_decode.py, A14B's and TI2V-5B's VAEs);
#   preset   the 4-step distilled preset's whole 720p request in fast and lossless mode under $PROFILE (h200 unless
#            set; h100 on an H100), against diffusers' WanPipeline in the same run (one step, extrapolated);
#   h100     the h100 profile's 720p plan (untiled float16 decode) under an 80 GB cap, 2 steps and the decode,
#            against the planner's prediction (benchmarks/full_size_e2e.py; on an H100 the cap is the card);
#   ti2v     TI2V-5B's whole 50-step 1280*704 x 121 request, lossless and fast, timed end to end, against diffusers'
#            WanPipeline (2 steps, extrapolated) in the same run.
# Results go to $OUT (benchmarks/results when unset), with this script's log, gpu_speed_check.log. A step that
# fails or is cut at what is left of the budget is reported and the next one runs. On an H200: kernels 110 s,
# lossless 260, pytest 20, frames 70, decode 170, preset about 210, ti2v about 240; h100 is estimated at 240.
#
#     OUT=/some/folder PROFILE=h200 STEPS="kernels pytest frames" bash benchmarks/gpu_speed_check.sh
#     OUT=/some/folder PROFILE=h200 STEPS="lossless decode" bash benchmarks/gpu_speed_check.sh
#     OUT=/some/folder PROFILE=h200 STEPS="preset h100" bash benchmarks/gpu_speed_check.sh
#     OUT=/some/folder PROFILE=h200 STEPS="ti2v" bash benchmarks/gpu_speed_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-590}
PROFILE=${PROFILE:-h200}
STEPS=${STEPS:-kernels schedules schedule_step lossless pytest frames decode preset h100 ti2v}
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
LOG="$OUT/gpu_speed_check.log"
exec > >(tee "$LOG") 2>&1
source benchmarks/budget.sh
header

wanted() { [[ " $STEPS " == *" $1 "* ]]; }
PRESET=$PROFILE,model=wan22_t2v_a14b_lightning

wanted kernels && step kernels 150 bash -c "$PY -m pytest -q -m gpu tests/test_gpu.py -k exact_hopper \
    -o cache_dir=/tmp/wan_opt_pytest_cache --junitxml=$OUT/pytest_exact.xml; \
    $PY benchmarks/attention_kernels.py --tokens 75600 32760 --heads 40 --repeat 5 --suffix _exact --out $OUT"
wanted schedules && step schedules 240 bash -c "$PY -m pytest -q -m gpu tests/test_gpu.py -k schedule \
    -o cache_dir=/tmp/wan_opt_pytest_cache --junitxml=$OUT/pytest_schedules.xml; \
    $PY benchmarks/attention_kernels.py --tokens 75600 32760 --heads 40 --repeat 5 --schedules \
    --suffix _schedules --out $OUT"
wanted schedule_step && step schedule_step 300 $PY benchmarks/schedule_step.py --profile "$PROFILE" \
    --schedules turns turns+overlap --rounds 2 --out "$OUT"
wanted lossless && step lossless 400 $PY -m wan_opt.bench --profiles "$PROFILE" "$PROFILE,hardware.speed.attention=cudnn" \
    --size 1280*720 --frames 81 --steps 2 --no-decode --out "$OUT"
wanted pytest && step pytest 150 $PY -m pytest -q -m gpu tests/test_vae.py tests/test_pipeline.py \
    -o cache_dir=/tmp/wan_opt_pytest_cache --junitxml="$OUT/pytest_speed.xml"
wanted frames && step frames 90 $PY benchmarks/host_frames.py --device cuda --out "$OUT"
wanted decode && step decode 420 $PY benchmarks/vae_decode.py --families t2v_a14b ti2v_5b --variants 11 12 13 \
    --suffix _fused --out "$OUT"
wanted preset && step preset 480 $PY -m wan_opt.bench --profiles "$PRESET,mode=fast" "$PRESET" --size 1280*720 \
    --frames 81 --steps 4 --baseline-steps 1 --out "$OUT"
wanted ti2v && step ti2v 560 $PY -m wan_opt.bench --model wan22_ti2v_5b --profiles "$PROFILE" "$PROFILE,mode=fast" \
    --size 1280*704 --frames 121 --steps 50 --baseline-steps 2 --out "$OUT"
wanted h100 && step h100 240 $PY benchmarks/full_size_e2e.py --profile h100 --cap-gb 80 --sizes 1280*720 \
    --frames 81 --steps 2 --out "$OUT"

echo "=== summary"
for name in $STEPS; do
    echo "$name: ${STATUS[$name]:-not run}"
done
ls -la "$OUT"
sleep 1  # the log's tee, to finish writing
