"""Self-attention kernels run back to back for some seconds, with the GPU's SM clock and power draw read by NVML
meanwhile: whether a kernel is held back by the card's power limit rather than by its own schedule.

Each kernel (bf16 SDPA, which is cuDNN on Hopper; wan-opt's fp8 attention with its quantisation of Q, K and V;
FlashAttention-4 where flash-attn-4 is installed) runs at A14B's shape on two kinds of input: random normal
values, as the random-weight benchmarks feed it, and near-constant ones (1 plus 1% noise), whose bits toggle
less in the tensor cores. A kernel at the power limit runs faster on the second at a higher clock; one bound
by its schedule runs at the same speed on both.

    python benchmarks/attention_power.py --tokens 75600 --seconds 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pynvml
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402  (this folder)
from wan_opt.optim.attention import flash4_attention, flash4_available  # noqa: E402
from wan_opt.optim.fp8_attention import fp8_attention  # noqa: E402

INPUTS = {"random": lambda t: t, "near_constant": lambda t: 1 + 0.01 * t}


class NvmlSampler:
    """SM clock (MHz), power (W) and temperature (C) of one GPU every `period` seconds, on a thread."""

    def __init__(self, index: int = 0, period: float = 0.05):
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM),
                                 pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000,
                                 pynvml.nvmlDeviceGetTemperature(self.handle, pynvml.NVML_TEMPERATURE_GPU)))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def medians(self, skip: int) -> dict:
        """Medians after the first `skip` samples (the clock settles once the power limit is reached)."""
        kept = self.samples[skip:] or self.samples
        return {"sm_mhz": statistics.median(s[0] for s in kept), "watts": round(statistics.median(s[1] for s in kept), 1),
                "temperature_c": statistics.median(s[2] for s in kept), "samples": len(kept)}


def sustained(fn, seconds: float, flop: float) -> dict:
    """fn back to back for `seconds`; its mean time and TFLOP/s with the clock and power meanwhile."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, began = 0, time.perf_counter()
    with NvmlSampler() as sampler:
        start.record()
        while time.perf_counter() - began < seconds:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            calls += 5
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / calls
    return {"ms": round(ms, 2), "tflops": round(flop / ms / 1e9, 1), **sampler.medians(skip=int(1 / sampler.period))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[75_600])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each kernel runs")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    record = gpu_report(power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
                        max_sm_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM), runs=[])
    for n in args.tokens:
        flop = 4 * n * n * args.head_dim * args.heads
        gen = torch.Generator(device="cuda").manual_seed(0)
        noise = [torch.randn(1, n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                 for _ in range(3)]
        for inputs, make in INPUTS.items():
            q, k, v = (make(t) for t in noise)
            kernels = {"sdpa_bf16": lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))),
                       "fp8_with_quantisation": lambda: fp8_attention(q, k, v)}
            if flash4_available():
                kernels["flash4_bf16"] = lambda: flash4_attention(q, k, v)
            for name, fn in kernels.items():
                run = {"tokens": n, "inputs": inputs, "kernel": name, **sustained(fn, args.seconds, flop)}
                record["runs"].append(run)
                print(json.dumps(run), flush=True)
    pynvml.nvmlShutdown()
    write_report(record, Path(args.out) / gpu_file_name("attention_power", record))


if __name__ == "__main__":
    main()
