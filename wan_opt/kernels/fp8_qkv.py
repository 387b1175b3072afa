"""The Triton kernels behind wan_opt.optim.fp8_attention.quantize_qkv on a GPU (imported only there, or by its tests).

Two passes over K and V, one over Q, each element read where it lies in diffusers' (B, N, H, D) layout:
- statistics: per (batch, head) and chunk of tokens, K's column sums, maxima and minima and V's column
  magnitudes. From them, K's mean over the tokens (its smoothing) and the largest magnitude of the smoothed K
  (max(max - mean, mean - min) over the channels) come without a second pass over K;
- quantisation: per 128 tokens, Q with one scale per 64 tokens, K smoothed and scaled, V scaled per channel
  and transposed to (D, tokens), its keys in the Hopper kernel's MMA order if asked, all written as e4m3.
torch.compile's fusion of the same PyTorch arithmetic re-reads and recomputes the norms and rotary embedding
before it in each of its reductions.
"""
import torch
import triton
import triton.language as tl

from wan_opt.kernels import e4m3

FP8_MAX = tl.constexpr(e4m3.FP8_MAX)  # Globals a kernel reads must be constexpr.
MIN_SCALE = tl.constexpr(e4m3.MIN_SCALE)
CHUNK = 1024  # tokens per statistics program: 74 x 40 heads of them at 720p
TILE = 128  # tokens per quantisation program: fp8_attention.PAD, two query scale blocks


@triton.jit
def kv_stats_kernel(K, V, STATS, n_ctx, n_heads, n_chunks, stride_b, stride_n, stride_h,
                    CHUNK: tl.constexpr, D: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, D)
    base = (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads) * stride_h
    k_sum = tl.zeros([D], tl.float32)
    k_max = tl.full([D], float("-inf"), tl.float32)
    k_min = tl.full([D], float("inf"), tl.float32)
    v_amax = tl.zeros([D], tl.float32)
    for start in range(0, CHUNK, 64):
        offs_n = chunk * CHUNK + start + tl.arange(0, 64)
        mask = (offs_n < n_ctx)[:, None]
        pointers = base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :]
        k = tl.load(K + pointers, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + pointers, mask=mask, other=0.0).to(tl.float32)
        k_sum += tl.sum(k, 0)
        k_max = tl.maximum(k_max, tl.max(tl.where(mask, k, float("-inf")), 0))
        k_min = tl.minimum(k_min, tl.min(tl.where(mask, k, float("inf")), 0))
        v_amax = tl.maximum(v_amax, tl.max(tl.abs(v), 0))
    out = STATS + (bh * n_chunks + chunk).to(tl.int64) * 4 * D + offs_d
    tl.store(out, k_sum)
    tl.store(out + D, k_max)
    tl.store(out + 2 * D, k_min)
    tl.store(out + 3 * D, v_amax)


@triton.jit
def _e4m3(x, OUT):
    return tl.clamp(x, -FP8_MAX, FP8_MAX).to(OUT.dtype.element_ty)


@triton.jit
def qkv_quant_kernel(Q, K, V, K_MEAN, K_INV, V_INV, Q8, K8, VT8, Q_SCALE, n_ctx, n_pad, n_heads, stride_b,
                     stride_n, stride_h, D: tl.constexpr, MMA_ORDER: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = blk * 128 + tl.arange(0, 128)
    offs_d = tl.arange(0, D)
    mask = (offs_n < n_ctx)[:, None]
    src = ((bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads) * stride_h
           + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :])
    dst = (bh.to(tl.int64) * n_pad + offs_n[:, None]) * D + offs_d[None, :]

    q = tl.reshape(tl.load(Q + src, mask=mask, other=0.0).to(tl.float32), [2, 64, D])
    q_scale = tl.maximum(tl.max(tl.max(tl.abs(q), 2), 1) / FP8_MAX, MIN_SCALE)  # one per 64 tokens
    tl.store(Q8 + dst, _e4m3(tl.reshape(q * (1.0 / q_scale)[:, None, None], [128, D]), Q8))
    tl.store(Q_SCALE + bh.to(tl.int64) * (n_pad // 64) + blk * 2 + tl.arange(0, 2), q_scale)

    k = tl.load(K + src, mask=mask, other=0.0).to(tl.float32) - tl.load(K_MEAN + bh * D + offs_d)[None, :]
    tl.store(K8 + dst, _e4m3(tl.where(mask, k, 0.0) * tl.load(K_INV + bh), K8))  # padded keys: zero, masked

    v = tl.load(V + src, mask=mask, other=0.0).to(tl.float32) * tl.load(V_INV + bh * D + offs_d)[None, :]
    if MMA_ORDER:  # key 16h + 8a + 2t + b of every 32 to 16h + 4t + 2a + b (fp8_attention.mma_key_order)
        v = tl.reshape(tl.permute(tl.reshape(v, [4, 2, 2, 4, 2, D]), [0, 1, 3, 2, 4, 5]), [128, D])
    vt_dst = (bh.to(tl.int64) * D + offs_d[:, None]) * n_pad + blk * 128 + tl.arange(0, 128)[None, :]
    tl.store(VT8 + vt_dst, _e4m3(tl.trans(v), VT8))


def launch(query, key, value, n_pad: int, mma_order: bool, dtype: torch.dtype = torch.float8_e4m3fn, wrap=None):
    """quantize_qkv's operands, in `dtype` (e4m3; float32 shows the tests the values before rounding): Q, K, V^T
    and the scales of Q's 64-token blocks (B, H, n_pad / 64), of K (B, H, 1) and of V's channels (B, H, D).
    wrap: torch.library.wrap_triton, for torch.compile to trace the launches."""
    wrap = wrap or (lambda kernel: kernel)
    b, n, h, d = query.shape
    if query.stride(-1) != 1 or key.stride() != query.stride() or value.stride() != query.stride():
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    strides = (query.stride(0), query.stride(1), query.stride(2))
    chunks = triton.cdiv(n, CHUNK)
    stats = torch.empty(b * h, chunks, 4, d, dtype=torch.float32, device=query.device)
    wrap(kv_stats_kernel)[(chunks, b * h)](key, value, stats, n, h, chunks, *strides, CHUNK=CHUNK, D=d)
    k_mean = stats[:, :, 0].sum(1) / n
    k_amax = torch.maximum(stats[:, :, 1].amax(1) - k_mean, k_mean - stats[:, :, 2].amin(1)).amax(1)
    k_scale = e4m3.scale_for(k_amax)
    v_scale = e4m3.scale_for(stats[:, :, 3].amax(1))
    q8 = torch.empty(b, h, n_pad, d, dtype=dtype, device=query.device)
    k8 = torch.empty_like(q8)
    vt8 = torch.empty(b, h, d, n_pad, dtype=dtype, device=query.device)
    q_scale = torch.empty(b, h, n_pad // 64, dtype=torch.float32, device=query.device)
    wrap(qkv_quant_kernel)[(n_pad // TILE, b * h)](query, key, value, k_mean, 1.0 / k_scale, 1.0 / v_scale, q8, k8,
                                                  vt8, q_scale, n, n_pad, h, *strides, D=d, MMA_ORDER=mma_order,
                                                  num_warps=8)
    return q8, k8, vt8, q_scale, k_scale.view(b, h, 1), v_scale.view(b, h, d)


@torch.library.triton_op("wan_opt::quantize_qkv", mutates_args=())
def quantize_qkv_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_pad: int,
                    mma_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    from torch.library import wrap_triton

    return launch(query, key, value, n_pad, mma_order, wrap=wrap_triton)
