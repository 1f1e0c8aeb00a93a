"""Triton kernels for prompt attention: flash attention whose keys are a prefix shared by the batch + per-sample keys.

The prefix K/V (``[H, P, D]``, ``[1, H, P, D]`` or ``[B, H, P, D]``) is read through its own pointer with a batch
stride of 0 when it is broadcast, so it is never expanded or concatenated in memory. Each query block walks the prefix
tiles, then the token tiles, with one online softmax across both. Logits are kept in base 2 (``exp2``) with
``log2(e)`` folded into the scale; the saved log-sum-exp is in the same base-2 units.

Backward (FlashAttention-2 split): ``delta = rowsum(dO * O)``; one kernel per key block of the tokens (dK, dV);
one per query block (dQ, over prefix and token keys); and one for the prefix keys (dprefix_K, dprefix_V). The
prefix kernel gives each program a slice of the batch and writes an fp32 partial ``[S, H, P, D]`` with ``S`` small
(about two programs per SM), summed over ``S`` afterwards. We chose this over atomics into fp32 accumulators because
it is deterministic (bitwise reproducible gradients for the prompts, which is what gets trained) and it never holds a
``[B, H, P, D]`` gradient; with ``S`` programs per (prefix block, head) the GPU stays full even though H * P is small.

Importing this module imports triton; the package imports it lazily, only when the triton backend runs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rpp_kernels.ops._triton import dot_precision

LOG2E = 1.4426950408889634
# Row blocks for short sequences shrink to the next power of two (>= 16, the smallest tl.dot tile) so the text shape
# (N = 16) does not compute 128-row tiles of padding; every value here is compiled ahead of time by the tests.
ROW_BLOCKS = (16, 32, 64, 128)


def _row_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def fwd_config(dtype: torch.dtype, block_d: int) -> dict:
    """Largest tiles and launch options of the forward kernel (smaller row blocks are used for short inputs)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if block_d <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def bwd_config(dtype: torch.dtype, block_d: int) -> dict:
    """Tiles of the backward kernels: the key block (``BLOCK_N``) is held, the query block (``BLOCK_M``) streamed."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if block_d <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
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
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of ``acc, m_i, l_i`` over keys ``[0, hi)`` of one key/value source."""
    mask_d = offs_d < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None])
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
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
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
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
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_q = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_q
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Prefix keys are visible to every query (causal or not); stride_pkb is 0 for a batch-shared prefix.
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q,
        pk_ptr + off_b * stride_pkb + off_h * stride_pkh, pv_ptr + off_b * stride_pvb + off_h * stride_pvh,
        stride_pkn, stride_pvn, offs_m, offs_d, n_prefix, n_prefix, qk_scale,
        False, BLOCK_N, HEAD_DIM, DOT_PRECISION,
    )  # fmt: skip
    hi = tl.minimum(n_k, start_m + BLOCK_M) if CAUSAL else n_k
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q,
        k_ptr + off_b * stride_kb + off_h * stride_kh, v_ptr + off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, offs_m, offs_d, n_k, hi, qk_scale,
        CAUSAL, BLOCK_N, HEAD_DIM, DOT_PRECISION,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    o = o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=mask_q)
    tl.store(lse_ptr + off_bh.to(tl.int64) * n_q + offs_m, m_i + tl.log2(l_i), mask=offs_m < n_q)


@triton.jit
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
):
    """delta = rowsum(dO * O) in fp32: the softmax-Jacobian term shared by every key block."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask
    )
    do = tl.load(
        do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + off_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _bwd_kv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qn,
    stride_don,
    offs_n,
    offs_d,
    lo,
    n_q,
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV (unscaled) of one key block over query rows ``[lo, n_q)`` of one (batch, head)."""
    mask_d = offs_d < HEAD_DIM
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_q
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :])
        lse = tl.load(lse_base + offs_m, mask=mask_m)
        delta = tl.load(delta_base + offs_m, mask=mask_m)
        # Transposed scores [BLOCK_N, BLOCK_M], so dV = P^T dO and dK = dS^T Q need no transposed stores.
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        valid = mask_m[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(valid, tl.exp2(qk_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _prompt_attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    n_heads,
    n_q,
    n_k,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of the per-sample keys; dk/dv are contiguous [B, H, N_k, D]."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_kv = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        k_ptr + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=mask_kv
    )
    v = tl.load(
        v_ptr + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask_kv
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Causal: queries before this key block cannot see it; start at the query block holding row start_n.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    dk, dv = _bwd_kv_tiles(
        dk, dv, k, v,
        q_ptr + off_b * stride_qb + off_h * stride_qh, do_ptr + off_b * stride_dob + off_h * stride_doh,
        lse_ptr + off_bh.to(tl.int64) * n_q, delta_ptr + off_bh.to(tl.int64) * n_q,
        stride_qn, stride_don, offs_n, offs_d, lo, n_q, qk_scale,
        CAUSAL, BLOCK_M, HEAD_DIM, DOT_PRECISION,
    )  # fmt: skip
    out = off_bh.to(tl.int64) * n_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_kv)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask_kv)


@triton.jit
def _prompt_attn_bwd_prefix_kernel(
    q_ptr,
    pk_ptr,
    pv_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dpk_ptr,
    dpv_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_dob,
    stride_doh,
    stride_don,
    n_batch,
    n_heads,
    n_q,
    n_prefix,
    n_splits,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial dprefix_K, dprefix_V of one prefix block, summed over the batch rows ``split, split + S, ...``.

    Writes fp32 ``[S, H, P, D]``. For a per-sample prefix ``S == B`` and each split is one sample, so the partial is
    the gradient itself. Prefix keys are visible to every query, so no causal mask applies here.
    """
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_kv = (offs_n[:, None] < n_prefix) & (offs_d[None, :] < HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b in range(split, n_batch, n_splits):
        off_b = tl.cast(b, tl.int64)
        # Re-read per sample: stride 0 makes this the same tile (cache hit) for a shared prefix.
        k = tl.load(
            pk_ptr + off_b * stride_pkb + off_h * stride_pkh + offs_n[:, None] * stride_pkn + offs_d[None, :],
            mask=mask_kv,
        )
        v = tl.load(
            pv_ptr + off_b * stride_pvb + off_h * stride_pvh + offs_n[:, None] * stride_pvn + offs_d[None, :],
            mask=mask_kv,
        )
        off_bh = off_b * n_heads + off_h
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v,
            q_ptr + off_b * stride_qb + off_h * stride_qh, do_ptr + off_b * stride_dob + off_h * stride_doh,
            lse_ptr + off_bh * n_q, delta_ptr + off_bh * n_q,
            stride_qn, stride_don, offs_n, offs_d, 0, n_q, qk_scale,
            False, BLOCK_M, HEAD_DIM, DOT_PRECISION,
        )  # fmt: skip
    out = (split.to(tl.int64) * n_heads + off_h) * n_prefix * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dpk_ptr + out, dk * sm_scale, mask=mask_kv)
    tl.store(dpv_ptr + out, dv, mask=mask_kv)


@triton.jit
def _bwd_q_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
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
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one query block over keys ``[0, hi)`` of one key/value source."""
    mask_d = offs_d < HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _prompt_attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pk_ptr,
    pv_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
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
    n_heads,
    n_q,
    n_k,
    n_prefix,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ over prefix and token keys; dq is contiguous [B, H, N_q, D]."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_q = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_q
    )
    do = tl.load(
        do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask_q
    )
    lse = tl.load(lse_ptr + off_bh.to(tl.int64) * n_q + offs_m, mask=mask_m)
    delta = tl.load(delta_ptr + off_bh.to(tl.int64) * n_q + offs_m, mask=mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta,
        pk_ptr + off_b * stride_pkb + off_h * stride_pkh, pv_ptr + off_b * stride_pvb + off_h * stride_pvh,
        stride_pkn, stride_pvn, offs_m, offs_d, n_prefix, n_prefix, qk_scale,
        False, BLOCK_N, HEAD_DIM, DOT_PRECISION,
    )  # fmt: skip
    hi = tl.minimum(n_k, start_m + BLOCK_M) if CAUSAL else n_k
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta,
        k_ptr + off_b * stride_kb + off_h * stride_kh, v_ptr + off_b * stride_vb + off_h * stride_vh,
        stride_kn, stride_vn, offs_m, offs_d, n_k, hi, qk_scale,
        CAUSAL, BLOCK_N, HEAD_DIM, DOT_PRECISION,
    )  # fmt: skip
    out = off_bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_q)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels address the head dim with stride 1; any other layout (rare) is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


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

    Returns ``o [B, H, N, D]`` (contiguous, q's dtype) and the base-2 log-sum-exp ``lse [B, H, N]`` in fp32.
    """
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    pk, pk_strides, pv, pv_strides, _, n_prefix = _prefix_args(prefix_k, prefix_v, k, v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    _, qk_scale = _scales(head_dim, softmax_scale)
    block_d = triton.next_power_of_2(head_dim)
    cfg = fwd_config(q.dtype, block_d)
    block_m = _row_block(n_q, cfg["BLOCK_M"])
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _prompt_attn_fwd_kernel[grid](
        q, k, v, pk, pv, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *pk_strides, *pv_strides,
        o.stride(0), o.stride(1), o.stride(2),
        heads, n_q, n_k, n_prefix, qk_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return o, lse


def prefix_splits(batch: int, heads: int, prefix_blocks: int, device: torch.device) -> int:
    """How many batch slices the prefix-gradient kernel uses: about two programs per SM, at most ``batch``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(batch, math.ceil(2 * sms / max(1, heads * prefix_blocks))))


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
    """Backward launcher: ``dq, dk, dv`` (like q, k, v) and ``dprefix_k, dprefix_v`` in the prefix's own shape.

    A shared prefix's gradient is summed over the batch from an fp32 ``[S, H, P, D]`` partial (S small), never a
    ``[B, H, P, D]`` tensor.
    """
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    pk, pk_strides, pv, pv_strides, prefix_batch, n_prefix = _prefix_args(prefix_k, prefix_v, k, v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dpk = dpv = None
    if prefix_k is not None:  # written whole below (the kernel's partial sums are copied in)
        dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if batch * heads == 0 or n_q == 0:
        if dpk is not None:
            dpk.zero_(), dpv.zero_()
        return dq.zero_(), dk.zero_(), dv.zero_(), dpk, dpv
    sm_scale, qk_scale = _scales(head_dim, softmax_scale)
    block_d = triton.next_power_of_2(head_dim)
    cfg = bwd_config(q.dtype, block_d)
    precision = dot_precision(q.dtype)
    block_m = _row_block(n_q, cfg["BLOCK_M"])
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}

    delta = torch.empty_like(lse)
    pre_m = _row_block(n_q, 64)
    _bwd_preprocess_kernel[(triton.cdiv(n_q, pre_m), batch * heads)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        heads, n_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m,
    )  # fmt: skip
    q_strides, do_strides = (q.stride(0), q.stride(1), q.stride(2)), (do.stride(0), do.stride(1), do.stride(2))
    k_strides, v_strides = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
    if n_k > 0:
        block_n = _row_block(n_k, cfg["BLOCK_N"])
        _prompt_attn_bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), batch * heads)](
            q, k, v, do, lse, delta, dk, dv, *q_strides, *k_strides, *v_strides, *do_strides,
            heads, n_q, n_k, qk_scale, sm_scale,
            CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=precision, **launch,
        )  # fmt: skip
    if n_prefix > 0:
        block_p = _row_block(n_prefix, cfg["BLOCK_N"])
        n_blocks = triton.cdiv(n_prefix, block_p)
        splits = batch if prefix_batch == batch else prefix_splits(batch, heads, n_blocks, q.device)
        part_k = torch.empty((splits, heads, n_prefix, head_dim), dtype=torch.float32, device=q.device)
        part_v = torch.empty_like(part_k)
        _prompt_attn_bwd_prefix_kernel[(n_blocks, heads, splits)](
            q, pk, pv, do, lse, delta, part_k, part_v, *q_strides, *pk_strides, *pv_strides, *do_strides,
            batch, heads, n_q, n_prefix, splits, qk_scale, sm_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_p, DOT_PRECISION=precision, **launch,
        )  # fmt: skip
        if prefix_batch == batch:
            dpk.copy_(part_k.view(dpk.shape))
            dpv.copy_(part_v.view(dpv.shape))
        else:
            dpk.copy_(part_k.sum(0).view(dpk.shape))
            dpv.copy_(part_v.sum(0).view(dpv.shape))
    _prompt_attn_bwd_dq_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
        q, k, v, pk, pv, do, lse, delta, dq, *q_strides, *k_strides, *v_strides, *pk_strides, *pv_strides, *do_strides,
        heads, n_q, n_k, n_prefix, qk_scale, sm_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m,
        BLOCK_N=_row_block(max(n_k, n_prefix), cfg["BLOCK_N"]), DOT_PRECISION=precision, **launch,
    )  # fmt: skip
    return dq, dk, dv, dpk, dpv


def qkv_config(dtype: torch.dtype, block_d: int) -> dict:
    """Tiles of the projection kernel: ``BLOCK_M`` rows of x times one head's ``BLOCK_D`` output columns."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 4 if block_d <= 64 else 8, "num_stages": 3}


@triton.jit
def _qkv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    stride_xb,
    stride_xn,
    stride_wr,
    n_rows,
    n_tokens,
    n_heads,
    embed,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (row block, q/k/v head) tile of ``x @ W.T + b``, stored head-split into a contiguous ``[3, B, H, N, D]``.

    Program axis 1 enumerates ``c = j * H + h`` (j: q, k or v); since ``E = H * D`` the weight rows of that head are
    ``c * D + d``, so the output columns need no gather and the store lands directly in the ``[B, H, N, D]`` layout
    that attention reads (the permute + contiguous copies of the usual path never happen).
    """
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < n_rows
    mask_d = offs_d < HEAD_DIM
    off_b = (offs_r // n_tokens).to(tl.int64)
    off_n = (offs_r % n_tokens).to(tl.int64)
    w_rows = (col * HEAD_DIM + offs_d).to(tl.int64)
    x_rows = x_ptr + off_b * stride_xb + off_n * stride_xn
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_k in range(0, embed, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < embed
        x = tl.load(x_rows[:, None] + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :])
        w_t = tl.load(w_ptr + w_rows[None, :] * stride_wr + offs_k[:, None], mask=mask_d[None, :] & mask_k[:, None])
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_rows, mask=mask_d).to(tl.float32)[None, :]
    which = col // n_heads
    off_h = col % n_heads
    n_batch = n_rows // n_tokens
    # out[which, b, h, n, d] in a contiguous [3, B, H, N, D] buffer.
    plane = ((which * n_batch).to(tl.int64) * n_heads) * n_tokens * HEAD_DIM
    out = plane + ((off_b * n_heads + off_h) * n_tokens + off_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


def qkv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """Projection launcher. x: ``[B, N, E]``, weight: ``[3E, E]``, bias: ``[3E]`` -> contiguous ``[3, B, H, N, D]``."""
    x, weight = _unit_stride(x), weight.contiguous()
    batch, n_tokens, embed = x.shape
    head_dim = embed // num_heads
    out = torch.empty((3, batch, num_heads, n_tokens, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    cfg = qkv_config(x.dtype, block_d)
    n_rows = batch * n_tokens
    block_m = _row_block(n_rows, cfg["BLOCK_M"])
    _qkv_fwd_kernel[(triton.cdiv(n_rows, block_m), 3 * num_heads)](
        x, weight, weight if bias is None else bias.contiguous(), out,
        x.stride(0), x.stride(1), weight.stride(0), n_rows, n_tokens, num_heads, embed,
        HAS_BIAS=bias is not None, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
