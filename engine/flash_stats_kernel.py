"""The Triton kernel of engine.flash_stats (imported on first use, so that Triton's CPU interpreter,
TRITON_INTERPRET=1, can be chosen by tests before it is built)."""

import triton
import triton.language as tl


@triton.jit
def _rounded(x, DT: tl.constexpr, BITWISE: tl.constexpr):
    """x (fp32) rounded to DT (to nearest, ties to even) and back. BITWISE: the same rounding to bf16 by integer
    arithmetic, for the CPU interpreter, whose bf16 cast truncates."""
    if BITWISE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST: the inputs in fp32 first (the interpreter multiplies bf16 tiles
    wrongly; the products of bf16 values are exact in fp32, so the result is the same)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_block(acc, m_i, l_i, t_i, e0_i, near_i, q, K, V, base, sl, start, offs_m, offs_d, d_ok, slope, alpha,
               length, BLOCK_N: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr, BITWISE: tl.constexpr,
               UPCAST: tl.constexpr, MASKED: tl.constexpr, FIRST: tl.constexpr, NEAR: tl.constexpr):
    """The online softmax's running state after the keys start .. start + BLOCK_N - 1. MASKED: the block may
    hold keys past a row's own (causal mask) or past the end; FIRST: it holds key 0; NEAR: it may hold a row's
    local keys (i, i-1, i-2). A block of none of them, every key visible to every row, skips their work."""
    dt = q.dtype
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_ok = (offs_n < length)[:, None] & d_ok[None, :]
    else:
        kv_ok = d_ok[None, :]
    k = tl.load(K + base + offs_n[:, None] * sl + offs_d[None, :], mask=kv_ok, other=0.0)
    qk = _dot(q, tl.trans(k), IEEE, UPCAST)
    bias = slope * offs_n.to(tl.float32)
    if ROUND:  # the eager path's ALiBi tensor in the model's dtype, and its baddbmm output rounded to it
        bias = _rounded(bias, dt, BITWISE)
    s = qk * alpha + bias[None, :]
    if ROUND:
        s = _rounded(s, dt, BITWISE)
    back = offs_m[:, None] - offs_n[None, :]
    if MASKED:
        valid = (back >= 0) & (offs_n < length)[None, :]
        m_new = tl.maximum(m_i, tl.max(tl.where(valid, s, float("-inf")), 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    scale = tl.exp(m_i - m_new)
    z = s - m_new[:, None]
    e = tl.exp(z)
    if MASKED:
        e = tl.where(valid, e, 0.0)
    # t relative to the running maximum, so that no two numbers of size slope x L are subtracted at the end:
    # moving the maximum shifts every earlier term by m_i - m_new (nothing to shift before the first block)
    t_i = (t_i + l_i * tl.where(l_i > 0, m_i - m_new, 0.0)) * scale + tl.sum(e * z, 1)
    l_i = l_i * scale + tl.sum(e, 1)
    e0_i = e0_i * scale
    if FIRST:
        e0_i += tl.sum(tl.where(offs_n[None, :] == 0, e, 0.0), 1)
    near_i = near_i * scale
    if NEAR:
        near_i += tl.sum(tl.where(back <= 2, e, 0.0), 1)  # e is 0 at the masked keys (back < 0)
    v = tl.load(V + base + offs_n[:, None] * sl + offs_d[None, :], mask=kv_ok, other=0.0)
    # the weights rounded to the values' dtype, as eager rounds its probabilities before multiplying
    acc = acc * scale[:, None] + _dot(e.to(V.dtype.element_ty), v, IEEE, UPCAST)
    return acc, m_new, l_i, t_i, e0_i, near_i


@triton.jit
def attention_statistics(Q, K, V, Out, Stats, Slopes, GramHi, GramLo, alpha, n_heads, batch, length, sb, sh, sl,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
                         BITWISE: tl.constexpr, UPCAST: tl.constexpr, HEAD_NORM: tl.constexpr,
                         GRAM_LO: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch row, head); see engine.flash_stats. Q, K and V share the
    strides sb, sh, sl (head dimension contiguous); Out is [B, L, H, d] and Stats [S, H, B, L], contiguous.
    BLOCK_M must be a multiple of BLOCK_N. ROUND: scores rounded to the inputs' dtype (not fp32); IEEE: fp32
    products without TF32; BITWISE and UPCAST: see `_rounded` and `_dot` (the CPU interpreter). HEAD_NORM: a
    fourth statistic, ||W_h c|| of the row's context c (rounded as the output projection receives it) from the
    head's Gram matrix W_h^T W_h, [H, d, d] in GramHi (+ GramLo when GRAM_LO: the rounding remainder of
    GramHi)."""
    # the three parts of the key loop below meet at multiples of BLOCK_N only if BLOCK_M is one
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N")
    bh = tl.program_id(0)  # B x H on the grid's first axis (the second holds at most 65,535)
    pid_m = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # each program's base offsets in 64 bits (B x L x H x 3d passes 2^31 at bloom-176b with B=32, L=2048), the
    # offsets within its tiles in 32
    base = b.to(tl.int64) * sb + h.to(tl.int64) * sh
    q = tl.load(Q + base + offs_m[:, None] * sl + offs_d[None, :], mask=(offs_m[:, None] < length) & d_ok[None, :],
                other=0.0)
    slope = tl.load(Slopes + h)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # sum_j e_j, e_j = exp(s_j - m_i)
    t_i = tl.zeros((BLOCK_M,), tl.float32)  # sum_j e_j (s_j - m_i): the entropy is log l - t / l
    e0_i = tl.zeros((BLOCK_M,), tl.float32)  # e at key 0
    near_i = tl.zeros((BLOCK_M,), tl.float32)  # e at keys i, i-1, i-2
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # The keys in three parts: block 0 (key 0; for the first query blocks, their own or local keys too), the
    # blocks every row sees whole (most of the work: no mask, no statistic but the entropy's), and from the
    # block before the query block's first row on (a row's keys i-1 and i-2 may lie there), masked.
    acc, m_i, l_i, t_i, e0_i, near_i = _key_block(
        acc, m_i, l_i, t_i, e0_i, near_i, q, K, V, base, sl, 0, offs_m, offs_d, d_ok, slope, alpha, length,
        BLOCK_N, ROUND, IEEE, BITWISE, UPCAST, MASKED=True, FIRST=True, NEAR=True)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, length)
    tail = tl.maximum(pid_m * BLOCK_M - BLOCK_N, BLOCK_N)
    for start in range(BLOCK_N, tail, BLOCK_N):
        acc, m_i, l_i, t_i, e0_i, near_i = _key_block(
            acc, m_i, l_i, t_i, e0_i, near_i, q, K, V, base, sl, start, offs_m, offs_d, d_ok, slope, alpha, length,
            BLOCK_N, ROUND, IEEE, BITWISE, UPCAST, MASKED=False, FIRST=False, NEAR=False)
    for start in range(tail, hi, BLOCK_N):
        acc, m_i, l_i, t_i, e0_i, near_i = _key_block(
            acc, m_i, l_i, t_i, e0_i, near_i, q, K, V, base, sl, start, offs_m, offs_d, d_ok, slope, alpha, length,
            BLOCK_N, ROUND, IEEE, BITWISE, UPCAST, MASKED=True, FIRST=False, NEAR=True)
    m_ok = offs_m < length
    ctx = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    out_base = (b.to(tl.int64) * length * n_heads + h) * HEAD_DIM  # Out: [B, L, H, d]
    tl.store(Out + out_base + offs_m[:, None] * (n_heads * HEAD_DIM) + offs_d[None, :], ctx,
             mask=m_ok[:, None] & d_ok[None, :])
    ss = n_heads * batch * length  # Stats: [S, H, B, L]
    row = Stats + (h.to(tl.int64) * batch + b) * length + offs_m
    tl.store(row, e0_i / l_i, mask=m_ok)
    tl.store(row + ss, tl.log(l_i) - t_i / l_i, mask=m_ok)
    tl.store(row + 2 * ss, near_i / l_i, mask=m_ok)
    if HEAD_NORM:  # c^T G c = ||W_h c||^2
        g_at = h * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        g_ok = d_ok[:, None] & d_ok[None, :]
        cg = _dot(ctx, tl.load(GramHi + g_at, mask=g_ok, other=0.0), IEEE, UPCAST)
        if GRAM_LO:
            cg += _dot(ctx, tl.load(GramLo + g_at, mask=g_ok, other=0.0), IEEE, UPCAST)
        tl.store(row + 3 * ss, tl.sqrt(tl.maximum(tl.sum(cg * ctx.to(tl.float32), 1), 0.0)), mask=m_ok)


@triton.jit
def row_norms(Y, Bias, Out, n_rows, width, sy, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[r] = ||Y[r] - Bias|| in fp32, BLOCK_R rows per program."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_R  # 64 bits: rows x width can pass 2^31
    local = tl.arange(0, BLOCK_R)
    rows = first + local
    r_ok = rows < n_rows
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, width, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        c_ok = cols < width
        y = tl.load(Y + first * sy + local[:, None] * sy + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                    other=0.0)
        bias = tl.load(Bias + cols, mask=c_ok, other=0.0)
        diff = tl.where(c_ok[None, :], y.to(tl.float32) - bias.to(tl.float32)[None, :], 0.0)
        acc += tl.sum(diff * diff, 1)
    tl.store(Out + rows, tl.sqrt(acc), mask=r_ok)
