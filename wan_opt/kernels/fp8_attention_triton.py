"""The Triton kernel behind wan_opt.optim.fp8_attention (imported only when that attention is used: needs triton)."""
import os

import torch
import triton
import triton.language as tl

from wan_opt.kernels import e4m3
from wan_opt.kernels.fp8_qkv import ROUND_MAGIC, ROUND_MAGIC_BITS, round_small

# Globals a kernel reads must be constexpr.
LOG2_P_TOP = tl.constexpr(e4m3.LOG2_P_TOP)

# The kernel builds its tensor descriptors (Hopper's TMA copies) itself, in scratch memory that Triton asks
# this allocator for; the graphs torch.compile builds set the same one.
triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _configs():
    """Tile shapes to try on the GPU once per sequence length; Triton's CPU interpreter gets one.

    With fp8 Q and K, 64 query rows on 4 warps with 3 stages were fastest on an H100 (two programs shared an SM;
    by tile in docs/measured.md, 'Attention kernels'). bf16 K tiles take twice the shared memory, so the
    autotuner tries them all: the best tile may differ on other GPUs and lengths.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for (m, n, w) in ((64, 128, 4), (128, 128, 8), (64, 64, 4)) for s in (2, 3, 4)]


@triton.jit
def _key_blocks(acc, l_i, m_i, q, k_desc, vt_desc, k_row, vt_row, offs_n, start, stop, n_ctx,
                QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over keys [start, stop); only the last, partly padded block needs MASKED."""
    for start_n in range(start, stop, BLOCK_N):
        k = k_desc.load([k_row + start_n, 0])
        s = tl.dot(q, k.T) * QK_SCALE  # log2-domain logits from bf16 products, exact in fp32
        if MASKED:
            s = tl.where((start_n + offs_n)[None, :] < n_ctx, s, float("-inf"))
        block_max = tl.max(s, 1)
        m_new = tl.maximum(m_i, block_max)
        # 127 P against this block's own row max, rounded to int8: the precision follows the block's weights;
        # the block's factor to the running max scales its integer P V and its row sum after.
        p = tl.math.exp2(s - (block_max - LOG2_P_TOP)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(block_max - m_new)
        l_i = l_i * alpha + tl.sum(p, 1) * beta
        vt = vt_desc.load([vt_row, start_n])
        pv = tl.dot(round_small(p).to(tl.int8), vt.T, out_dtype=tl.int32)  # exact: |pv| < 127 * 127 * 128 < 2^22
        # pv to float by its bits, on the FMA pipe rather than the conversion unit's quarter rate (which the
        # exponentials use); the constant comes off in the FMA with alpha
        acc = (acc * alpha[:, None] - (beta * ROUND_MAGIC)[:, None]
               + (pv + ROUND_MAGIC_BITS).to(tl.float32, bitcast=True) * beta[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=["n_pad", "HEAD_DIM"])
@triton.jit
def fp8_attention_kernel(Q, K, VT, V_SCALE, V_MEAN, OUT, n_ctx, n_heads, n_pad, stride_ob, stride_on, stride_oh,
                         HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against every key.

    Q, K: (B*H, n_pad, HEAD_DIM) bf16; VT: (B*H, HEAD_DIM, n_pad) int8; V_SCALE, V_MEAN: (B*H, HEAD_DIM) float32;
    QK_SCALE: log2(e) / sqrt(HEAD_DIM); OUT: (B, n_ctx, H, HEAD_DIM) with its strides. n_pad is a multiple of
    128, so every tile shape divides it.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.num_programs(1) * n_pad  # Q and K as one (B*H*n_pad, HEAD_DIM) matrix each, VT as (B*H*HEAD_DIM, n_pad)
    q_desc = tl.make_tensor_descriptor(Q, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    vt_desc = tl.make_tensor_descriptor(VT, shape=[tl.num_programs(1) * HEAD_DIM, n_pad], strides=[n_pad, 1],
                                        block_shape=[HEAD_DIM, BLOCK_N])
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = q_desc.load([bh * n_pad + start_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_row, vt_row = bh * n_pad, bh * HEAD_DIM
    full = (n_ctx // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_desc, vt_desc, k_row, vt_row, offs_n, 0, full, n_ctx, QK_SCALE,
                                BLOCK_N, False)
    # The partly padded block, if any (a block of padding alone would have no row max)
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_desc, vt_desc, k_row, vt_row, offs_n, full,
                                tl.cdiv(n_ctx, BLOCK_N) * BLOCK_N, n_ctx, QK_SCALE, BLOCK_N, True)

    v_scale = tl.load(V_SCALE + bh * HEAD_DIM + offs_d)
    out = acc * (v_scale[None, :] / l_i[:, None]) + tl.load(V_MEAN + bh * HEAD_DIM + offs_d)[None, :]
    b = bh // n_heads
    h = bh % n_heads
    pointers = OUT + b * stride_ob + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(pointers, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < n_ctx)
