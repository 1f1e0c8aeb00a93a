"""Triton kernels for prompt attention: flash attention whose keys are a prefix shared by the batch + per-sample keys.

The prefix K/V (``[H, P, D]``, ``[1, H, P, D]`` or ``[B, H, P, D]``) is read through its own pointer with a batch
stride of 0 when it is broadcast, so it is never expanded or concatenated in memory. Each query block walks the prefix
tiles (sized from P), then the token tiles (sized from the key length), with one online softmax across both. Logits
are kept in base 2 (``exp2``) with ``log2(e)`` folded into the scale; the saved log-sum-exp is in the same units.

Tiles (:func:`attention_tiles`) minimise padding: the query block is the largest of 128/64/32 rows whose padded row
count is within 3% of the smallest (N = 197 -> 32, 224 rows, not 256), the key block likewise from 64/32, the prefix
block from 32/16 (fp32 and head dims above 64 cap them to fit registers). Executed/useful MMA FLOPs follow from them
(:func:`mma_flops`): 1.28 forward + backward at ViT-B/16 with P = 16. The price of 32-row query blocks is mma.sync on
sm_90 (wgmma needs 64 rows per warpgroup, which would pad N = 197 to 256); longer sequences get 64/128-row blocks.

Layout: q/k/v/prefix are read through their strides (any layout with a unit head-dim stride, e.g. head-split views
of one packed ``[B, N, 3, H, D]`` projection); o and the gradients are written token-major (``[B, N, H, D]`` memory,
returned as ``[B, H, N, D]`` views), so ``o.transpose(1, 2).reshape(B, N, H * D)`` is free. When q, k, v are the
three slots of one packed projection the gradients are written into one packed ``[B, N, 3, H, D]`` buffer, which the
projection's backward consumes as its ``[B * N, 3E]`` output gradient without a copy.

Backward (FlashAttention-2, 5 matmuls per tile pair): ``delta = rowsum(dO * O)``; then one kernel in which each
program owns one head and a slice of the batch and, per sample, walks the key blocks (prefix blocks, then token
blocks). For each key block it holds K, V and the dK, dV accumulators and streams the query blocks: S, dP, dV, dK and
dQ, with dQ accumulated in an fp32 scratch row block that only this program touches (read-modify-write ordered by a
CTA barrier, no atomics, bitwise deterministic). The prefix gradient is summed where P and dS exist: a batch-shared
prefix accumulates into an fp32 ``[S, H, P, D]`` partial per (split, head), summed over ``S`` afterwards; a
per-sample prefix is written directly. Grids are 1-D (``grid[0]`` up to 2**31 - 1), so no input the dispatcher
accepts exceeds CUDA's 65,535 limit on the other axes.

fp32 inputs use ``tf32x3`` (three TF32 tensor-core products per dot, error on par with fp32 FMA): same precision
trick as SDPA's fp32 memory-efficient kernel on sm_80+, while keeping the fused prefix (no concatenation).

Importing this module imports triton; the package imports it lazily, only when the triton backend runs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rpp_kernels.ops._triton import dot_precision, num_sms
from rpp_kernels.ops.attention import packed_slots

LOG2E = 1.4426950408889634
MAX_GRID_X = 2**31 - 1
QUERY_BLOCKS = (128, 64, 32)
KEY_BLOCKS = (64, 32)
PREFIX_BLOCKS = (32, 16)  # P = 50 pads to 64 with either; 64 would spill in the backward
PAD_SLACK = 1.03  # a larger block may pad up to 3% more rows than the tightest one


def pick_block(n: int, candidates: tuple[int, ...]) -> int:
    """Largest block whose padded length ``cdiv(n, b) * b`` is within ``PAD_SLACK`` of the smallest; 16 for n <= 16."""
    if n <= 16:
        return 16
    padded = {b: triton.cdiv(n, b) * b for b in candidates}
    best = min(padded.values())
    return max(b for b, p in padded.items() if p <= best * PAD_SLACK)


def attention_tiles(n_q: int, n_k: int, n_prefix: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options of the forward and backward kernels for one problem (see the module docstring).

    Register budgets (checked by the specialised sm_80/sm_90 compiles in tests/ops/test_attention.py): tf32x3 keeps hi
    and lo halves of fp32 operands and head dims above 64 pad to 128, so those cases cap the key blocks (the backward
    holds K, V, dK, dV of one key block) and use more warps; the backward streams at most 64 query rows.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32, wide = dtype == torch.float32, block_d > 64
    queries = (32,) if fp32 else (64, 32) if wide else QUERY_BLOCKS
    # fp32 at head dim 32 spills with 32-key blocks (its MMA layout differs from 64's): 16 like the wide ones.
    keys = ((32,) if block_d == 64 else (16,)) if fp32 else (32,) if wide else KEY_BLOCKS
    block_m = pick_block(n_q, queries)
    block_n = pick_block(n_k, keys)
    # The prefix block also holds the fp32 partial it accumulates into: one step smaller for fp32.
    block_p = pick_block(n_prefix, tuple(b for b in PREFIX_BLOCKS if b <= (16 if fp32 else keys[0])))
    block_m_bwd = min(block_m, 64)
    if fp32:
        fwd = {"num_warps": 8, "num_stages": 2}
        bwd = {"num_warps": 8, "num_stages": 1 if wide else 2}
    else:
        fwd = {"num_warps": 2 if block_m <= 32 else 4 if block_m == 64 else 8, "num_stages": 2 if wide else 3}
        # The backward keeps K, V, dK, dV of a key block and five score-sized tiles live: with four warps sm_90's
        # ptxas caps registers at 168 and spills (P = 50); eight warps halve each thread's share.
        bwd = {"num_warps": 8, "num_stages": 2}
    return {
        "BLOCK_D": block_d,
        "BLOCK_M": block_m,
        "BLOCK_M_BWD": block_m_bwd,
        "BLOCK_N": block_n,
        "BLOCK_P": block_p,
        "fwd": fwd,
        "bwd": bwd,
    }


def mma_flops(batch: int, heads: int, n_q: int, n_k: int, n_prefix: int, head_dim: int, causal: bool, tiles: dict):
    """(executed, useful) MMA FLOPs of forward (2 matmuls) + backward (5 matmuls) with these tiles.

    Executed counts every tile pair the kernels visit at the padded sizes (causal: token tiles up to the diagonal);
    useful counts ``query x visible key`` pairs at the true head dim.
    """
    bn, bp, bd = tiles["BLOCK_N"], tiles["BLOCK_P"], tiles["BLOCK_D"]
    padded_prefix = triton.cdiv(n_prefix, bp) * bp
    executed = 0
    for bm, matmuls in ((tiles["BLOCK_M"], 2), (tiles["BLOCK_M_BWD"], 5)):
        m_blocks = triton.cdiv(n_q, bm)
        if causal and matmuls == 2:  # query block i stops at the diagonal
            token = sum(triton.cdiv(min(n_k, (i + 1) * bm), bn) * bn * bm for i in range(m_blocks))
        elif causal:  # key block j starts at the query block holding row j * bn
            token = sum((m_blocks - (j * bn) // bm) * bm * bn for j in range(triton.cdiv(n_k, bn)))
        else:
            token = m_blocks * bm * triton.cdiv(n_k, bn) * bn
        executed += matmuls * (m_blocks * bm * padded_prefix + token)
    # Causal: query i sees the prefix and tokens j <= i.
    visible = n_q * n_prefix + (sum(min(i + 1, n_k) for i in range(n_q)) if causal else n_q * n_k)
    per_pair = 2 * batch * heads
    executed *= per_pair * bd
    return executed, per_pair * head_dim * 7 * visible


@triton.jit
def _rows(base, offs, stride, ALIGN: tl.constexpr):
    """Element offsets ``[R, 1]`` of rows ``offs``; the launcher checked every stride is a multiple of ``ALIGN``, which
    lets head dims like 72 or 88 (row strides not divisible by 16) still use 16-byte vector loads."""
    return tl.multiple_of(base + offs[:, None] * stride, [ALIGN, 1])


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_ptr,
    v_ptr,
    k_off,
    v_off,
    stride_kn,
    stride_vn,
    offs_m,
    offs_d,
    n_keys,
    hi,
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of ``acc, m_i, l_i`` over keys ``[0, hi)`` of one key/value source."""
    mask_d = offs_d[None, :] < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        mask_kv = mask_n[:, None] & mask_d
        k = tl.load(k_ptr + _rows(k_off, offs_n, stride_kn, ALIGN) + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = mask_n[None, :]
        if CAUSAL:
            # Only diagonal tiles need it, but the select is cheap next to the two dots.
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf) = nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + _rows(v_off, offs_n, stride_vn, ALIGN) + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Sizes are not specialised (do_not_specialize, here and below): a launch with P = 1 or N = 1 would otherwise compile a
# variant with those loops unrolled, with a different register allocation (it spilled) than every other size runs.
@triton.jit(do_not_specialize=["n_heads", "n_q", "n_k", "n_prefix"])
def _prompt_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pk_ptr,
    pv_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_ob,
    stride_oh,
    stride_on,
    n_heads,
    n_q,
    n_k,
    n_prefix,
    qk_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1-D grid: consecutive programs are the query blocks of one (batch, head), which share its K/V in L2.
    m_blocks = tl.cdiv(n_q, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // m_blocks
    start_m = (pid % m_blocks) * BLOCK_M
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_q = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q_rows = _rows(off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, ALIGN)
    q = tl.load(q_ptr + q_rows + offs_d[None, :], mask=mask_q, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Prefix keys are visible to every query (causal or not); stride_pkb is 0 for a batch-shared prefix.
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q,
        pk_ptr, pv_ptr, off_b * stride_pkb + off_h * stride_pkh, off_b * stride_pvb + off_h * stride_pvh,
        stride_pkn, stride_pvn, offs_m, offs_d, n_prefix, n_prefix, qk_scale,
        False, BLOCK_P, HEAD_DIM, ALIGN, DOT_PRECISION,
    )  # fmt: skip
    hi = tl.minimum(n_k, start_m + BLOCK_M) if CAUSAL else n_k
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q,
        k_ptr, v_ptr, off_b * stride_kb + off_h * stride_kh, off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, offs_m, offs_d, n_k, hi, qk_scale,
        CAUSAL, BLOCK_N, HEAD_DIM, ALIGN, DOT_PRECISION,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    o_rows = _rows(off_b * stride_ob + off_h * stride_oh, offs_m, stride_on, ALIGN)
    tl.store(o_ptr + o_rows + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask_q)
    tl.store(lse_ptr + off_bh.to(tl.int64) * n_q + offs_m, m_i + tl.log2(l_i), mask=offs_m < n_q)


@triton.jit(do_not_specialize=["n_heads", "n_q"])
def _bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    stride_dob,
    stride_doh,
    stride_don,
    n_heads,
    n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32: the softmax-Jacobian term shared by every key block."""
    m_blocks = tl.cdiv(n_q, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // m_blocks
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o_rows = _rows(off_b * stride_ob + off_h * stride_oh, offs_m, stride_on, ALIGN)
    do_rows = _rows(off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, ALIGN)
    o = tl.load(o_ptr + o_rows + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + do_rows + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + off_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _bwd_key_block(
    k,
    v,
    q_ptr,
    do_ptr,
    q_off,
    do_off,
    lse_base,
    delta_base,
    dq_base,
    stride_qn,
    stride_don,
    offs_n,
    offs_d,
    lo,
    n_q,
    qk_scale,
    sm_scale,
    first,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block against query rows ``[lo, n_q)``: returns dK (scaled), dV; adds dQ (scaled) into the scratch.

    Scores are formed transposed (``[BLOCK_N, BLOCK_M]``) so dV = P^T dO and dK = dS^T Q need no transposed store;
    dQ = dS K is the fifth matmul. ``first``: this is the sample's first key block (it meets every query block), so
    dQ is stored instead of accumulated and the scratch needs no zeroing.
    """
    mask_d = offs_d[None, :] < HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_q
        mask_q = mask_m[:, None] & mask_d
        q = tl.load(q_ptr + _rows(q_off, offs_m, stride_qn, ALIGN) + offs_d[None, :], mask=mask_q, other=0.0)
        do = tl.load(do_ptr + _rows(do_off, offs_m, stride_don, ALIGN) + offs_d[None, :], mask=mask_q, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        valid = mask_m[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(valid, tl.exp2(qk_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * sm_scale
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
        dq_ptrs = dq_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]
        if not first:
            dq += tl.load(dq_ptrs, mask=mask_m[:, None], other=0.0)
        tl.store(dq_ptrs, dq, mask=mask_m[:, None])
    # The next key block re-reads these dQ rows, possibly in other threads: order the stores before those loads.
    tl.debug_barrier()
    return dk, dv


@triton.jit(do_not_specialize=["n_batch", "n_heads", "n_q", "n_k", "n_prefix", "n_splits"])
def _prompt_attn_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pk_ptr,
    pv_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dpk_ptr,
    dpv_ptr,
    dq_acc_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    n_batch,
    n_heads,
    n_q,
    n_k,
    n_prefix,
    n_splits,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (split, head) computes dQ, dK, dV of samples ``split, split + S, ...`` and their prefix gradient.

    dpk/dpv: fp32 ``[S, H, P, D]``; a batch-shared prefix sums its samples into the program's own slice (S small), a
    per-sample prefix has ``S == B`` (one sample per program) and the slice is that sample's gradient.
    dq_acc: fp32 ``[S * H, n_q_pad, BLOCK_D]`` scratch, one slab per program, reused for each of its samples.
    """
    pid = tl.program_id(0)
    split = pid // n_heads
    off_h = (pid % n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    dq_base = dq_acc_ptr + pid.to(tl.int64) * tl.cdiv(n_q, BLOCK_M) * BLOCK_M * BLOCK_D
    part = (split.to(tl.int64) * n_heads + off_h) * n_prefix * HEAD_DIM
    for b in range(split, n_batch, n_splits):
        off_b = tl.cast(b, tl.int64)
        off_bh = off_b * n_heads + off_h
        q_off = off_b * stride_qb + off_h * stride_qh
        do_off = off_b * stride_dob + off_h * stride_doh
        lse_base = lse_ptr + off_bh * n_q
        delta_base = delta_ptr + off_bh * n_q
        for start_n in range(0, n_prefix, BLOCK_P):
            offs_n = start_n + tl.arange(0, BLOCK_P)
            mask_kv = (offs_n[:, None] < n_prefix) & mask_d
            pk_rows = _rows(off_b * stride_pkb + off_h * stride_pkh, offs_n, stride_pkn, ALIGN)
            pv_rows = _rows(off_b * stride_pvb + off_h * stride_pvh, offs_n, stride_pvn, ALIGN)
            k = tl.load(pk_ptr + pk_rows + offs_d[None, :], mask=mask_kv, other=0.0)
            v = tl.load(pv_ptr + pv_rows + offs_d[None, :], mask=mask_kv, other=0.0)
            dk, dv = _bwd_key_block(
                k, v, q_ptr, do_ptr, q_off, do_off, lse_base, delta_base, dq_base, stride_qn, stride_don, offs_n,
                offs_d, 0, n_q, qk_scale, sm_scale, start_n == 0,
                False, BLOCK_M, BLOCK_P, BLOCK_D, HEAD_DIM, ALIGN, DOT_PRECISION,
            )  # fmt: skip
            # Prefix keys are visible to every query, so no causal mask; the partial is only this program's.
            out = part + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            if b != split:
                dk += tl.load(dpk_ptr + out, mask=mask_kv, other=0.0)
                dv += tl.load(dpv_ptr + out, mask=mask_kv, other=0.0)
            tl.store(dpk_ptr + out, dk, mask=mask_kv)
            tl.store(dpv_ptr + out, dv, mask=mask_kv)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_kv = (offs_n[:, None] < n_k) & mask_d
            k = tl.load(
                k_ptr + _rows(off_b * stride_kb + off_h * stride_kh, offs_n, stride_kn, ALIGN) + offs_d[None, :],
                mask=mask_kv, other=0.0,
            )  # fmt: skip
            v = tl.load(
                v_ptr + _rows(off_b * stride_vb + off_h * stride_vh, offs_n, stride_vn, ALIGN) + offs_d[None, :],
                mask=mask_kv, other=0.0,
            )  # fmt: skip
            # Causal: queries before this key block cannot see it; start at the query block holding row start_n.
            lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
            dk, dv = _bwd_key_block(
                k, v, q_ptr, do_ptr, q_off, do_off, lse_base, delta_base, dq_base, stride_qn, stride_don, offs_n,
                offs_d, lo, n_q, qk_scale, sm_scale, (start_n == 0) & (n_prefix == 0),
                CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, ALIGN, DOT_PRECISION,
            )  # fmt: skip
            dk_rows = _rows(off_b * stride_dkb + off_h * stride_dkh, offs_n, stride_dkn, ALIGN)
            dv_rows = _rows(off_b * stride_dvb + off_h * stride_dvh, offs_n, stride_dvn, ALIGN)
            tl.store(dk_ptr + dk_rows + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_kv)
            tl.store(dv_ptr + dv_rows + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask_kv)
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_q = (offs_m[:, None] < n_q) & mask_d
            dq = tl.load(dq_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=mask_q, other=0.0)
            dq_rows = _rows(off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqn, ALIGN)
            tl.store(dq_ptr + dq_rows + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask_q)
        # The next sample overwrites the scratch rows just read (maybe by other threads).
        tl.debug_barrier()


def _align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing every stride but the unit head-dim one: the kernels'
    ``ALIGN`` hint, which keeps 16-byte vector loads for head dims that are not multiples of 16."""
    g = 16
    for t in tensors:
        g = math.gcd(g, *t.stride()[:-1])
    return g or 16


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels address the head dim with stride 1; any other layout (rare) is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


def _token_major(batch: int, heads: int, n: int, head_dim: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised ``[B, H, N, D]`` view of ``[B, N, H, D]`` memory (the layout the module's output wants)."""
    out = torch.empty((batch, n, heads, head_dim), dtype=dtype or like.dtype, device=like.device)
    return out.transpose(1, 2)


def _grad_buffers(q, k, v):
    """dq, dk, dv: slots of one packed ``[B, N, 3, H, D]`` buffer when q, k, v are, else token-major each."""
    batch, heads, n, dim = q.shape
    if packed_slots(q, k, v):
        packed = torch.empty((batch, n, 3, heads, dim), dtype=q.dtype, device=q.device)
        return tuple(packed[:, :, i].transpose(1, 2) for i in range(3))
    return (
        _token_major(batch, heads, n, dim, q),
        _token_major(batch, heads, k.shape[2], dim, k),
        _token_major(batch, heads, k.shape[2], dim, v),
    )


def _prefix_args(prefix_k, prefix_v, k, v):
    """Prefix K/V as 4-D views with (batch, head, row) strides, batch stride 0 when shared; plus batch size and P.

    Without prefix rows the kernels never dereference the prefix pointers; k and v stand in for them.
    """
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return k, (0, 0, 0), v, (0, 0, 0), 1, 0
    out = []
    for prefix in (prefix_k, prefix_v):
        p4 = _unit_stride(prefix if prefix.dim() == 4 else prefix.unsqueeze(0))
        out += [p4, (0 if p4.shape[0] == 1 else p4.stride(0), p4.stride(1), p4.stride(2))]
    return (*out, out[0].shape[0], out[0].shape[2])


def _scales(head_dim: int, softmax_scale: float | None) -> tuple[float, float]:
    sm_scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    return sm_scale, sm_scale * LOG2E


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_grid(name: str, programs: int) -> None:
    if programs > MAX_GRID_X:
        raise ValueError(f"prompt_attention: {name} needs {programs} programs, over CUDA's grid limit {MAX_GRID_X}")


def prompt_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    causal: bool,
    softmax_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher. q: ``[B, H, N, D]``, k/v: ``[B, H, N_k, D]``, prefix: ``[H, P, D] | [1|B, H, P, D] | None``.

    Returns ``o [B, H, N, D]`` (a view of token-major ``[B, N, H, D]`` memory, q's dtype) and the base-2
    log-sum-exp ``lse [B, H, N]`` in fp32.
    """
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    pk, pk_strides, pv, pv_strides, _, n_prefix = _prefix_args(prefix_k, prefix_v, k, v)
    o = _token_major(batch, heads, n_q, head_dim, q)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    _, qk_scale = _scales(head_dim, softmax_scale)
    t = attention_tiles(n_q, n_k, n_prefix, head_dim, q.dtype)
    programs = batch * heads * triton.cdiv(n_q, t["BLOCK_M"])
    _check_grid("the forward", programs)
    _prompt_attn_fwd_kernel[(programs,)](
        q, k, v, pk, pv, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *pk_strides, *pv_strides, *_strides(o),
        heads, n_q, n_k, n_prefix, qk_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=t["BLOCK_D"], BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"],
        BLOCK_P=t["BLOCK_P"], ALIGN=_align(q, k, v, pk, pv, o), DOT_PRECISION=dot_precision(q.dtype, fp32="tf32x3"),
        **t["fwd"],
    )  # fmt: skip
    return o, lse


def prefix_splits(batch: int, heads: int, device: torch.device) -> int:
    """Batch slices of the backward (without a per-sample prefix): about four programs per SM, at most ``batch``.

    More slices fill the GPU; fewer keep the fp32 dQ scratch and ``[S, H, P, D]`` prefix partial (and its sum) small.
    """
    return max(1, min(batch, math.ceil(4 * num_sms(device) / max(1, heads))))


def prompt_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher: ``dq, dk, dv`` (shaped like q, k, v; one packed buffer when q, k, v are packed slots) and
    ``dprefix_k, dprefix_v`` in the prefix's own shape.

    A shared prefix's gradient is summed over the batch from an fp32 ``[S, H, P, D]`` partial (S small), never a
    ``[B, H, P, D]`` tensor.
    """
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    pk, pk_strides, pv, pv_strides, prefix_batch, n_prefix = _prefix_args(prefix_k, prefix_v, k, v)
    dq, dk, dv = _grad_buffers(q, k, v)
    dpk = dpv = None
    if prefix_k is not None:
        dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if batch * heads == 0 or n_q == 0:
        for g in (dq, dk, dv, dpk, dpv):
            if g is not None:
                g.zero_()
        return dq, dk, dv, dpk, dpv
    sm_scale, qk_scale = _scales(head_dim, softmax_scale)
    t = attention_tiles(n_q, n_k, n_prefix, head_dim, q.dtype)
    block_d, block_m = t["BLOCK_D"], t["BLOCK_M_BWD"]

    delta = torch.empty_like(lse)
    pre_m = pick_block(n_q, (64, 32))
    programs = batch * heads * triton.cdiv(n_q, pre_m)
    _check_grid("the backward preprocess", programs)
    _bwd_preprocess_kernel[(programs,)](
        o, do, delta, *_strides(o), *_strides(do), heads, n_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m, ALIGN=_align(o, do),
    )  # fmt: skip

    # A per-sample prefix's partial is that sample's gradient (one sample per program); otherwise programs walk
    # several samples, which bounds the dQ scratch and the prefix partial to a few programs per SM.
    splits = batch if n_prefix > 0 and prefix_batch == batch else prefix_splits(batch, heads, q.device)
    programs = splits * heads
    _check_grid("the backward", programs)
    part_k = torch.empty((splits, heads, n_prefix, head_dim), dtype=torch.float32, device=q.device)
    part_v = torch.empty_like(part_k)
    dq_acc = torch.empty((programs, triton.cdiv(n_q, block_m) * block_m, block_d), dtype=torch.float32, device=q.device)
    _prompt_attn_bwd_kernel[(programs,)](
        q, k, v, pk, pv, do, lse, delta, dq, dk, dv, part_k, part_v, dq_acc,
        *_strides(q), *_strides(k), *_strides(v), *pk_strides, *pv_strides, *_strides(do),
        *_strides(dq), *_strides(dk), *_strides(dv),
        batch, heads, n_q, n_k, n_prefix, splits, qk_scale, sm_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=t["BLOCK_N"],
        BLOCK_P=t["BLOCK_P"], ALIGN=_align(q, k, v, pk, pv, do, dq, dk, dv),
        DOT_PRECISION=dot_precision(q.dtype, fp32="tf32x3"), **t["bwd"],
    )  # fmt: skip
    if dpk is not None:
        if n_prefix == 0:
            dpk.zero_(), dpv.zero_()
        elif prefix_batch == batch:
            dpk.copy_(part_k.view(dpk.shape))
            dpv.copy_(part_v.view(dpv.shape))
        else:
            dpk.copy_(part_k.sum(0).view(dpk.shape))
            dpv.copy_(part_v.sum(0).view(dpv.shape))
    return dq, dk, dv, dpk, dpv
