"""The Triton kernels behind wan_opt.optim.fp8_attention.quantize_qkv on a GPU (imported only there, or by its tests).

Two passes over V, one over Q and K, each element read where it lies in diffusers' (B, N, H, D) layout:
- statistics: per (batch, head) and chunk of tokens, V's column sums, maxima and minima. From them, V's mean over
  the tokens (its smoothing) and the largest magnitude of the smoothed V (max(max - mean, mean - min) per
  channel) come without a second pass over V;
- quantisation: per 128 tokens, Q and K copied as bf16 into (B, H, n_pad, D); V smoothed, scaled per channel,
  rounded to int8 and transposed to (D, tokens), its keys in the Hopper kernel's MMA order if asked; and, per
  channel, the sum of what the rounding took, from which the mean added back to the output is corrected.
torch.compile's fusion of the same PyTorch arithmetic re-reads and recomputes the norms and rotary embedding
before it in each of its reductions.
"""
import torch
import triton
import triton.language as tl

from wan_opt.kernels import e4m3

ROUND_MAGIC = tl.constexpr(e4m3.ROUND_MAGIC)  # Globals a kernel reads must be constexpr.
ROUND_MAGIC_BITS = tl.constexpr(e4m3.ROUND_MAGIC_BITS)
CHUNK = 1024  # tokens per statistics program: 74 x 40 heads of them at 720p
TILE = 128  # tokens per quantisation program: fp8_attention.PAD


@triton.jit
def round_small(x):
    """x rounded to the nearest integer (ties to even), as an int32, for |x| < 2^22 (e4m3.ROUND_MAGIC): one add
    and one integer add, no conversion unit."""
    return (x + ROUND_MAGIC).to(tl.int32, bitcast=True) - ROUND_MAGIC_BITS


@triton.jit
def v_stats_kernel(V, STATS, n_ctx, n_heads, n_chunks, stride_b, stride_n, stride_h, CHUNK: tl.constexpr,
                   D: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, D)
    base = (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads) * stride_h
    v_sum = tl.zeros([D], tl.float32)
    v_max = tl.full([D], float("-inf"), tl.float32)
    v_min = tl.full([D], float("inf"), tl.float32)
    for start in range(0, CHUNK, 64):
        offs_n = chunk * CHUNK + start + tl.arange(0, 64)
        mask = (offs_n < n_ctx)[:, None]
        v = tl.load(V + base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        v_sum += tl.sum(v, 0)
        v_max = tl.maximum(v_max, tl.max(tl.where(mask, v, float("-inf")), 0))
        v_min = tl.minimum(v_min, tl.min(tl.where(mask, v, float("inf")), 0))
    out = STATS + (bh * n_chunks + chunk).to(tl.int64) * 3 * D + offs_d
    tl.store(out, v_sum)
    tl.store(out + D, v_max)
    tl.store(out + 2 * D, v_min)


@triton.jit
def qkv_quant_kernel(Q, K, V, V_MEAN, V_INV, QO, KO, VT8, V_RESIDUAL, n_ctx, n_pad, n_heads, stride_b, stride_n,
                     stride_h, D: tl.constexpr, MMA_ORDER: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = blk * 128 + tl.arange(0, 128)
    offs_d = tl.arange(0, D)
    mask = (offs_n < n_ctx)[:, None]
    src = ((bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads) * stride_h
           + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :])
    dst = (bh.to(tl.int64) * n_pad + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(QO + dst, tl.load(Q + src, mask=mask, other=0.0).to(QO.dtype.element_ty))  # padded tokens: zero
    tl.store(KO + dst, tl.load(K + src, mask=mask, other=0.0).to(KO.dtype.element_ty))

    v = tl.load(V + src, mask=mask, other=0.0).to(tl.float32) - tl.load(V_MEAN + bh * D + offs_d)[None, :]
    v = tl.where(mask, v, 0.0) * tl.load(V_INV + bh * D + offs_d)[None, :]
    v8 = round_small(v)
    # What the rounding took from each channel, summed: the attention's mean of V is corrected by it
    tl.store(V_RESIDUAL + (bh * (n_pad // 128) + blk).to(tl.int64) * D + offs_d, tl.sum(v - v8.to(tl.float32), 0))
    if MMA_ORDER:  # key 16h + 8a + 2t + b of every 32 to 16h + 4t + 2a + b (fp8_attention.mma_key_order)
        v8 = tl.reshape(tl.permute(tl.reshape(v8, [4, 2, 2, 4, 2, D]), [0, 1, 3, 2, 4, 5]), [128, D])
    vt_dst = (bh.to(tl.int64) * D + offs_d[:, None]) * n_pad + blk * 128 + tl.arange(0, 128)[None, :]
    tl.store(VT8 + vt_dst, tl.trans(v8).to(tl.int8))


def launch(query, key, value, n_pad: int, mma_order: bool, wrap=None):
    """quantize_qkv's operands: Q and K in bf16 and (B, H, n_pad, D); V^T in int8, (B, H, D, n_pad), smoothed by
    its mean over the tokens and scaled per channel; V's channel scales and the means to add back, (B, H, D) each
    (the mean of V less the mean of its rounded values, so that the two agree).
    wrap: torch.library.wrap_triton, for torch.compile to trace the launches."""
    wrap = wrap or (lambda kernel: kernel)
    b, n, h, d = query.shape
    if query.stride(-1) != 1 or key.stride() != query.stride() or value.stride() != query.stride():
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    strides = (query.stride(0), query.stride(1), query.stride(2))
    chunks = triton.cdiv(n, CHUNK)
    stats = torch.empty(b * h, chunks, 3, d, dtype=torch.float32, device=query.device)
    wrap(v_stats_kernel)[(chunks, b * h)](value, stats, n, h, chunks, *strides, CHUNK=CHUNK, D=d)
    v_mean = stats[:, :, 0].sum(1) / n
    v_scale = e4m3.scale_for(torch.maximum(stats[:, :, 1].amax(1) - v_mean, v_mean - stats[:, :, 2].amin(1)),
                             e4m3.INT8_MAX)
    q16 = torch.empty(b, h, n_pad, d, dtype=torch.bfloat16, device=query.device)
    k16 = torch.empty_like(q16)
    vt8 = torch.empty(b, h, d, n_pad, dtype=torch.int8, device=query.device)
    residual = torch.empty(b * h, n_pad // TILE, d, dtype=torch.float32, device=query.device)
    wrap(qkv_quant_kernel)[(n_pad // TILE, b * h)](query, key, value, v_mean, 1.0 / v_scale, q16, k16, vt8, residual,
                                                  n, n_pad, h, *strides, D=d, MMA_ORDER=mma_order, num_warps=8)
    v_mean = v_mean + v_scale * (residual.sum(1) / n)
    return q16, k16, vt8, v_scale.view(b, h, d), v_mean.view(b, h, d)


@torch.library.triton_op("wan_opt::quantize_qkv", mutates_args=())
def quantize_qkv_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_pad: int,
                    mma_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    return launch(query, key, value, n_pad, mma_order, wrap=wrap_triton)
