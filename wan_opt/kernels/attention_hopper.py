"""wan-opt's attention kernels for Hopper: warp-specialised, in Gluon (Triton's explicit dialect).

One kernel in two arithmetics, laid out the way FlashAttention-3 lays out Hopper: a loader warp streams blocks of K
and V by TMA through a ring of shared-memory stages; two consumer warpgroups of 64 query rows share every block,
and each keeps the tensor cores at work during its softmax by one of three schedules (SCHEDULES below): the next
block's S = Q K^T (a bf16 wgmma) issued first, the two warpgroups' MMAs in turns, or both. P V then runs

- in int8 (INT8_PV, mode=fast's attention, wan_opt.optim.fp8_attention): the arithmetic of
  wan_opt/kernels/fp8_attention_triton.py on quantize_qkv's operands, V^T's keys in MMA order. P is rounded to int8
  in the registers the S accumulator left it in, for an int8 wgmma with V^T whose integer result becomes a float
  by its bits, on the FMA pipe (the MUFU's quarter rate goes to P's exponentials);
- in bf16 (exact attention, the lossless `attention=hopper`, wan_opt.optim.attention): P rounded to bf16 as every
  flash attention does, accumulated in fp32 by the wgmma itself. Q, K and V are read by TMA where diffusers'
  processor leaves them, (B, N, H, D): no copy before the kernel.

At A14B's 720p shape the previous fp8 kernel ran at the GPU's power limit, so a change is faster only if it
spends less energy a block.

The design, what the instruction stream needed and the variants measured and not taken: docs/kernels.md,
'The Hopper kernel'; the previous (e4m3) kernel's speed: docs/measured.md, 'Attention kernels'. Written for
Gluon as Triton 3.6 has it (PyTorch 2.11's), and compiled for sm_90 there and on 3.8 by the tests' script;
wan_opt.optim.attention.HOPPER_KERNEL takes it out of use.
"""
import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from wan_opt.errors import WanOptError
from wan_opt.kernels import e4m3

# Triton 3.6 (PyTorch 2.11's) names the TMA load async_copy_global_to_shared; later releases async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# Globals a kernel reads must be constexpr.
LOG2_P_TOP = gl.constexpr(e4m3.LOG2_P_TOP)
MAGIC = gl.constexpr(e4m3.ROUND_MAGIC)  # rounding and int32 -> float by the bits of an fp32 (e4m3.ROUND_MAGIC)
MAGIC_BITS = gl.constexpr(e4m3.ROUND_MAGIC_BITS)
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup: one wgmma's M
BLOCK_N = 128  # keys per block: two blocks of scores (the one in use, the next in flight) fill the registers
STAGES = 3  # K/V blocks in flight; 2 starved the fp8 kernel's consumers
CONSUMER_REGS = 240  # two consumers at 240 and the loader's warpgroup at 24 fill the register file
# How the two consumers order their MMAs and softmaxes (docs/kernels.md, "Schedules"), by P V's type:
# - "overlap": each issues the next block's Q K^T before this block's softmax, beside its own exponentials;
# - "turns": each computes its softmax, then issues the next Q K^T and this P V in its turn at the tensor cores,
#   the other's exponentials running meanwhile (FlashAttention-3's ping-pong): the default for both, the faster
#   of the two kernels alone (docs/measured.md, "Schedules");
# - "turns+overlap", bf16 P V only: in its turn each issues the next Q K^T and this P V, then computes the next
#   block's softmax while its own P V runs (FlashAttention-3's whole schedule): faster than "turns" as a kernel
#   alone, slower in a 720p CFG step measured in another process; not the default until one process compares them.
# WAN_OPT_HOPPER_SCHEDULE sets every kernel that has the schedule named, for one process, to measure one against
# another (WAN_OPT_HOPPER_PINGPONG=0 or 1, "overlap" or "turns" for both, is how earlier result files spell it).
SCHEDULES = {"bf16": ("overlap", "turns", "turns+overlap"), "int8": ("overlap", "turns")}
SCHEDULE = {"bf16": "turns", "int8": "turns"}


def schedule_from_env(environ=os.environ) -> str | None:
    """The schedule WAN_OPT_HOPPER_SCHEDULE (or WAN_OPT_HOPPER_PINGPONG) names, if any."""
    name = environ.get("WAN_OPT_HOPPER_SCHEDULE") or {"0": "overlap", "1": "turns"}.get(
        environ.get("WAN_OPT_HOPPER_PINGPONG", ""))
    if name is not None and name not in SCHEDULES["bf16"]:
        raise WanOptError(f"WAN_OPT_HOPPER_SCHEDULE={name} is not a schedule: use one of "
                          f"{', '.join(SCHEDULES['bf16'])}.")
    return name


def check_schedule(pv_type: str, schedule: str) -> None:
    """Refuse a schedule the kernel with P V of `pv_type` does not have."""
    if schedule not in SCHEDULES[pv_type]:
        raise WanOptError(f"the {pv_type} P V kernel has no schedule {schedule}: use one of "
                          f"{', '.join(SCHEDULES[pv_type])}.")


_FROM_ENV = schedule_from_env()
if _FROM_ENV:
    SCHEDULE = {pv: _FROM_ENV if _FROM_ENV in SCHEDULES[pv] else default for pv, default in SCHEDULE.items()}


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, ready, empty, q_bar, q_row, k_row, col, vt_row, n_blocks):
    """Q's two halves once, then each block of K and V into the next free stage. K (and bf16 V) blocks are rows
    k_row + j * block_n at column col; int8 V^T blocks are columns j * block_n of rows vt_row."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]
    INT8_PV: gl.constexpr = v_bufs.dtype == gl.int8
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, col], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + ROWS, col], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        stage = j % stages
        mbarrier.wait(empty.index(stage), ((j // stages) & 1) ^ 1)  # a new barrier reads as its previous phase done
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + j * block_n, col], bar, k_bufs.index(stage))
        if INT8_PV:
            _tma_load(v_desc, [vt_row, j * block_n], bar, v_bufs.index(stage))
        else:
            _tma_load(v_desc, [k_row + j * block_n, col], bar, v_bufs.index(stage))


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


@gluon.constexpr_function
def _pv_reduction(int8_pv):
    """The reduction of one P V MMA instruction: 32 bytes of the operands' rows, 32 int8 or 16 bf16 values."""
    return 32 if int8_pv else 16


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
def _block(q, k_next, v, ready_next, ready_phase, s, acc, m_i, l_i, limit, turn_mine, turn_other, turn_phase,
           pv_layout: gl.constexpr, QK_SCALE: gl.constexpr, HAS_NEXT: gl.constexpr, MASKED: gl.constexpr,
           TURNS: gl.constexpr):
    """Schedules "overlap" and "turns": one block of keys whose scores s are in registers: the row max, P, then
    P V, in V's type, into the accumulator, and the next block's scores. Returns them.

    Without TURNS the next block's Q K^T is issued before P is computed, so that this warpgroup's own tensor
    core work runs beside its exponentials. With TURNS the softmax comes first and both MMAs are issued
    together, in turns with the other consumer (turn_mine, turn_other): one warpgroup's exponentials run while
    the other's MMAs do, FlashAttention-3's ping-pong."""
    INT8_PV: gl.constexpr = v.dtype == gl.int8
    if MASKED:
        cols = gl.arange(0, s.shape[1], gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < limit)[None, :], s, float("-inf"))
    block_max = gl.convert_layout(gl.max(_fold(s, True), 1), m_i.type.layout) * QK_SCALE
    m_new = gl.maximum(m_i, block_max)
    alpha = gl.exp2(m_i - m_new)
    if INT8_PV:
        beta = gl.exp2(block_max - m_new)  # this block's P, against its own max, to the running max
    if TURNS:
        s_next = s  # issued with P V, in this warpgroup's turn
    else:
        s_next = _next_scores(q, k_next, ready_next, ready_phase, s, turn_mine, turn_phase, HAS_NEXT, False)
    l_alpha = gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))[:, None]
    acc_alpha = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    if INT8_PV:
        p = gl.exp2(s * QK_SCALE - (block_max - LOG2_P_TOP)[:, None])
        l_i = l_i * l_alpha + _fold(p, False) * gl.convert_layout(beta, gl.SliceLayout(1, l_i.type.layout))[:, None]
        p8 = _as_mma_operand(p, pv_layout)
        if TURNS:
            s_next = _next_scores(q, k_next, ready_next, ready_phase, s, turn_mine, turn_phase, HAS_NEXT, True)
        pv = warpgroup_mma(p8, v.permute((1, 0)), gl.zeros_like(acc, dtype=gl.int32), use_acc=False, is_async=True)
        if TURNS:
            mbarrier.arrive(turn_other, count=1)
        beta = gl.convert_layout(beta, gl.SliceLayout(1, acc.type.layout))
        acc = acc * acc_alpha - (beta * MAGIC)[:, None]
        pv, s_next = warpgroup_mma_wait(0, deps=[pv, s_next])
        # pv to float by its bits (|pv| < 127 * 127 * 128 < 2^22), on the FMA pipe rather than the conversion
        # unit's quarter rate, which the exponentials already use; the constant is taken off above, in the same
        # FMA as alpha.
        acc = acc + (pv + MAGIC_BITS).to(gl.float32, bitcast=True) * beta[:, None]
    else:
        # Against the running max, as flash attention does: bf16 keeps P's relative precision at any magnitude,
        # and the MMA adds P V to the rescaled accumulator itself. For 16-bit operands the S accumulator's
        # registers are already P's A-operand layout.
        p = gl.exp2(s * QK_SCALE - m_new[:, None])
        l_i = l_i * l_alpha + _fold(p, False)
        p16 = gl.convert_layout(p.to(gl.bfloat16), pv_layout, assert_trivial=True)
        acc = acc * acc_alpha
        if TURNS:
            s_next = _next_scores(q, k_next, ready_next, ready_phase, s, turn_mine, turn_phase, HAS_NEXT, True)
        acc = warpgroup_mma(p16, v, acc, use_acc=True, is_async=True)
        if TURNS:
            mbarrier.arrive(turn_other, count=1)
        acc, s_next = warpgroup_mma_wait(0, deps=[acc, s_next])
    return s_next, acc, m_new, l_i


@gluon.jit
def _next_scores(q, k_next, ready_next, ready_phase, s, turn_mine, turn_phase, HAS_NEXT: gl.constexpr,
                 TURNS: gl.constexpr):
    """The next block's S = Q K^T issued once its keys are in and, with TURNS, once it is this warpgroup's turn
    at the tensor cores (P V follows it there); in flight, waited for with P V. s where there is no next block."""
    if HAS_NEXT:
        mbarrier.wait(ready_next, ready_phase)
    if TURNS:
        mbarrier.wait(turn_mine, turn_phase)
    s_next = s
    if HAS_NEXT:
        s_next = warpgroup_mma(q, k_next.permute((1, 0)), gl.zeros_like(s), use_acc=False, is_async=True)
    return s_next


# Schedule "turns+overlap", for bf16 P V only: int8 P V's int32 accumulator, in flight beside a block's scores and P,
# does not fit the registers (316 bytes spilled a thread). Its softmax is _block's arithmetic in a helper of its own:
# _block keeps its statements in the order its measured kernels compiled from (ptxas schedules by that order, and
# a helper call moves it).


@gluon.jit
def _softmax(s, m_i, l_i, limit, QK_SCALE: gl.constexpr, MASKED: gl.constexpr):
    """A block's bf16-bound P against the new running max (the keys from limit on masked, for the last block), the
    new max, alpha (the old running max to the new) and the row sums."""
    if MASKED:
        cols = gl.arange(0, s.shape[1], gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < limit)[None, :], s, float("-inf"))
    block_max = gl.convert_layout(gl.max(_fold(s, True), 1), m_i.type.layout) * QK_SCALE
    m_new = gl.maximum(m_i, block_max)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * QK_SCALE - m_new[:, None])
    l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))[:, None] + _fold(p, False)
    return p, m_new, alpha, l_i


@gluon.jit
def _to_operand(p, alpha, acc, pv_layout: gl.constexpr):
    """P in bf16 as P V's register operand (the S accumulator's registers already are its layout), and the
    accumulator rescaled to P's running max, both once no P V is in flight on them."""
    p16 = gl.convert_layout(p.to(gl.bfloat16), pv_layout, assert_trivial=True)
    return p16, acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]


@gluon.jit
def _overlapped_turn(q, k_next, v, ready_next, ready_phase, p16, acc, m_i, l_i, limit, n_heads, turn_mine, turn_other,
                     turn_phase, s_layout: gl.constexpr, pv_layout: gl.constexpr, QK_SCALE: gl.constexpr,
                     MASKED: gl.constexpr):
    """One turn at the tensor cores: the next block's Q K^T and this block's P V (p16, from the previous turn), then
    the next block's softmax while that P V runs. Returns the next block's P, the accumulator with this block's
    P V rescaled to the new running max, the max and the row sums."""
    block_n: gl.constexpr = k_next.shape[0]
    mbarrier.wait(ready_next, ready_phase)
    mbarrier.wait(turn_mine, turn_phase)
    s = warpgroup_mma(q, k_next.permute((1, 0)), gl.zeros([ROWS, block_n], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p16, v, acc, use_acc=True, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    s = warpgroup_mma_wait(1, deps=[s])  # the scores are in; P V still runs
    # ptxas hoists a wait above any instruction it does not depend on within a basic block, which would put the
    # wait for P V before the exponentials; it does not move one across a branch. n_heads > 0 always holds and the
    # compiler cannot know it, so the softmax gets a block of its own, before the wait.
    p, m_new, alpha = s, m_i, m_i
    if n_heads > 0:
        p, m_new, alpha, l_i = _softmax(s, m_i, l_i, limit, QK_SCALE, MASKED)
    acc = warpgroup_mma_wait(0, deps=[acc])
    p16, acc = _to_operand(p, alpha, acc, pv_layout)
    return p16, acc, m_new, l_i


@gluon.jit
def _overlapped_blocks(q, k_bufs, v_bufs, ready, empty, s, acc, m_i, l_i, n_ctx, n_heads, n_blocks, turn_mine,
                       turn_other, index, s_layout: gl.constexpr, pv_layout: gl.constexpr, QK_SCALE: gl.constexpr):
    """Every block of keys in schedule "turns+overlap", the first block's scores s in registers: turn j issues block
    j + 1's Q K^T and block j's P V, then computes block j + 1's softmax. Returns the accumulator and the row sums."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]
    last = n_blocks - 1  # partly padding (or the next batch's tokens): masked
    if n_blocks == 1:
        p, m_i, alpha, l_i = _softmax(s, m_i, l_i, n_ctx, QK_SCALE, True)
    else:
        p, m_i, alpha, l_i = _softmax(s, m_i, l_i, 0, QK_SCALE, False)
    p16, acc = _to_operand(p, alpha, acc, pv_layout)
    for j in range(n_blocks - 2):
        nxt = (j + 1) % stages
        p16, acc, m_i, l_i = _overlapped_turn(q, k_bufs.index(nxt), v_bufs.index(j % stages), ready.index(nxt),
                                              ((j + 1) // stages) & 1, p16, acc, m_i, l_i, 0, n_heads, turn_mine,
                                              turn_other, (j + 1 + index) & 1, s_layout, pv_layout, QK_SCALE, False)
        mbarrier.arrive(empty.index(j % stages), count=1)
    if n_blocks > 1:
        p16, acc, m_i, l_i = _overlapped_turn(q, k_bufs.index(last % stages), v_bufs.index((last - 1) % stages),
                                              ready.index(last % stages), (last // stages) & 1, p16, acc, m_i, l_i,
                                              n_ctx - last * block_n, n_heads, turn_mine, turn_other,
                                              (last + index) & 1, s_layout, pv_layout, QK_SCALE, True)
        mbarrier.arrive(empty.index((last - 1) % stages), count=1)
    # the last block's P V, in this warpgroup's last turn
    mbarrier.wait(turn_mine, (last + 1 + index) & 1)
    acc = warpgroup_mma(p16, v_bufs.index(last % stages), acc, use_acc=True, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return acc, l_i


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, index, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE: gl.constexpr, SCHEDULE: gl.constexpr):
    INT8_PV: gl.constexpr = v_bufs.dtype == gl.int8
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]
    head_dim: gl.constexpr = k_bufs.type.shape[2]
    pv_k: gl.constexpr = _pv_reduction(INT8_PV)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])  # bf16: k = 16
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, head_dim, pv_k])
    # P as P V's register operand: 4 bytes of a row in each register
    pv_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=pv_k // 8)

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
    # The turns: consumer 0 goes first (a new barrier reads as its previous phase done), then each waits for the
    # other's arrival after its MMAs are issued; a consumer's k-th turn waits for phase (k + 1 + index) & 1.
    turn_mine = turn.index(index)
    turn_other = turn.index(1 - index)
    last = n_blocks - 1  # partly padding (or the next batch's tokens): masked
    if SCHEDULE == "turns+overlap":
        gl.static_assert(not INT8_PV, "schedule turns+overlap is for bf16 P V only")
        acc, l_i = _overlapped_blocks(q, k_bufs, v_bufs, ready, empty, s, acc, m_i, l_i, n_ctx, n_heads, n_blocks,
                                      turn_mine, turn_other, index, s_layout, pv_layout, QK_SCALE)
    else:
        for j in range(n_blocks - 1):
            stage = j % stages
            nxt = (j + 1) % stages
            s, acc, m_i, l_i = _block(q, k_bufs.index(nxt), v_bufs.index(stage), ready.index(nxt),
                                      ((j + 1) // stages) & 1, s, acc, m_i, l_i, 0, turn_mine, turn_other,
                                      (j + 1 + index) & 1, pv_layout, QK_SCALE, True, False, SCHEDULE == "turns")
            mbarrier.arrive(empty.index(stage), count=1)
        s, acc, m_i, l_i = _block(q, k_bufs.index(last % stages), v_bufs.index(last % stages),
                                  ready.index(last % stages), 0, s, acc, m_i, l_i, n_ctx - last * block_n, turn_mine,
                                  turn_other, (last + 1 + index) & 1, pv_layout, QK_SCALE, False, True,
                                  SCHEDULE == "turns")
    mbarrier.arrive(empty.index(last % stages), count=1)

    offs_m = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, head_dim, gl.SliceLayout(0, o_layout))
    l_o = gl.convert_layout(gl.sum(l_i, 1), gl.SliceLayout(1, o_layout))
    if INT8_PV:
        v_scale = gl.load(V_SCALE + bh * head_dim + offs_d)
        out = acc * (v_scale[None, :] / l_o[:, None]) + gl.load(V_MEAN + bh * head_dim + offs_d)[None, :]
    else:
        out = acc * (1.0 / l_o)[:, None]
    pointers = (OUT + (bh // n_heads) * stride_ob + offs_m[:, None] * stride_on + (bh % n_heads) * stride_oh
                + offs_d[None, :])
    gl.store(pointers, out.to(OUT.dtype.element_ty), mask=(offs_m < n_ctx)[:, None])


# A partition is a function; the two consumers differ only in which 64 rows they take. The schedule is bound here,
# as a literal: warp_specialize hands a partition its arguments as values, constexprs among them.
@gluon.jit
def _overlap_consumer_0(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                        n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 0, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "overlap")


@gluon.jit
def _overlap_consumer_1(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                        n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 1, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "overlap")


@gluon.jit
def _turns_consumer_0(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                      n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 0, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "turns")


@gluon.jit
def _turns_consumer_1(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                      n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 1, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "turns")


@gluon.jit
def _turns_overlap_consumer_0(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                              n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 0, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "turns+overlap")


@gluon.jit
def _turns_overlap_consumer_1(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx,
                              n_heads, n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE):
    _consumer(q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, 1, m0, bh, n_ctx, n_heads,
              n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE, "turns+overlap")


@gluon.jit
def attention_hopper_kernel(q_desc, k_desc, v_desc, V_SCALE, V_MEAN, OUT, n_ctx, n_heads, n_pad, stride_ob,
                            stride_on, stride_oh, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                            SCHEDULE: gl.constexpr):
    """One program: 128 queries of one (batch, head) against every key.

    INT8_PV: Q and K are (B*H*n_pad, D) matrices, V^T a (B*H*D, n_pad) one, with V's scales and means. Otherwise
    Q, K and V are (B*n_ctx, H*D) matrices, diffusers' (B, N, H, D) rows, and V_SCALE, V_MEAN are unused: a
    program's rows past its sequence belong to the next one (or are TMA's zeros), never stored, and the keys past
    it are masked."""
    INT8_PV: gl.constexpr = v_desc.dtype == gl.int8
    m0 = gl.program_id(0) * 2 * ROWS
    bh = gl.program_id(1)
    n_blocks = gl.cdiv(n_ctx, BLOCK_N)
    if INT8_PV:
        k_row = bh * n_pad
        col = 0
    else:
        k_row = (bh // n_heads) * n_ctx
        col = (bh % n_heads) * HEAD_DIM
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    if INT8_PV:
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)  # V^T
    else:
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    consumer_args = (q_smem, k_bufs, v_bufs, ready, empty, q_bar, turn, V_SCALE, V_MEAN, OUT, m0, bh, n_ctx, n_heads,
                     n_blocks, stride_ob, stride_on, stride_oh, QK_SCALE)
    loader_args = (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, ready, empty, q_bar, k_row + m0, k_row, col,
                   bh * HEAD_DIM, n_blocks)
    if SCHEDULE == "turns+overlap":
        gl.warp_specialize([(_turns_overlap_consumer_0, consumer_args), (_turns_overlap_consumer_1, consumer_args),
                            (_loader, loader_args)], [4, 1], [CONSUMER_REGS, 24])
    elif SCHEDULE == "turns":
        gl.warp_specialize([(_turns_consumer_0, consumer_args), (_turns_consumer_1, consumer_args),
                            (_loader, loader_args)], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_overlap_consumer_0, consumer_args), (_overlap_consumer_1, consumer_args),
                            (_loader, loader_args)], [4, 1], [CONSUMER_REGS, 24])


def _launch(descriptors, v_scale, v_mean, out, n_ctx: int, n_heads: int, n_pad: int, batch: int,
            schedule: str | None = None):
    d = out.shape[-1]
    pv_type = "int8" if v_scale is not None else "bf16"
    schedule = schedule or SCHEDULE[pv_type]
    check_schedule(pv_type, schedule)
    grid = (triton.cdiv(n_ctx, 2 * ROWS.value), batch * n_heads)
    # 12 warps (two consumer warpgroups, the loader's) at launch: at most 168 registers a thread; then the
    # consumers take CONSUMER_REGS and the loader 24.
    attention_hopper_kernel[grid](*descriptors, v_scale, v_mean, out, n_ctx, n_heads, n_pad, out.stride(0),
                                  out.stride(1), out.stride(2), HEAD_DIM=d, QK_SCALE=e4m3.qk_scale(d),
                                  BLOCK_N=BLOCK_N, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
                                  SCHEDULE=schedule,
                                  num_warps=4, maxnreg=168)
    return out


def _layout(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(block, dtype)


def fp8_descriptors(q, k, vt8):
    """TMA descriptors of the (B, H, n_pad, D) bf16 Q and K and the (B, H, D, n_pad) int8 V^T, as 2-D matrices."""
    d, n_pad = q.shape[-1], q.shape[-2]
    return (TensorDescriptor.from_tensor(q.view(-1, d), [ROWS.value, d], _layout([ROWS.value, d], gl.bfloat16)),
            TensorDescriptor.from_tensor(k.view(-1, d), [BLOCK_N, d], _layout([BLOCK_N, d], gl.bfloat16)),
            TensorDescriptor.from_tensor(vt8.view(-1, n_pad), [d, BLOCK_N], _layout([d, BLOCK_N], gl.int8)))


def fp8_attention_hopper(q, k, vt8, v_scale, v_mean, out, n_ctx: int, schedule: str | None = None):
    """Run on quantize_qkv(..., hopper=True)'s operands into out, (B, N, H, D) contiguous; returns out.
    schedule: one of SCHEDULES (default: SCHEDULE's)."""
    b, h, n_pad, _ = q.shape
    return _launch(fp8_descriptors(q, k, vt8), v_scale, v_mean, out, n_ctx, h, n_pad, b, schedule)


def as_rows(x):
    """A (B, N, H, D) bf16 tensor as the (B*N, H*D) matrix TMA reads, a view where its layout allows (tokens at
    one stride, channels packed; TMA wants 16-byte strides and base), else a contiguous copy."""
    b, n, h, d = x.shape
    rows = x.stride(1)
    if not (x.stride(3) == 1 and x.stride(2) == d and (b == 1 or x.stride(0) == n * rows) and rows % 8 == 0
            and x.data_ptr() % 16 == 0):
        x, rows = x.contiguous(), h * d
    return x.as_strided((b * n, h * d), (rows, 1))


def rows_descriptors(query, key, value):
    """TMA descriptors of (B, N, H, D) bf16 Q, K and V in place: blocks of one head's 64 queries or 128 keys."""
    d = query.shape[-1]
    q_block, kv_block = [ROWS.value, d], [BLOCK_N, d]
    return (TensorDescriptor.from_tensor(as_rows(query), q_block, _layout(q_block, gl.bfloat16)),
            *(TensorDescriptor.from_tensor(as_rows(t), kv_block, _layout(kv_block, gl.bfloat16)) for t in (key, value)))


def exact_attention_hopper(query, key, value, out, schedule: str | None = None):
    """Softmax attention of (B, N, H, D) bf16 tensors, head dimension 128, in bf16 into out, (B, N, H, D)
    contiguous; returns out. schedule: one of SCHEDULES (default: SCHEDULE's)."""
    b, n, h, _ = query.shape
    return _launch(rows_descriptors(query, key, value), None, None, out, n, h, n, b, schedule)
