"""
Triton kernels for the attentions, each one beside the plain PyTorch function it must agree with.

The references live in the attention files (the paper's equations in order, materialising whatever they need);
the kernels here compute the same numbers blockwise, FlashAttention style, so that no T x T tensor is ever
written to GPU memory. The attention files dispatch: the kernel on CUDA when `*_available(q)` says so and
`config.use_kernels` is on, the reference everywhere else. tests/test_kernels.py checks that both agree, on CPU
through Triton's interpreter (TRITON_INTERPRET=1) and natively on a GPU.

  selective_attention(q, k, v, selection_head)   fused Selective Attention, forward and backward
                                                  (reference: attention_selective.selective_attention)
  infini_memory(q, k, v, M, z, segment_len, update)
                                                  Infini-attention's memory without the Python loop over
                                                  segments, forward and backward (reference:
                                                  attention_infini.memory_over_segments, the memory alone)

Without Triton (macOS, Windows, CPU-only installs) this file still imports: the kernels stay plain, never
called functions and every `*_available` returns False.

`python tools/kernel_report.py` compiles every kernel for several GPUs, with no GPU needed, and prints the registers,
spills and shared memory each one takes.
"""

from __future__ import annotations  # kernel signatures name tl.constexpr, which must not be looked up without Triton

import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# What every kernel takes. tl.arange needs a power of two and tl.dot at least 16; at 128 the selective backward
# needs more than a gaming GPU's 99 KiB of shared memory, or does not compile (python tools/kernel_report.py), and
# Infini's M leaves registers
HEAD_DIMS = (16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# launch settings: 4 warps (128 threads) per program, and 2 pipeline stages, so that the next key block loads while
# the current one is computed; the kernels that hold three or more fp32 tiles get 8 warps, which keeps them from
# spilling registers on an H100 (python tools/kernel_report.py).
# Fused multiply-adds, Triton's default until 3.10 changes it, stated so that the numbers do not change with it.
NARROW = dict(num_warps=4, num_stages=2, enable_fp_fusion=True)
WIDE = dict(num_warps=8, num_stages=2, enable_fp_fusion=True)


def jit(fn):
    """triton.jit; without Triton the kernel stays a plain function that nothing calls."""
    return fn if triton is None else triton.jit(fn)


def cdiv(a, b):
    return -(-a // b)


def check_qkv(q, k, v):
    """q (B, H, Tq, D) for the last Tq <= T positions of k, v (B, H, T, D), in a dtype and head dim of the kernels."""
    if not (q.dim() == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.size(-1) == k.size(-1)
            and q.size(2) <= k.size(2)):
        raise ValueError(f"q, k, v must be (B, H, T, D) with q no longer than k, v; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(-1) not in HEAD_DIMS or q.dtype not in DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"the kernels take head dims {HEAD_DIMS} and one dtype of {DTYPES}, got D={q.size(-1)}, "
                         f"{q.dtype}/{k.dtype}/{v.dtype}; use the PyTorch reference (--use_kernels=False)")


def kernel_ready(q):
    """True when Triton compiles for q's device: a CUDA tensor of a dtype and head dim the kernels take."""
    return (triton is not None and q.is_cuda and q.dim() == 4 and q.dtype in DTYPES
            and q.size(-1) in HEAD_DIMS)


TRIED = {}  # (kernel, device, dtype, head dim) -> whether the kernel ran there, forward and backward


@torch.compiler.disable  # a try/except that may warn: not something to trace
def works_here(name, q, trial):
    """Whether a kernel compiles and runs for q's GPU, dtype and head dim. trial(q) runs it once, forward and
    backward, on tiny inputs like q. A user's GPU may be too old for Triton or have too little shared memory,
    and a Triton version may reject a kernel: that must not end a training run. So a failure warns once, naming
    the card and the reason, and the attention runs its PyTorch reference from then on."""
    key = (name, str(q.device), q.dtype, q.size(-1))
    if key not in TRIED:
        try:
            with torch.enable_grad():
                trial(q)
            TRIED[key] = True
        except torch.cuda.OutOfMemoryError:  # not the kernel's fault: let the caller see it
            raise
        except Exception as e:
            TRIED[key] = False
            try:
                card = torch.cuda.get_device_name(q.device) if q.is_cuda else str(q.device)
            except Exception:  # after some CUDA errors every CUDA call raises: the warning still gets out
                card = str(q.device)
            reason = (str(e).strip().splitlines() or [''])[0][:200]
            warnings.warn(f"the {name} Triton kernel does not run on {card} in {q.dtype} at head dim {q.size(-1)} "
                          f"({type(e).__name__}: {reason}); the PyTorch reference runs instead", stacklevel=2)
    return TRIED[key]


def tiny_like(q, n=1, length=64):
    """n small (1, 2, length, D) tensors on q's device, in q's dtype, that take gradients: a kernel's trial run."""
    return [torch.randn(1, 2, length, q.size(-1), device=q.device, dtype=q.dtype, requires_grad=True)
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Selective attention (Leviathan et al. 2024), fused.
#
# The reference computes, for one selecting head h0 and every head h (attention_selective.py; the paper's
# Figure 2):
#   L_h = q_h k_h^T / sqrt(D), causal                                         (the usual logits)
#   S[k, j] = relu(L_h0[k, j]) for 0 < j < k, else 0                          (Figure 2: votes to hide j)
#   F[i, j] = sum_{k < i} S[k, j]                                             ("accumulate", exclusive)
#   O_h = softmax(L_h - F) V_h                                                (F shared by all heads)
# F is a prefix sum down the query axis, so it cannot be an elementwise score bias inside FlashAttention as is.
# But a sum over the rows before i is the sum over the query blocks before i's block plus the rows before i in
# its own block. So for a query block I and a key block J:
#   F[I, J] = carry[I, J] + (exclusive cumsum of S[I, J] down its rows),   carry[I, j] = sum_{k before I} S[k, j]
# The carry is one vector per query block: T / BLOCK_M times smaller than F, still T^2 / 64 numbers. So it
# exists for CARRY_ROWS query rows at a time (256 vectors of T, linear in T), chunk after chunk, with the running
# column sums handed from one chunk to the next. Per chunk the forward is two passes:
#   1. _selective_carry_kernel walks down each key block's column of tiles, adding up S (head h0 only): the
#      carry, and the running column sums.
#   2. _selective_fwd_kernel is FlashAttention-2 with one more dot per tile (head h0's logits, for S), the F
#      tile rebuilt from the carry and a tl.cumsum, and L_h - F fed to the online softmax.
# The backward recomputes the carry (cheap: 1/H of the attention's QK^T) rather than keeping it between passes,
# so the saved state is q, k, v, O and the log-sum-exp per row, as in FlashAttention, plus the running column
# sums at each chunk's start.
#
# Backward. With dZ_h = P_h * (dP_h - rowsum(dO_h * O_h)), the usual FlashAttention gradient of the scores:
#   direct path:    dQ_h = dZ_h K_h / sqrt(D),  dK_h = dZ_h^T Q_h / sqrt(D),  dV_h = P_h^T dO_h
#   selection path: dF = -sum_h dZ_h;  dS[k, j] = sum_{i > k} dF[i, j];  G = dS where S > 0 (ReLU' and the mask)
#                   dQ_h0 += G K_h0 / sqrt(D),  dK_h0 += G^T Q_h0 / sqrt(D)
# dS is a suffix sum down the query axis: the mirror image of F, so it splits the same way into a running
# carry over later query blocks plus the within-tile suffix sum. _selective_bwd_dkdv_kernel and
# _selective_bwd_dq_kernel do the direct path per head (FlashAttention-2's two loops, with F rebuilt per tile);
# _selective_bwd_selection_kernel walks up each key block's column of tiles from the bottom, sums dZ over the
# heads into the dF tile (the one place all heads meet), carries dF's column sums upward, and adds G's
# contributions to head h0. The chunks run bottom-up, so that those column sums pass from one chunk to the next;
# dK_h and dV_h add up over the chunks in fp32.

# Tuning: the blocks of the selective kernels (docs/kernels.md measures them)
BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per inner-loop step (the selective kernels: see selective_block_n)
CARRY_ROWS = 16384  # query rows whose carry exists at once (a T-vector per 64 of them), so memory ~ T
FP32_SELECTIVE_SHARED = 113 * 1024  # bytes of shared memory the fp32 selective backward needs (kernel_report.py)


@jit
def _load_rows(ptr, offs, T, BLOCK_D: tl.constexpr):
    """Rows offs of one head's contiguous (T, D) matrix; rows past T read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + offs[:, None] * BLOCK_D + offs_d[None, :], mask=offs[:, None] < T, other=0.0)


@jit
def _carry_row(CARRY, b, qb, q_start, q_end, T):
    """Where query block qb's carry starts in CARRY (B, q_end - q_start, T): a row of T per block of this chunk."""
    return CARRY + (b * (q_end - q_start) + qb - q_start).to(tl.int64) * T


@jit
def _votes(q0, k0, offs_m, offs_n, T, scale):
    """The votes S = relu(q0 k0^T / sqrt(D)) where 0 < j < k, else 0, on one tile of head h0 (fp32)."""
    s0 = tl.dot(q0, tl.trans(k0)) * scale
    # Figure 2: "do not mask self" and no future keys (j < k), "do not mask <BOS>" (j > 0)
    votes = (offs_n[None, :] < offs_m[:, None]) & (offs_n[None, :] > 0) & (offs_m[:, None] < T)
    return tl.where(votes, tl.maximum(s0, 0.0), 0.0)


@jit
def _accumulate(S, carry_row, offs_n, T):
    """F on one tile: the carry (S summed over the query blocks above) + the exclusive cumsum of S down the tile."""
    carry = tl.load(carry_row + offs_n, mask=offs_n < T, other=0.0)
    return carry[None, :] + tl.cumsum(S, 0) - S  # F[i, j] = sum_{k < i} S[k, j]


@jit
def _scores(q, k, F, offs_m, offs_n, scale):
    """L_h - F on one tile, -inf on future keys (j > i)."""
    scores = tl.dot(q, tl.trans(k)) * scale - F
    return tl.where(offs_n[None, :] <= offs_m[:, None], scores, float('-inf'))


@jit
def _selective_carry_kernel(Q, K, CARRY, RUNNING, H, T, h0, scale, q_start, q_end,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1, grid (key blocks, B), for the query blocks q_start..q_end-1: CARRY[b, I - q_start, j] = sum of
    S[k, j] over the rows k before block I. RUNNING[b, j] holds that sum for the rows before q_start, and is moved
    on to q_end."""
    kb = tl.program_id(0)
    b = tl.program_id(1)
    head0 = (b * H + h0).to(tl.int64) * T * BLOCK_D
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = _load_rows(K + head0, offs_n, T, BLOCK_D)
    carry = tl.load(RUNNING + b.to(tl.int64) * T + offs_n, mask=offs_n < T, other=0.0)
    # query blocks wholly before this key block get no votes on it (k > j) and never read its carry
    for qb in range(tl.maximum(kb * BLOCK_N // BLOCK_M, q_start), q_end):
        tl.store(_carry_row(CARRY, b, qb, q_start, q_end, T) + offs_n, carry, mask=offs_n < T)
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        S = _votes(_load_rows(Q + head0, offs_m, T, BLOCK_D), k0, offs_m, offs_n, T, scale)
        carry += tl.sum(S, 0)
    tl.store(RUNNING + b.to(tl.int64) * T + offs_n, carry, mask=offs_n < T)


@jit
def _selective_fwd_kernel(Q, K, V, CARRY, O, LSE, H, T, h0, scale, q_start, q_end,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2, grid (query blocks from q_start, B * H): O_h = softmax(L_h - F) V_h, online softmax over key blocks."""
    qb = q_start + tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh.to(tl.int64) * T * BLOCK_D
    head0 = (b * H + h0).to(tl.int64) * T * BLOCK_D
    carry_row = _carry_row(CARRY, b, qb, q_start, q_end, T)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + head, offs_m, T, BLOCK_D)
    q0 = _load_rows(Q + head0, offs_m, T, BLOCK_D)  # the selecting head's queries (q itself when h == h0)
    m_i = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, tl.minimum((qb + 1) * BLOCK_M, T), BLOCK_N):  # causal: keys up to the block's last row
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + head, offs_n, T, BLOCK_D)
        v = _load_rows(V + head, offs_n, T, BLOCK_D)
        S = _votes(q0, _load_rows(K + head0, offs_n, T, BLOCK_D), offs_m, offs_n, T, scale)
        F = _accumulate(S, carry_row, offs_n, T)
        scores = _scores(q, k, F, offs_m, offs_n, scale)
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite from the first tile on: key 0 is visible to every row
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(O + head + offs_m[:, None] * BLOCK_D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@jit
def _probs_and_dz(q, k, v, do, lse, delta, F, offs_m, offs_n, T, scale):
    """Recompute P_h on one tile from the saved log-sum-exp, and dZ_h = P_h * (dO_h V_h^T - delta)."""
    scores = _scores(q, k, F, offs_m, offs_n, scale)
    p = tl.where(offs_m[:, None] < T, tl.exp(scores - lse[:, None]), 0.0)  # rows past T have no saved lse
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@jit
def _selective_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, CARRY, DK, DV, H, T, h0, scale, q_start, q_end,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Direct path, grid (key blocks, B * H): adds to dK_h and dV_h (fp32) of one key block what the query blocks
    q_start..q_end-1 give."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh.to(tl.int64) * T * BLOCK_D
    head0 = (b * H + h0).to(tl.int64) * T * BLOCK_D
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K + head, offs_n, T, BLOCK_D)
    v = _load_rows(V + head, offs_n, T, BLOCK_D)
    k0 = _load_rows(K + head0, offs_n, T, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for qb in range(tl.maximum(kb * BLOCK_N // BLOCK_M, q_start), q_end):
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + head, offs_m, T, BLOCK_D)
        do = _load_rows(DO + head, offs_m, T, BLOCK_D)
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        S = _votes(_load_rows(Q + head0, offs_m, T, BLOCK_D), k0, offs_m, offs_n, T, scale)
        F = _accumulate(S, _carry_row(CARRY, b, qb, q_start, q_end, T), offs_n, T)
        p, dz = _probs_and_dz(q, k, v, do, lse, delta, F, offs_m, offs_n, T, scale)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dk += tl.dot(tl.trans(dz.to(q.dtype)), q)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = offs_n[:, None] * BLOCK_D + offs_d[None, :]
    live = offs_n[:, None] < T
    tl.store(DK + head + ptrs, tl.load(DK + head + ptrs, mask=live, other=0.0) + dk * scale, mask=live)
    tl.store(DV + head + ptrs, tl.load(DV + head + ptrs, mask=live, other=0.0) + dv, mask=live)


@jit
def _selective_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, CARRY, DQ, H, T, h0, scale, q_start, q_end,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Direct path, grid (query blocks from q_start, B * H): dQ_h of one query block, looping over the key blocks."""
    qb = q_start + tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh.to(tl.int64) * T * BLOCK_D
    head0 = (b * H + h0).to(tl.int64) * T * BLOCK_D
    carry_row = _carry_row(CARRY, b, qb, q_start, q_end, T)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + head, offs_m, T, BLOCK_D)
    q0 = _load_rows(Q + head0, offs_m, T, BLOCK_D)
    do = _load_rows(DO + head, offs_m, T, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, tl.minimum((qb + 1) * BLOCK_M, T), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + head, offs_n, T, BLOCK_D)
        v = _load_rows(V + head, offs_n, T, BLOCK_D)
        S = _votes(q0, _load_rows(K + head0, offs_n, T, BLOCK_D), offs_m, offs_n, T, scale)
        F = _accumulate(S, carry_row, offs_n, T)
        _, dz = _probs_and_dz(q, k, v, do, lse, delta, F, offs_m, offs_n, T, scale)
        dq += tl.dot(dz.to(k.dtype), k)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + head + offs_m[:, None] * BLOCK_D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=offs_m[:, None] < T)


@jit
def _selective_bwd_selection_kernel(Q, K, V, DO, LSE, DELTA, CARRY, DQ0, DK0, BELOW, H, T, h0, scale, q_start,
                                    q_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Selection path, grid (key blocks, B): the gradient through S into head h0's queries and keys (fp32), from
    the query blocks q_start..q_end-1.

    Walks this key block's tiles from query block q_end-1 up, so that the suffix sum of dF over the query blocks
    below is a running vector, as the carry is in pass 1; BELOW carries it from the blocks after q_end, and back.
    dK0 is added to in the program; dQ0 rows are shared by all key blocks and are added atomically.
    """
    kb = tl.program_id(0)
    b = tl.program_id(1)
    head0 = (b * H + h0).to(tl.int64) * T * BLOCK_D
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k0 = _load_rows(K + head0, offs_n, T, BLOCK_D)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    below = tl.load(BELOW + b.to(tl.int64) * T + offs_n, mask=offs_n < T, other=0.0)  # dF summed below, by column
    first = tl.maximum(kb * BLOCK_N // BLOCK_M, q_start)
    for step in range(0, q_end - first):
        qb = q_end - 1 - step
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        q0 = _load_rows(Q + head0, offs_m, T, BLOCK_D)
        S = _votes(q0, k0, offs_m, offs_n, T, scale)
        F = _accumulate(S, _carry_row(CARRY, b, qb, q_start, q_end, T), offs_n, T)
        dF = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(0, H):  # F is shared by all heads: its gradient is minus the sum of their dZ
            bh = b * H + h
            head = bh.to(tl.int64) * T * BLOCK_D
            lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
            _, dz = _probs_and_dz(_load_rows(Q + head, offs_m, T, BLOCK_D), _load_rows(K + head, offs_n, T, BLOCK_D),
                                  _load_rows(V + head, offs_n, T, BLOCK_D), _load_rows(DO + head, offs_m, T, BLOCK_D),
                                  lse, delta, F, offs_m, offs_n, T, scale)
            dF -= dz
        col = tl.sum(dF, 0)
        dS = below[None, :] + col[None, :] - tl.cumsum(dF, 0)  # dS[k, j] = sum_{i > k} dF[i, j]
        below += col
        G = tl.where(S > 0, dS, 0.0)  # through ReLU and the 0 < j < k mask
        dk0 += tl.dot(tl.trans(G.to(q0.dtype)), q0)
        tl.atomic_add(DQ0 + b.to(tl.int64) * T * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                      tl.dot(G.to(k0.dtype), k0) * scale, mask=offs_m[:, None] < T)
    ptrs = DK0 + b.to(tl.int64) * T * BLOCK_D + offs_n[:, None] * BLOCK_D + offs_d[None, :]
    live = offs_n[:, None] < T
    tl.store(ptrs, tl.load(ptrs, mask=live, other=0.0) + dk0 * scale, mask=live)
    tl.store(BELOW + b.to(tl.int64) * T + offs_n, below, mask=offs_n < T)


def carry_chunks(T, block_m, carry_rows):
    """The query blocks as (first, end) ranges of at most carry_rows rows: one carry exists at a time."""
    n_qblocks, per_chunk = cdiv(T, block_m), max(1, carry_rows // block_m)
    return [(q0, min(q0 + per_chunk, n_qblocks)) for q0 in range(0, n_qblocks, per_chunk)]


def selective_carry(q, k, running, q_start, q_end, selection_head, block_m, block_n):
    """Pass 1 for the query blocks q_start..q_end-1: the carry (B, q_end - q_start, T) fp32, the column sums of S
    above each block. running (B, T): those sums over the rows before q_start, moved on to q_end in place."""
    B, H, T, D = q.shape
    carry = torch.empty(B, q_end - q_start, T, dtype=torch.float32, device=q.device)
    n_kblocks = cdiv(min(q_end * block_m, T), block_n)  # the keys these query blocks read
    _selective_carry_kernel[(n_kblocks, B)](q, k, carry, running, H, T, selection_head, D ** -0.5, q_start, q_end,
                                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D, **NARROW)
    return carry


class FusedSelective(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, selection_head, block_m, block_n, carry_rows):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        chunks = carry_chunks(T, block_m, carry_rows)
        running = torch.zeros(B, T, dtype=torch.float32, device=q.device)
        chunk_running = torch.empty(len(chunks), B, T, dtype=torch.float32, device=q.device)  # at chunk starts
        for (q_start, q_end), running_before in zip(chunks, chunk_running):
            running_before.copy_(running)
            carry = selective_carry(q, k, running, q_start, q_end, selection_head, block_m, block_n)
            _selective_fwd_kernel[(q_end - q_start, B * H)](q, k, v, carry, o, lse, H, T, selection_head, D ** -0.5,
                                                            q_start, q_end, BLOCK_M=block_m, BLOCK_N=block_n,
                                                            BLOCK_D=D, **NARROW)
        ctx.save_for_backward(q, k, v, o, lse, chunk_running)
        ctx.config = selection_head, block_m, block_n, chunks
        ctx.mark_non_differentiable(running)
        return o, running  # running: every row's votes summed by column, the F a cache keeps

    @staticmethod
    def backward(ctx, do, _):
        q, k, v, o, lse, chunk_running = ctx.saved_tensors
        selection_head, block_m, block_n, chunks = ctx.config
        do = do.contiguous()
        B, H, T, D = q.shape
        delta = (do.float() * o.float()).sum(-1)  # rowsum(P * dP) = rowsum(dO * O)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D)
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))  # summed over chunks
        dq0, dk0 = (torch.zeros(B, T, D, dtype=torch.float32, device=q.device) for _ in range(2))  # head h0's extra
        below = torch.zeros(B, T, dtype=torch.float32, device=q.device)
        # bottom-up: the selection path carries dF's column sums up from one chunk to the next
        for (q_start, q_end), running_before in zip(reversed(chunks), chunk_running.flip(0)):
            # the carry is recomputed (1/H of the QK^T work) rather than kept between passes
            carry = selective_carry(q, k, running_before.clone(), q_start, q_end, selection_head, block_m, block_n)
            args = (H, T, selection_head, D ** -0.5, q_start, q_end)
            n_kblocks = cdiv(min(q_end * block_m, T), block_n)
            _selective_bwd_dkdv_kernel[(n_kblocks, B * H)](q, k, v, do, lse, delta, carry, dk, dv, *args, **blocks,
                                                           **WIDE)
            _selective_bwd_dq_kernel[(q_end - q_start, B * H)](q, k, v, do, lse, delta, carry, dq, *args, **blocks,
                                                               **NARROW)
            _selective_bwd_selection_kernel[(n_kblocks, B)](q, k, v, do, lse, delta, carry, dq0, dk0, below, *args,
                                                            **blocks, **WIDE)
        h = selection_head
        dq[:, h] = (dq[:, h].float() + dq0).to(dq.dtype)
        dk[:, h] += dk0
        return dq, dk.to(q.dtype), dv.to(q.dtype), None, None, None, None


def selective_block_n(capability_major):
    """Keys per inner step of the selective kernels on a GPU of this compute capability: 64 on an H100 (sm_90);
    32 on the others, where 64 makes three of the four kernels spill registers (python tools/kernel_report.py;
    chosen from the compiler's report, not from timings)."""
    return BLOCK_N if capability_major == 9 else BLOCK_N // 2


def selective_available(q):
    """Whether selective_attention below runs for q (the attention file also checks config.use_kernels). fp32 only
    on GPUs that give a block more shared memory than gaming cards' 99 KiB: its backward needs 113 KiB."""
    return kernel_ready(q) and (q.dtype != torch.float32 or FP32_SELECTIVE_SHARED <= getattr(
        torch.cuda.get_device_properties(q.device), 'shared_memory_per_block_optin', 0)) and (  # torch < 2.7: 0
        works_here('selective attention', q, lambda q: selective_attention(*tiny_like(q, 3)).sum().backward()))


@torch.compiler.disable  # torch.compile calls it as is: the kernels are fused already
def selective_attention(q, k, v, selection_head=0, block_m=BLOCK_M, block_n=None, carry_rows=CARRY_ROWS,
                        vote_totals=False):
    """Selective attention of q, k, v (B, H, T, D) -> (B, H, T, D), fused; differentiable. With vote_totals, also
    S's column sums (B, T) fp32, the F of a query after the last (what a cache keeps): pass 1 has them anyway.

    Computes the same as attention_selective.selective_attention(q, k, v, selection_head) (ReLU votes, no
    budget, no dropout) without materialising anything T x T: memory O(B H T D) plus the carry of carry_rows query
    rows at a time, B T carry_rows / block_m, and a T-vector per carry_rows rows kept for the backward.
    """
    if triton is None:
        raise RuntimeError("kernels.selective_attention needs triton; use attention_selective.selective_attention")
    check_qkv(q, k, v)
    if q.shape != k.shape:
        raise ValueError(f"selective attention takes as many queries as keys, got {q.size(2)} and {k.size(2)}")
    if not 0 <= selection_head < q.size(1):
        raise ValueError(f"selection_head={selection_head} must be a head index, 0..{q.size(1) - 1}")
    if block_n is None:
        block_n = selective_block_n(torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 9)
    with torch.cuda.device_of(q):  # Triton launches on the current GPU (cuda:1 too); the backward is on q's already
        o, totals = FusedSelective.apply(q, k, v, selection_head, block_m, block_n, carry_rows)
    return (o, totals) if vote_totals else o


# ---------------------------------------------------------------------------------------------------------
# Infini-attention (Munkhdalai et al. 2024), segments without a Python loop.
#
# The reference (attention_infini.infini_attention) loops over segments in Python, several small launches per
# segment. Its two halves parallelise differently:
#   local attention (eq. 1-2) is independent per segment: fold the segments into the batch and make one causal
#     SDPA call (FlashAttention); a hand-written kernel would not beat it, and fusing it into the sequential
#     loop below would leave most of the GPU idle.
#   the memory (eq. 3-5) is a recurrence over segments: _infini_memory_fwd_kernel keeps one head's M (d x d) and
#     z (d) in registers and walks the segments, reading each one's queries (eq. 3), then writing its keys and
#     values (eq. 4 linear, eq. 5 delta). Nothing larger than a block of one segment is loaded at a time.
# The gate (eq. 6) is elementwise, left to PyTorch. M and z are fp32 (they sum every segment); on a GPU their
# products run in tf32, as train.py's fp32 matmuls do (allow_tf32): exact fp32 products (input_precision="ieee")
# compile to spilling code (docs/kernels.md).
#
# Backward: when a gradient is needed, the memory kernel stores M and z before each segment (a d x d matrix per
# segment and head: T d^2 / segment_len numbers, K's size in fp32 at segment_len = d). _infini_memory_bwd_kernel
# walks the segments in reverse, carrying dL/dM and dL/dz, and differentiates eq. 3-5 by hand. With
# sigma = ELU + 1, denom = max(sigma(X) z, 1e-6), R = sigma(X) M / denom (a read, eq. 3) and dR its gradient:
#   dM += sigma(X)^T (dR / denom)      dz += sigma(X)^T g      dsigma(X) = (dR / denom) M^T + g z^T
#   where g = -rowsum(dR * R) / denom where sigma(X) z > 1e-6 (else 0: the clamp).
# An update M' = M + sigma(K)^T U with U = V (linear) or U = V - R(K) (delta), z' = z + colsum(sigma(K)):
#   dV = sigma(K) dM',  dsigma(K) = U dM'^T + dz',  and for delta the read R(K) gets dR = -dV.

# Tuning: the block of the memory kernels
BLOCK_T = 32  # rows of a segment per step


@jit
def _sigma(x):
    """sigma(x) = ELU(x) + 1, and its derivative."""
    return tl.where(x > 0, x + 1.0, tl.exp(x)), tl.where(x > 0, 1.0, tl.exp(x))


@jit
def _memory_read(sx, M, z):
    """R = sigma(X) M / denom with denom = max(sigma(X) z, 1e-6), row-wise (eq. 3): an empty memory reads 0.
    Returns R, denom."""
    denom = tl.maximum(tl.sum(sx * z[None, :], 1), 1e-6)
    return tl.dot(sx, M) / denom[:, None], denom


@jit
def _memory_read_grad(sx, M, z, R, denom, dR):
    """Gradients of a read R = sigma(X) M / denom: (dsigma(X), dM, dz)."""
    dnum = dR / denom[:, None]
    g = tl.where(denom > 1e-6, -tl.sum(dR * R, 1) / denom, 0.0)
    dsx = tl.dot(dnum, tl.trans(M)) + g[:, None] * z[None, :]
    return dsx, tl.dot(tl.trans(sx), dnum), tl.sum(sx * g[:, None], 0)


@jit
def _features(ptr, rows, end, BLOCK_D: tl.constexpr):
    """sigma of the rows of one head's (., D) matrix before end, in fp32 (rows past end are 0), and sigma'."""
    x = _load_rows(ptr, rows, end, BLOCK_D).to(tl.float32)
    sx, dsx = _sigma(x)
    live = rows[:, None] < end
    return tl.where(live, sx, 0.0), dsx


@jit
def _infini_memory_fwd_kernel(Q, K, V, M0, Z0, A, M_OUT, Z_OUT, MS, ZS, T, Tq, N, n_segments,
                              DELTA_RULE: tl.constexpr, SAVE: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Grid (B * H,): one head's memory through all segments. A = the memory reads of the Tq queries (fp32)."""
    bh = tl.program_id(0).to(tl.int64)
    offset = T - Tq  # the queries are the last Tq of the T positions
    offs_d = tl.arange(0, BLOCK_D)
    square = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    M = tl.load(M0 + bh * BLOCK_D * BLOCK_D + square)
    z = tl.load(Z0 + bh * BLOCK_D + offs_d)
    q_head, k_head, v_head = Q + bh * Tq * BLOCK_D, K + bh * T * BLOCK_D, V + bh * T * BLOCK_D
    for s in range(0, n_segments):
        start = s * N
        end = tl.minimum(start + N, T)
        if SAVE:  # the memory this segment reads, for the backward
            tl.store(MS + (bh * n_segments + s) * BLOCK_D * BLOCK_D + square, M)
            tl.store(ZS + (bh * n_segments + s) * BLOCK_D + offs_d, z)
        for t0 in range(tl.maximum(start, offset), end, BLOCK_T):  # eq. 3 for this segment's queries
            rows = t0 + tl.arange(0, BLOCK_T)
            sq, _ = _features(q_head, rows - offset, end - offset, BLOCK_D)
            R, _ = _memory_read(sq, M, z)
            tl.store(A + bh * Tq * BLOCK_D + (rows - offset)[:, None] * BLOCK_D + offs_d[None, :], R,
                     mask=rows[:, None] < end)
        dM = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        dz = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            sk, _ = _features(k_head, rows, end, BLOCK_D)
            u = _load_rows(v_head, rows, end, BLOCK_D).to(tl.float32)
            if DELTA_RULE:  # eq. 5: write only what the memory does not already return for these keys
                R, _ = _memory_read(sk, M, z)
                u -= R
            dM += tl.dot(tl.trans(sk), u)  # eq. 4: M += sigma(K)^T V
            dz += tl.sum(sk, 0)  # z += sum_t sigma(K_t)
        written = end - start == N  # a complete segment is written (a partial one waits in the cache)
        M += tl.where(written, dM, 0.0)
        z += tl.where(written, dz, 0.0)
    tl.store(M_OUT + bh * BLOCK_D * BLOCK_D + square, M)
    tl.store(Z_OUT + bh * BLOCK_D + offs_d, z)


@jit
def _infini_memory_bwd_kernel(Q, K, V, DA, MS, ZS, DM_OUT, DZ_OUT, DQ, DK, DV, DM0, DZ0, T, Tq, N, n_segments,
                              DELTA_RULE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B * H,): the segments in reverse; dM, dz are the gradients of the memory after segment s."""
    bh = tl.program_id(0).to(tl.int64)
    offset = T - Tq
    offs_d = tl.arange(0, BLOCK_D)
    square = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    dM = tl.load(DM_OUT + bh * BLOCK_D * BLOCK_D + square)
    dz = tl.load(DZ_OUT + bh * BLOCK_D + offs_d)
    q_head, k_head, v_head = Q + bh * Tq * BLOCK_D, K + bh * T * BLOCK_D, V + bh * T * BLOCK_D
    for step in range(0, n_segments):
        s = n_segments - 1 - step
        start = s * N
        end = tl.minimum(start + N, T)
        M = tl.load(MS + (bh * n_segments + s) * BLOCK_D * BLOCK_D + square)  # the memory before segment s
        z = tl.load(ZS + (bh * n_segments + s) * BLOCK_D + offs_d)
        dM_before, dz_before = dM, dz  # M_s = M_{s-1} + update: the identity part
        for t0 in range(start, end, BLOCK_T):  # the write (eq. 4, 5); a partial segment was not written
            rows = t0 + tl.arange(0, BLOCK_T)
            live = rows[:, None] < end
            written = end - start == N
            sk, dsigma = _features(k_head, rows, end, BLOCK_D)
            u = _load_rows(v_head, rows, end, BLOCK_D).to(tl.float32)
            dv = tl.dot(sk, dM)
            if DELTA_RULE:
                R, denom = _memory_read(sk, M, z)
                dsk, dM_read, dz_read = _memory_read_grad(sk, M, z, R, denom, -dv)
                dM_before += tl.where(written, dM_read, 0.0)
                dz_before += tl.where(written, dz_read, 0.0)
                u -= R
            else:
                dsk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            dsk += tl.dot(u, tl.trans(dM)) + dz[None, :]
            dk = tl.where(live & written, dsk * dsigma, 0.0)
            dv = tl.where(written, dv, 0.0)
            tl.store(DK + bh * T * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], dk, mask=live)
            tl.store(DV + bh * T * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], dv, mask=live)
        for t0 in range(tl.maximum(start, offset), end, BLOCK_T):  # the read (eq. 3)
            rows = t0 + tl.arange(0, BLOCK_T)
            live = rows[:, None] < end
            sq, dsigma = _features(q_head, rows - offset, end - offset, BLOCK_D)
            dR = tl.load(DA + bh * Tq * BLOCK_D + (rows - offset)[:, None] * BLOCK_D + offs_d[None, :], mask=live,
                         other=0.0)
            R, denom = _memory_read(sq, M, z)
            dsq, dM_read, dz_read = _memory_read_grad(sq, M, z, R, denom, dR)
            dM_before += dM_read
            dz_before += dz_read
            tl.store(DQ + bh * Tq * BLOCK_D + (rows - offset)[:, None] * BLOCK_D + offs_d[None, :],
                     dsq * dsigma, mask=live)
        dM, dz = dM_before, dz_before
    tl.store(DM0 + bh * BLOCK_D * BLOCK_D + square, dM)
    tl.store(DZ0 + bh * BLOCK_D + offs_d, dz)


class InfiniMemory(torch.autograd.Function):
    """The memory half of Infini-attention: (q, k, v, M, z) -> (A_mem fp32, M, z after the complete segments)."""

    @staticmethod
    def forward(ctx, q, k, v, M, z, segment_len, update, block_t):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = k.shape
        n_segments = cdiv(T, segment_len)
        save = any(ctx.needs_input_grad[:5])
        a = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        M_out, z_out = torch.empty_like(M), torch.empty_like(z)
        Ms = torch.empty(B, H, n_segments if save else 0, D, D, dtype=torch.float32, device=q.device)
        zs = torch.empty(B, H, n_segments if save else 0, D, dtype=torch.float32, device=q.device)
        _infini_memory_fwd_kernel[(B * H,)](q, k, v, M.contiguous(), z.contiguous(), a, M_out, z_out, Ms, zs, T,
                                            q.size(2), segment_len, n_segments, DELTA_RULE=update == 'delta',
                                            SAVE=save, BLOCK_T=block_t, BLOCK_D=D, **WIDE)
        ctx.save_for_backward(q, k, v, Ms, zs)
        ctx.config = segment_len, update, block_t
        return a, M_out, z_out

    @staticmethod
    def backward(ctx, da, dM, dz):
        q, k, v, Ms, zs = ctx.saved_tensors
        segment_len, update, block_t = ctx.config
        B, H, T, D = k.shape
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = (torch.empty(k.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        dM0, dz0 = torch.empty_like(dM), torch.empty_like(dz)
        _infini_memory_bwd_kernel[(B * H,)](q, k, v, da.contiguous(), Ms, zs, dM.contiguous(), dz.contiguous(), dq,
                                            dk, dv, dM0, dz0, T, q.size(2), segment_len, Ms.size(2),
                                            DELTA_RULE=update == 'delta', BLOCK_T=block_t, BLOCK_D=D, **WIDE)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dM0, dz0, None, None, None


def infini_available(q):
    """Whether infini_memory below runs for q (the attention file also checks config.use_kernels)."""
    return kernel_ready(q) and works_here('Infini memory', q, lambda q: sum(
        t.sum() for t in infini_memory(*tiny_like(q, 3), segment_len=32)).backward())


@torch.compiler.disable  # torch.compile calls it as is: the kernel is fused already
def infini_memory(q, k, v, M=None, z=None, segment_len=64, update='delta', block_t=BLOCK_T):
    """The memory half of Infini-attention for every segment in one launch (eq. 3-5), no Python loop.

    q (B, H, Tq, D) are the last Tq of the T positions of k, v (B, H, T, D); position 0 starts a segment; all
    un-rotated. Returns A_mem (B, H, Tq, D) in fp32 and the memory M (B, H, D, D), z (B, H, D) (fp32) after every
    complete segment. Differentiable in q, k, v and the incoming M, z. attention_infini.py adds the local
    attention and the gate; its reference loop is what this must agree with.
    """
    if triton is None:
        raise RuntimeError("kernels.infini_memory needs triton; use attention_infini.infini_attention")
    check_qkv(q, k, v)
    if update not in ('linear', 'delta'):
        raise ValueError(f"unknown memory update '{update}', choose linear or delta")
    B, H, T, D = k.shape
    if M is None:
        M = torch.zeros(B, H, D, D, dtype=torch.float32, device=q.device)
        z = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    with torch.cuda.device_of(q):  # Triton launches on the current GPU (cuda:1 too); the backward is on q's already
        return InfiniMemory.apply(q, k, v, M.float(), z.float(), segment_len, update, block_t)
