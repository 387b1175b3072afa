"""The Triton kernel behind wan_opt.optim.attention.norm_and_rotate on a GPU (imported only there, or by its tests).

Wan normalises Q and K over all heads of a token (an RMSNorm as wide as the model, 5,120 in A14B) and then
rotates each head's interleaved pairs by the token's rotary angles. One program does both for one token of Q
or K: the row is read once into registers, its mean square taken there, and written once, normalised and
rotated, in fp32 arithmetic with one rounding at the end. It is bound by memory bandwidth, where torch.compile's
fusion of diffusers' code re-reads the row (docs/kernels.md, 'Q/K norm and rotary embedding'; measured in
docs/measured.md, 'Q/K norm and rope').
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rotate_row(X, W, COS, SIN, OUT, row, token, stride_b, stride_n, stride_c, n_tokens, eps,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]  # the heads padded to a power of two, masked
    offs = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < HEADS
    x = tl.load(X + (row // n_tokens) * stride_b + token * stride_n + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    rms = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (HEADS * HEAD_DIM) + eps)
    x1, x2 = tl.split(tl.reshape(x * rms * w, [BLOCK_H, HEAD_DIM // 2, 2]))
    pair = 2 * tl.arange(0, HEAD_DIM // 2)[None, :]  # diffusers' angles come repeated per pair: cos[0::2], sin[1::2]
    cos = tl.load(COS + token * stride_c + pair).to(tl.float32)
    sin = tl.load(SIN + token * stride_c + pair + 1).to(tl.float32)
    y = tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), [BLOCK_H, HEAD_DIM])
    tl.store(OUT + row * (HEADS * HEAD_DIM) + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_rope_kernel(Q, K, WQ, WK, COS, SIN, QO, KO, n_tokens, stride_qb, stride_qn, stride_kb, stride_kn,
                        stride_c, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # batch * n_tokens + token
    token = row % n_tokens
    if tl.program_id(1) == 0:
        _norm_rotate_row(Q, WQ, COS, SIN, QO, row, token, stride_qb, stride_qn, stride_c, n_tokens, eps, HEADS,
                         HEAD_DIM, BLOCK_H)
    else:
        _norm_rotate_row(K, WK, COS, SIN, KO, row, token, stride_kb, stride_kn, stride_c, n_tokens, eps, HEADS,
                         HEAD_DIM, BLOCK_H)


def launch(query, key, weight_q, weight_k, cos, sin, eps: float, heads: int, wrap=lambda kernel: kernel):
    """(B, N, H * D) Q and K (rows may be strided, as a fused QKV projection leaves them), the norms' weights
    (H * D,) and the rotary angles (1, N, 1, D) -> normalised and rotated Q and K, (B, N, H * D), contiguous."""
    b, n, width = query.shape
    head_dim = width // heads
    query, key = (t if t.stride(2) == 1 else t.contiguous() for t in (query, key))
    cos, sin = cos.contiguous(), sin.contiguous()
    out_q, out_k = (torch.empty(query.shape, dtype=query.dtype, device=query.device) for _ in range(2))
    block_h = triton.next_power_of_2(heads)
    wrap(qk_norm_rope_kernel)[(b * n, 2)](query, key, weight_q, weight_k, cos, sin, out_q, out_k, n,
                                          query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                                          cos.stride(1), eps, HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=block_h,
                                          num_warps=max(1, min(8, block_h * head_dim // 1024)))
    return out_q, out_k


@torch.library.triton_op("wan_opt::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(query: torch.Tensor, key: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    return launch(query, key, weight_q, weight_k, cos, sin, eps, heads, wrap_triton)
