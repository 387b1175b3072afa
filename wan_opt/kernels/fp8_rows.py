"""The Triton kernel behind wan_opt.optim.fp8.quantize_activations (imported only on a GPU run, or by its tests).

One program quantises one row (token) whole: the row is read once into registers, its largest magnitude found
there, and written once as e4m3 with its scale. torch.compile's own fusion of the same arithmetic loops over a
row twice (once for the maximum, once to scale), recomputing what precedes it each time: for the GELU before
the feed-forward's output layer (13,824 values a token) that is compute-bound.
"""
import torch
import triton
import triton.language as tl

from wan_opt.kernels import e4m3

FP8_MAX = tl.constexpr(e4m3.FP8_MAX)  # Globals a kernel reads must be constexpr.
MIN_SCALE = tl.constexpr(e4m3.MIN_SCALE)


@triton.jit
def quantize_rows_kernel(X, Q, SCALE, n_cols, stride_x, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # tanh-approximated GELU, as diffusers' FeedForward applies it (gelu(0) = 0 keeps the padding zero)
        # 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), with u = sqrt(2 / pi) (x + 0.044715 x^3)
        x = x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x * (1.0 / scale), -FP8_MAX, FP8_MAX)
    tl.store(Q + row * n_cols + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(SCALE + row, scale)


@torch.library.triton_op("wan_opt::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor's rows in e4m3 and their float32 scales, (rows, 1); `gelu`: of GELU(x) instead."""
    from torch.library import wrap_triton

    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel reads each row as contiguous
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    # 32 values a thread: 5,120-wide rows on 8 warps, 13,824-wide on 16
    wrap_triton(quantize_rows_kernel)[(rows,)](x, q, scale, cols, x.stride(0), GELU=gelu, BLOCK=block,
                                               num_warps=max(4, min(16, block // 1024)))
    return q, scale
