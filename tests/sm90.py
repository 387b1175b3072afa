"""Compiling kernels for Hopper (sm_90) on a machine without a GPU: Triton's compiler and ptxas run anywhere, so
layouts, instruction choices, shared memory and register spills are checked before a GPU run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Compiles attention_hopper_kernel for one V (int8 V^T: mode=fast's; bf16 V: the exact kernel's) in one schedule
# (attention_hopper.SCHEDULES), and prints its wgmma instructions, its shared memory, ptxas' spill report and, from
# the machine code, the most exponentials found between a wait for all but the last MMA group and the next wait,
# one JSON line.
GLUON_ATTENTION = """
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from wan_opt.kernels import attention_hopper as hopper

int8_pv = sys.argv[1] == "int8"
schedule = sys.argv[2]
if int8_pv:
    q, vt = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16), torch.empty(1, 2, 128, 256, dtype=torch.int8)
    descriptors = hopper.fp8_descriptors(q, q, vt)
    scales = dict(V_SCALE="*fp32", V_MEAN="*fp32"), {}
else:
    x = torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
    descriptors = hopper.rows_descriptors(x, x, x)
    scales = dict(V_SCALE="constexpr", V_MEAN="constexpr"), dict(V_SCALE=None, V_MEAN=None)
types = dict(zip(["q_desc", "k_desc", "v_desc"], map(mangle_type, descriptors)))
types.update(scales[0], OUT="*bf16", n_ctx="i32", n_heads="i32", n_pad="i32", stride_ob="i32", stride_on="i32",
             stride_oh="i32", HEAD_DIM="constexpr", QK_SCALE="constexpr", BLOCK_N="constexpr", STAGES="constexpr",
             CONSUMER_REGS="constexpr", SCHEDULE="constexpr")
constants = dict(HEAD_DIM=128, QK_SCALE=0.1275, BLOCK_N=hopper.BLOCK_N, STAGES=hopper.STAGES,
                 CONSUMER_REGS=hopper.CONSUMER_REGS, SCHEDULE=schedule, **scales[1])
kernel = triton.compile(GluonASTSource(hopper.attention_hopper_kernel, types, constants),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
ptx = kernel.asm["ptx"]
with tempfile.TemporaryDirectory() as folder:
    source, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
    with open(source, "w") as file:
        file.write(ptx)
    ptxas = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", source, "-o", cubin],
                           capture_output=True, text=True, check=True).stderr
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
spills = [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", ptxas)]
between, counting = 0, None  # exponentials after a WARPGROUP.DEPBAR.LE gsb0, 0x1, before the next DEPBAR
for line in sass.splitlines():
    if "WARPGROUP.DEPBAR" in line:
        counting = 0 if "0x1" in line.split("gsb0")[-1] else None
    elif counting is not None and "MUFU.EX2" in line:
        counting += 1
        between = max(between, counting)
print(json.dumps(dict(wgmma=sorted(set(re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.(\\S+?);?\\s", ptx))),
                      int_to_float="cvt.rn.f32.s32" in ptx, shared=kernel.metadata.shared, spills=sum(spills),
                      exponentials_between_waits=between)))
"""

SHARED_MEMORY = 227 * 1024  # what one block may take on Hopper


def compile_for_hopper(script: str, triton_path: str | None = None, args: tuple[str, ...] = ()) -> str:
    """Run a script that compiles kernels for sm_90, in a fresh process without Triton's CPU interpreter, on this
    checkout's wan_opt; returns its output. triton_path: a folder holding another Triton package, imported
    instead of the installed one."""
    if triton_path is None:
        pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend (ptxas ships with it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [triton_path] if triton_path else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(Path(__file__).resolve().parent.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def compile_gluon_attention(v: str, triton_path: str | None = None, schedule: str = "overlap") -> dict:
    """attention_hopper_kernel compiled for sm_90 with V in int8 ("int8") or bf16 ("bf16"), in one of its
    schedules: what GLUON_ATTENTION reports."""
    import json

    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    return json.loads(compile_for_hopper(GLUON_ATTENTION, triton_path, (v, schedule)).strip().splitlines()[-1])


OTHER_TRITONS = [p for p in os.environ.get("WAN_OPT_OTHER_TRITONS", "").split(os.pathsep) if p]
