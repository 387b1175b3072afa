"""wan_opt.optim.fp8_attention's kernel for Hopper: warp-specialised, in Gluon (Triton's explicit dialect).

The arithmetic of wan_opt/kernels/fp8_attention_triton.py on the same operands (quantize_qkv's, with V^T's keys
in MMA order), laid out the way FlashAttention-3 lays out Hopper: a loader warp streams blocks of K and V^T by TMA
through a ring of shared-memory stages; two consumer warpgroups of 64 query rows share every block, and each
issues the next block's S = Q K^T (a bf16 wgmma) before this block's softmax, so that the tensor cores work while
it does. P is rounded to int8 in the registers the S accumulator left it in, for an int8 wgmma with V^T whose
integer result becomes a float by its bits, on the FMA pipe (the MUFU's quarter rate goes to P's exponentials).
At A14B's 720p shape the previous fp8 kernel ran at the GPU's power limit, so a change is faster only if it
spends less energy a block.

The design, what the instruction stream needed and the variants measured and not taken: docs/kernels.md,
'The Hopper kernel'; the previous (e4m3) kernel's speed: docs/measured.md, 'Attention kernels'. Written for
Gluon as Triton 3.6 has it (PyTorch 2.11's), and compiled for sm_90 there and on 3.8 by the tests' script;
wan_opt.optim.fp8_attention.HOPPER_KERNEL takes it out of use.
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from wan_opt.kernels import e4m3

# Triton 3.6 (PyTorch 2.11's) names the TMA load async_copy_global_to_shared; later releases async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# Globals a kernel reads must be constexpr.
LOG2_P_TOP = gl.constexpr(e4m3.LOG2_P_TOP)
MAGIC = gl.constexpr(e4m3.ROUND_MAGIC)  # rounding and int32 -> float by the bits of an fp32 (e4m3.ROUND_MAGIC)
MAGIC_BITS = gl.constexpr(e4m3.ROUND_MAGIC_BITS)
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup: one wgmma's M
BLOCK_N = 128  # keys per block: two blocks of scores (the one in use, the next in flight) fill the registers
STAGES = 3  # K/V^T blocks in flight; 2 starved the consumers
CONSUMER_REGS = 240  # two consumers at 240 and the loader's warpgroup at 24 fill the register file


@gluon.jit
def _loader(q_desc, k_desc, vt_desc, q_smem, k_bufs, vt_bufs, ready, empty, q_bar, q_row, k_row, vt_row, n_blocks):
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + ROWS, 0], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        stage = j % stages
        mbarrier.wait(empty.index(stage), ((j // stages) & 1) ^ 1)  # a new barrier reads as its previous phase done
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + vt_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + j * block_n, 0], bar, k_bufs.index(stage))
        _tma_load(vt_desc, [vt_row, j * block_n], bar, vt_bufs.index(stage))


@gluon.jit
def _as_mma_operand(p, p_layout: gl.constexpr):
    """127 P from the S accumulator's registers to the int8 A operand of P V, rounded, without moving a byte.

    Rounding: p + MAGIC holds round(p) in its low bits, and MAGIC's low byte is zero, so p's int8 is that byte.

    In every 32 columns a thread of the accumulator holds columns 16h + 8a + 2t + b (t its lane in a quad; h, a,
    b in {0, 1}) where the 8-bit operand wants 16h + 4t + 2a + b. Keys may be summed in any order, so P is
    relabelled rather than moved, and V^T arrives with its keys in the same order (fp8_attention.mma_key_order).
    """
    rows: gl.constexpr = p.shape[0]
    cols: gl.constexpr = p.shape[1]
    p = (p + MAGIC).to(gl.int32, bitcast=True)
    p = gl.permute(gl.reshape(p, [rows, cols // 32, 2, 2, 4, 2]), [0, 1, 2, 4, 3, 5])
    return gl.convert_layout(gl.reshape(p, [rows, cols]).to(gl.int8), p_layout, assert_trivial=True)


@gluon.constexpr_function
def _halvings_to_quad(cols):
    return (cols // 8).bit_length() - 1


@gluon.jit
def _fold(x, MAX: gl.constexpr):
    """Each row's max or sum over one thread's columns, as a tree: [rows, cols] in the accumulator's layout ->
    [rows, 8], the 8 columns a quad of threads holds (one register, four lanes)."""
    for _ in gl.static_range(_halvings_to_quad(x.shape[1])):  # each halving pairs two registers of a thread
        x = gl.reshape(x, [x.shape[0], 2, x.shape[1] // 2])
        if MAX:
            x = gl.max(x, 1)
        else:
            x = gl.sum(x, 1)
    return x


@gluon.jit
def _block(q, k_next, vt, ready_next, ready_phase, s, acc, m_i, l_i, limit, p_layout: gl.constexpr,
           QK_SCALE: gl.constexpr, HAS_NEXT: gl.constexpr, MASKED: gl.constexpr):
    """One block of keys whose scores s are in registers: the row max, the next block's scores issued, P while
    the tensor cores compute them, then P V in int8 and its float into the accumulator. Returns the next
    block's scores."""
    if MASKED:
        cols = gl.arange(0, s.shape[1], gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < limit)[None, :], s, float("-inf"))
    block_max = gl.convert_layout(gl.max(_fold(s, True), 1), m_i.type.layout) * QK_SCALE
    m_new = gl.maximum(m_i, block_max)
    alpha = gl.exp2(m_i - m_new)
    beta = gl.exp2(block_max - m_new)  # this block's P, against its own max, to the running max
    s_next = s
    if HAS_NEXT:
        mbarrier.wait(ready_next, ready_phase)
        s_next = warpgroup_mma(q, k_next.permute((1, 0)), gl.zeros_like(s), use_acc=False, is_async=True)
    p = gl.exp2(s * QK_SCALE - (block_max - LOG2_P_TOP)[:, None])
    l_i = (l_i * gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))[:, None]
           + _fold(p, False) * gl.convert_layout(beta, gl.SliceLayout(1, l_i.type.layout))[:, None])
    pv = warpgroup_mma(_as_mma_operand(p, p_layout), vt.permute((1, 0)),
                       gl.zeros_like(acc, dtype=gl.int32), use_acc=False, is_async=True)
    alpha = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))
    beta = gl.convert_layout(beta, gl.SliceLayout(1, acc.type.layout))
    acc = acc * alpha[:, None] - (beta * MAGIC)[:, None]
    pv, s_next = warpgroup_mma_wait(0, deps=[pv, s_next])
    # pv to float by its bits (|pv| < 127 * 127 * 128 < 2^22), on the FMA pipe rather than the conversion unit's
    # quarter rate, which the exponentials already use; the constant is taken off above, in the same FMA as alpha.
    acc = acc + (pv + MAGIC_BITS).to(gl.float32, bitcast=True) * beta[:, None]
    return s_next, acc, m_new, l_i


@gluon.jit
def _consumer(q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, index, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE: gl.constexpr):
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]
    head_dim: gl.constexpr = k_bufs.type.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])  # bf16: k = 16
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, head_dim, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)

    row0 = m0 + index * ROWS
    q = q_smem.index(index)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, head_dim], gl.float32, o_layout)
    s = gl.zeros([ROWS, block_n], gl.float32, s_layout)
    l_i = gl.zeros_like(_fold(s, False))
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    for j in range(n_blocks - 1):
        stage = j % stages
        nxt = (j + 1) % stages
        s, acc, m_i, l_i = _block(q, k_bufs.index(nxt), vt_bufs.index(stage), ready.index(nxt),
                                  ((j + 1) // stages) & 1, s, acc, m_i, l_i, 0, p_layout, QK_SCALE, True, False)
        mbarrier.arrive(empty.index(stage), count=1)
    last = n_blocks - 1  # partly padding: masked
    stage = last % stages
    s, acc, m_i, l_i = _block(q, k_bufs.index(stage), vt_bufs.index(stage), ready.index(stage), 0, s, acc, m_i,
                              l_i, n_ctx - last * block_n, p_layout, QK_SCALE, False, True)
    mbarrier.arrive(empty.index(stage), count=1)

    offs_m = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, head_dim, gl.SliceLayout(0, o_layout))
    v_scale = gl.load(V_SCALE + bh * head_dim + offs_d)
    l_o = gl.convert_layout(gl.sum(l_i, 1), gl.SliceLayout(1, o_layout))
    out = acc * (v_scale[None, :] / l_o[:, None]) + gl.load(V_MEAN + bh * head_dim + offs_d)[None, :]
    pointers = (OUT + (bh // n_heads) * stride_ob + offs_m[:, None] * stride_on + (bh % n_heads) * stride_oh
                + offs_d[None, :])
    gl.store(pointers, out.to(OUT.dtype.element_ty), mask=(offs_m < n_ctx)[:, None])


# A partition is a function; the two consumers differ only in which 64 rows they take.
@gluon.jit
def _consumer_0(q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx, n_heads, n_blocks,
                stride_ob, stride_on, stride_oh, QK_SCALE: gl.constexpr):
    _consumer(q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, 0, m0, bh, n_ctx, n_heads, n_blocks,
              stride_ob, stride_on, stride_oh, QK_SCALE)


@gluon.jit
def _consumer_1(q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx, n_heads, n_blocks,
                stride_ob, stride_on, stride_oh, QK_SCALE: gl.constexpr):
    _consumer(q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, 1, m0, bh, n_ctx, n_heads, n_blocks,
              stride_ob, stride_on, stride_oh, QK_SCALE)


@gluon.jit
def fp8_attention_hopper_kernel(q_desc, k_desc, vt_desc, V_SCALE, V_MEAN, OUT, n_ctx, n_heads, n_pad, stride_ob,
                                stride_on, stride_oh, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """One program: 128 queries of one (batch, head) against every key."""
    m0 = gl.program_id(0) * 2 * ROWS
    bh = gl.program_id(1)
    n_blocks = gl.cdiv(n_ctx, BLOCK_N)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    vt_bufs = gl.allocate_shared_memory(vt_desc.dtype, [STAGES, HEAD_DIM, BLOCK_N], vt_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
    mbarrier.init(q_bar, count=1)
    consumer_args = (q_smem, k_bufs, vt_bufs, ready, empty, q_bar, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx, n_heads,
                     n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE)
    loader_args = (q_desc, k_desc, vt_desc, q_smem, k_bufs, vt_bufs, ready, empty, q_bar, bh * n_pad + m0,
                   bh * n_pad, bh * HEAD_DIM, n_blocks)
    gl.warp_specialize([(_consumer_0, consumer_args), (_consumer_1, consumer_args), (_loader, loader_args)],
                       [4, 1], [CONSUMER_REGS, 24])


def descriptors(q, k, vt8):
    """TMA descriptors of the (B, H, n_pad, D) bf16 Q and K and the (B, H, D, n_pad) int8 V^T, as 2-D matrices."""
    d, n_pad = q.shape[-1], q.shape[-2]
    layout = gl.NVMMASharedLayout.get_default_for
    return (TensorDescriptor.from_tensor(q.view(-1, d), [ROWS.value, d], layout([ROWS.value, d], gl.bfloat16)),
            TensorDescriptor.from_tensor(k.view(-1, d), [BLOCK_N, d], layout([BLOCK_N, d], gl.bfloat16)),
            TensorDescriptor.from_tensor(vt8.view(-1, n_pad), [d, BLOCK_N], layout([d, BLOCK_N], gl.int8)))


def fp8_attention_hopper(q, k, vt8, v_scale, v_mean, out, n_ctx: int):
    """Run on quantize_qkv(..., hopper=True)'s operands into out, (B, N, H, D) contiguous; returns out."""
    b, h, n_pad, d = q.shape
    grid = (triton.cdiv(n_pad, 2 * ROWS.value), b * h)
    # 12 warps (two consumer warpgroups, the loader's) at launch: at most 168 registers a thread; then the
    # consumers take CONSUMER_REGS and the loader 24.
    fp8_attention_hopper_kernel[grid](*descriptors(q, k, vt8), v_scale, v_mean, out, n_ctx, h, n_pad, out.stride(0),
                                      out.stride(1), out.stride(2), HEAD_DIM=d,
                                      QK_SCALE=e4m3.qk_scale(d), BLOCK_N=BLOCK_N, STAGES=STAGES,
                                      CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=168)
    return out
