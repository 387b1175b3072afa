"""The Triton kernel behind wan_opt.fp8_attention (imported only when that attention is used: needs triton)."""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def fp8_attention_kernel(Q, K, VT, Q_SCALE, K_SCALE, V_SCALE, OUT, sm_scale, n_ctx, n_heads, n_pad,
                         stride_ob, stride_on, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against every key.

    Q, K: (B*H, n_pad, HEAD_DIM) e4m3; VT: (B*H, HEAD_DIM, n_pad) e4m3; Q_SCALE: (B*H, n_pad / BLOCK_M);
    K_SCALE: (B*H, n_pad / BLOCK_N); V_SCALE: (B*H, HEAD_DIM); OUT: (B, n_ctx, H, HEAD_DIM) with its strides.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + bh * n_pad * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(Q_SCALE + bh * (n_pad // BLOCK_M) + start_m)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + bh * n_pad * HEAD_DIM
    vt_base = VT + bh * HEAD_DIM * n_pad
    for start_n in range(0, n_pad, BLOCK_N):
        keys = start_n + offs_n
        k = tl.load(k_base + keys[:, None] * HEAD_DIM + offs_d[None, :])
        k_scale = tl.load(K_SCALE + bh * (n_pad // BLOCK_N) + start_n // BLOCK_N)
        # exp2 instead of exp: log2(e) folded into the one multiply that also undoes both fp8 scales
        s = tl.dot(q, tl.trans(k)) * (q_scale * k_scale * sm_scale * LOG2E)
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
