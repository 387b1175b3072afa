"""The Triton kernel behind wan_opt.fp8_attention (imported only when that attention is used: needs triton)."""
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr
SCALE_BLOCK = tl.constexpr(64)  # tokens per Q and K scale (fp8_attention.SCALE_BLOCK); a 128-token tile reads two


def _configs():
    """Tile shapes to try on the GPU once per sequence length; Triton's CPU interpreter gets one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4) if not (m == 64 and w == 8)]


@triton.autotune(configs=_configs(), key=["n_pad", "HEAD_DIM"])
@triton.jit
def fp8_attention_kernel(Q, K, VT, Q_SCALE, K_SCALE, V_SCALE, OUT, sm_scale, n_ctx, n_heads, n_pad,
                         stride_ob, stride_on, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against every key.

    Q, K: (B*H, n_pad, HEAD_DIM) e4m3; VT: (B*H, HEAD_DIM, n_pad) e4m3; Q_SCALE, K_SCALE: (B*H, n_pad / 64);
    V_SCALE: (B*H, HEAD_DIM); OUT: (B, n_ctx, H, HEAD_DIM) with its strides. n_pad is a multiple of 128.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    scales_per_row = n_pad // SCALE_BLOCK

    q = tl.load(Q + bh * n_pad * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    # exp2 instead of exp: log2(e) folds into the factor that also undoes the fp8 scales
    q_scale = tl.load(Q_SCALE + bh * scales_per_row + offs_m // SCALE_BLOCK) * (sm_scale * LOG2E)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + bh * n_pad * HEAD_DIM
    vt_base = VT + bh * HEAD_DIM * n_pad
    for start_n in range(0, n_pad, BLOCK_N):
        keys = start_n + offs_n
        k = tl.load(k_base + keys[:, None] * HEAD_DIM + offs_d[None, :])
        k_scale = tl.load(K_SCALE + bh * scales_per_row + keys // SCALE_BLOCK)
        s = tl.dot(q, tl.trans(k)) * q_scale[:, None] * k_scale[None, :]
        s = tl.where(keys[None, :] < n_ctx, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(vt_base + offs_d[:, None] * n_pad + keys[None, :])
        acc = acc * alpha[:, None] + tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(vt))
        m_i = m_new

    v_scale = tl.load(V_SCALE + bh * HEAD_DIM + offs_d)
    out = acc * (v_scale[None, :] / (l_i[:, None] * 448.0))
    b = bh // n_heads
    h = bh % n_heads
    pointers = OUT + b * stride_ob + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(pointers, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < n_ctx)
