"""Triton kernels of the top-k KD loss (the ``triton`` backend). Imported lazily: ``import rpp_kernels`` never imports
Triton.

Forward, ``_kd_fwd_kernel``: one program per block of rows streams over the classes once. Per tile of classes it forms
the student logits with ``tl.dot`` (fp32 accumulation over E), folds them into online log-sum-exps (at T and at 1), and
forms the teacher's tile (loaded, or ``tl.dot`` of the teacher feats with the teacher's class-embedding tile) for either
the online teacher log-sum-exp and ``E_p[w - u]`` (full teacher distribution) or the running top-k.

The running top-k: each (logit, class) pair is packed into one int64 key, ``order_preserving(logit) << 32 |
(2^31 - 1 - class)``, so comparing keys compares logits and, among equal logits, prefers the lower class (the package's
tie rule) -- and every key is distinct. The running top-k is a register block ``[rows, KPAD]`` of keys, sorted
descending.
Per tile, a bitonic network sorts the tile's keys ascending and keeps its KPAD largest; the elementwise maximum of the
descending running block and that ascending block is a bitonic sequence holding the KPAD largest keys of their union
(the bitonic merge-split step), and one bitonic merge sorts it again. This is exact (no approximate candidate lists);
KPAD = next power of two >= k, at most BLOCK_C. A tile with no key above any row's current k-th key skips both networks.

Backward recomputes logits tile by tile: ``_kd_bwd_dx_kernel`` (one program per block of rows, accumulating
``ds @ class_embeds``) and ``_kd_bwd_dw_kernel`` (one program per tile of classes, accumulating ``ds.T @ feats``) for
the dense part ``ds = a_u (softmax(u) - softmax(w)) + a_1 softmax(s)``, then ``_kd_bwd_sparse_kernel`` adds the
k + 1 sparse coefficients per row (teacher top-k, label) with atomics on the class-embedding gradient.
``_kd_gather_kernel`` computes the student logits at the top-k classes (and labels) for the O(B*k) epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpp_kernels.ops._triton import dot_precision
from rpp_kernels.ops.kd.common import FEATS, LOGITS, Problem, Stats, unpack_keys


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _logits_tile(
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``a[offs_m] @ b[offs_n].T`` ([M, K] and [N, K] row-major) in fp32, looping over K."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _online_lse(m, l, x):
    """Fold a tile ``x`` [M, N] (-inf allowed everywhere) into a running max ``m`` and sum ``l`` of ``exp(x - m)``."""
    m_new = tl.maximum(m, tl.max(x, 1))
    # A row with only -inf so far keeps m = -inf; shifting by 0 instead keeps exp() at 0 rather than exp(nan).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def _pack_keys(t, offs_c, valid):
    """int64 keys ordering (logit desc, class asc); invalid entries get the smallest key."""
    t = tl.where(t == 0.0, 0.0, t)  # -0.0 and +0.0 are equal logits: same key bits
    bits = t.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - offs_c).to(tl.int64)[None, :]
    return tl.where(valid, key, -9223372036854775808)


@triton.jit
def _compare_and_swap(x, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """One bitonic compare-and-swap stage on int64 keys along the last dim (2**n_dims), partner distance
    2**(n_dims - 1 - i). Written with reshapes and size-2 sums rather than ``tl.sort``'s xor-reductions, which the
    Triton interpreter runs element by element in Python (minutes per tile)."""
    n_outer: tl.constexpr = x.numel >> n_dims
    shape: tl.constexpr = [n_outer * 2**i, 2, 2 ** (n_dims - i - 1)]
    y = tl.reshape(x, shape)
    right_side = tl.arange(0, 2)[None, :, None]
    left = tl.reshape(tl.broadcast_to(tl.sum(y * (1 - right_side), 1)[:, None, :], shape), x.shape)
    right = tl.reshape(tl.broadcast_to(tl.sum(y * right_side, 1)[:, None, :], shape), x.shape)
    # Swap x with its partner: left ^ right ^ x is the other element of the pair (no int64 overflow, unlike a sum).
    return tl.where((left > right) != flip, left ^ right ^ x, x)


@triton.jit
def _bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Sorts bitonic runs of length 2**stage; order 0 ascending, 1 descending, 2 alternating by run."""
    n_outer: tl.constexpr = x.numel >> n_dims
    if order == 2:
        shape: tl.constexpr = [n_outer * 2 ** (n_dims - 1 - stage), 2, 2**stage]
        flip = tl.reshape(tl.broadcast_to(tl.arange(0, 2)[None, :, None], shape), x.shape) == 1
    else:
        flip = order == 1
    for i in tl.static_range(stage):
        x = _compare_and_swap(x, flip, i + (n_dims - stage), n_dims)
    return x


@triton.jit
def _sort_keys(x, n_dims: tl.constexpr, descending: tl.constexpr):
    for i in tl.static_range(1, n_dims + 1):
        x = _bitonic_merge(x, i, 2 if i < n_dims else descending, n_dims)
    return x


@triton.jit
def _kd_fwd_kernel(
    sf_ptr,
    ce_ptr,
    t_ptr,
    tf_ptr,
    tce_ptr,
    mask_ptr,
    lse_u_ptr,
    lse_1_ptr,
    lse_w_ptr,
    ewd_ptr,
    keys_ptr,
    B,
    C,
    E,
    ET,
    K,
    scale,
    inv_t,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_ET: tl.constexpr,
    NEED_S: tl.constexpr,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    TEACHER: tl.constexpr,
    FULL: tl.constexpr,
    KPAD: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_C: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_B], tl.float32)
    m_u, l_u, m_1, l_1, m_w, l_w, acc_w = neg, zero, neg, zero, neg, zero, zero
    run = tl.full([BLOCK_B, KPAD], -9223372036854775808, tl.int64)
    offs_kpad = tl.arange(0, KPAD)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if HAS_MASK:
            mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=offs_c < C, other=0) != 0)
        valid = mask_b[:, None] & mask_c[None, :]
        if NEED_S:
            s = _logits_tile(sf_ptr, ce_ptr, offs_b, offs_c, mask_b, mask_c, E, BLOCK_B, BLOCK_C, BLOCK_E, PRECISION)
            s = tl.where(valid, s * scale, float("-inf"))
            if LSE_U:
                m_u, l_u = _online_lse(m_u, l_u, s * inv_t)
            if LSE_1:
                m_1, l_1 = _online_lse(m_1, l_1, s)
        if TEACHER != 0:
            if TEACHER == 1:
                t = tl.load(t_ptr + offs_b[:, None] * C + offs_c[None, :], mask=valid, other=float("-inf"))
                t = t.to(tl.float32)
            else:
                t = (
                    _logits_tile(
                        tf_ptr, tce_ptr, offs_b, offs_c, mask_b, mask_c, ET, BLOCK_B, BLOCK_C, BLOCK_ET, PRECISION
                    )
                    * scale
                )
            t = tl.where(valid, t, float("-inf"))
            if FULL:
                w = t * inv_t
                m_new = tl.maximum(m_w, tl.max(w, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_w - m_safe)
                e = tl.exp(w - m_safe[:, None])
                diff = tl.where(w > float("-inf"), w - s * inv_t, 0.0)
                l_w = l_w * alpha + tl.sum(e, 1)
                acc_w = acc_w * alpha + tl.sum(e * diff, 1)
                m_w = m_new
            else:
                keys = _pack_keys(t, offs_c, valid)
                # Merge only when some row of the block has a key above its current k-th: once the top-k has settled
                # most tiles are skipped, saving the two sorting networks.
                kth = tl.sum(tl.where(offs_kpad[None, :] == K - 1, run, 0), 1)
                if tl.max((keys > kth[:, None]).to(tl.int32)) > 0:
                    # Tile sorted ascending; its top KPAD are the elementwise max over KPAD-wide slices.
                    keys = _sort_keys(keys, LOG_C, 0)
                    top = tl.max(tl.reshape(keys, [BLOCK_B, BLOCK_C // KPAD, KPAD]), 1)
                    # Descending run vs ascending top: the elementwise max is bitonic and holds the KPAD largest keys.
                    run = _bitonic_merge(tl.maximum(run, top), LOG_K, 1, LOG_K)
    if LSE_U:
        tl.store(lse_u_ptr + offs_b, m_u + tl.log(l_u), mask=mask_b)
    if LSE_1:
        tl.store(lse_1_ptr + offs_b, m_1 + tl.log(l_1), mask=mask_b)
    if TEACHER != 0:
        if FULL:
            has = l_w > 0
            tl.store(lse_w_ptr + offs_b, tl.where(has, m_w + tl.log(l_w), float("-inf")), mask=mask_b)
            tl.store(ewd_ptr + offs_b, tl.where(has, acc_w / tl.where(has, l_w, 1.0), 0.0), mask=mask_b)
        else:
            tl.store(keys_ptr + offs_b[:, None] * KPAD + offs_kpad[None, :], run, mask=mask_b[:, None])


def _fwd_config(p: Problem, topk: bool) -> dict:
    kpad = _pow2(p.k, 16) if topk else 16
    # The running top-k ([rows, KPAD] int64 plus the tile's keys) lives in registers: few rows when it is kept.
    block_c = max(64, kpad)
    return dict(
        BLOCK_B=16 if topk else 32,
        BLOCK_C=block_c,
        BLOCK_E=64,
        BLOCK_ET=64,
        KPAD=kpad,
        LOG_K=kpad.bit_length() - 1,
        LOG_C=block_c.bit_length() - 1,
        num_warps=4,
    )


def _common_args(p: Problem):
    sf = p.student_feats.contiguous()
    ce = p.class_embeds.contiguous()
    t = p.teacher_logits.contiguous() if p.form == LOGITS else sf
    tf = p.teacher_feats.contiguous() if p.form == FEATS else sf
    tce = p.teacher_embeds.contiguous() if p.form == FEATS else ce
    mask = p.class_mask.view(torch.uint8) if p.class_mask is not None else sf
    et = tf.shape[1] if p.form == FEATS else 0
    return sf, ce, t, tf, tce, mask, et


def stream(p: Problem) -> Stats:
    B = p.batch
    sf, ce, t, tf, tce, mask, et = _common_args(p)
    teacher = {LOGITS: 1, FEATS: 2}.get(p.form, 0)
    full = p.full_teacher
    topk = teacher != 0 and not full
    cfg = _fwd_config(p, topk)
    dev = sf.device
    out = {name: torch.empty(B, device=dev, dtype=torch.float32) for name in ("lse_u", "lse_1", "lse_w", "ewd")}
    keys = torch.empty(B, cfg["KPAD"] if topk else 1, device=dev, dtype=torch.int64)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _kd_fwd_kernel[grid](
        sf,
        ce,
        t,
        tf,
        tce,
        mask,
        out["lse_u"],
        out["lse_1"],
        out["lse_w"],
        out["ewd"],
        keys,
        B,
        p.num_classes,
        sf.shape[1],
        et,
        p.k or 1,
        p.logit_scale,
        1.0 / p.temperature,
        NEED_S=p.need_student_lse or p.need_ce,
        LSE_U=p.need_student_lse,
        LSE_1=p.need_ce,
        TEACHER=teacher,
        FULL=full,
        HAS_MASK=p.class_mask is not None,
        PRECISION=dot_precision(sf.dtype),
        **cfg,
    )
    st = Stats(lse_u=out["lse_u"] if p.need_student_lse else None, lse_1=out["lse_1"] if p.need_ce else None)
    if full:
        st.lse_w, st.ew_diff = out["lse_w"], out["ewd"]
    elif topk:
        st.top_val, st.top_idx = unpack_keys(keys, p.k)
    return st


@triton.jit
def _kd_gather_kernel(sf_ptr, ce_ptr, idx_ptr, out_ptr, J, E, scale, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    idx = tl.load(idx_ptr + row * J + offs_j, mask=mask_j, other=0)
    acc = tl.zeros([BLOCK_J], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        x = tl.load(sf_ptr + row * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        w = tl.load(ce_ptr + idx[:, None] * E + offs_e[None, :], mask=mask_j[:, None] & mask_e[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    tl.store(out_ptr + row * J + offs_j, acc * scale, mask=mask_j)


def gather(p: Problem, idx: torch.Tensor) -> torch.Tensor:
    idx = idx.contiguous()
    B, J = idx.shape
    out = torch.empty(B, J, device=idx.device, dtype=torch.float32)
    sf, ce = p.student_feats.contiguous(), p.class_embeds.contiguous()
    block_j = min(64, _pow2(J, 16))
    _kd_gather_kernel[(B, triton.cdiv(J, block_j))](
        sf, ce, idx, out, J, sf.shape[1], p.logit_scale, BLOCK_J=block_j, BLOCK_E=64
    )
    return out


@triton.jit
def _load_coefs(coef_ptr, offs_b, mask_b, B):
    """The five per-row backward coefficients of rows ``offs_b`` from ``coef`` [5, B]."""
    a_u = tl.load(coef_ptr + offs_b, mask=mask_b, other=0.0)
    a_1 = tl.load(coef_ptr + B + offs_b, mask=mask_b, other=0.0)
    lse_u = tl.load(coef_ptr + 2 * B + offs_b, mask=mask_b, other=0.0)
    lse_1 = tl.load(coef_ptr + 3 * B + offs_b, mask=mask_b, other=0.0)
    lse_w = tl.load(coef_ptr + 4 * B + offs_b, mask=mask_b, other=0.0)
    return a_u, a_1, lse_u, lse_1, lse_w


@triton.jit
def _dense_ds(
    x,
    w_emb,
    tx,
    t_emb,
    t_ptr,
    offs_b,
    offs_c,
    valid,
    C,
    a_u,
    a_1,
    lse_u,
    lse_1,
    lse_w,
    scale,
    inv_t,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d row / d s on one (rows, classes) tile, logits recomputed from the loaded operands (``tx``/``t_emb``: the
    teacher's, read only for a full feats teacher): ``a_u (softmax(s/T) - softmax(t/T)) + a_1 softmax(s)``
    (masked entries are -inf: 0)."""
    s = tl.dot(x, tl.trans(w_emb), input_precision=PRECISION) * scale
    s = tl.where(valid, s, float("-inf"))
    ds = tl.zeros(s.shape, tl.float32)
    if LSE_U:
        ds += a_u[:, None] * tl.exp(s * inv_t - lse_u[:, None])
    if LSE_1:
        ds += a_1[:, None] * tl.exp(s - lse_1[:, None])
    if FULL:
        if TEACHER == 1:
            w = tl.load(t_ptr + offs_b[:, None] * C + offs_c[None, :], mask=valid, other=float("-inf"))
            w = w.to(tl.float32)
        else:
            w = tl.dot(tx, tl.trans(t_emb), input_precision=PRECISION) * scale
        w = tl.where(valid, w, float("-inf"))
        ds -= a_u[:, None] * tl.exp(w * inv_t - lse_w[:, None])
    return ds


@triton.jit
def _kd_bwd_dx_kernel(
    sf_ptr,
    ce_ptr,
    t_ptr,
    tf_ptr,
    tce_ptr,
    mask_ptr,
    coef_ptr,
    dx_ptr,
    B,
    C,
    E,
    ET,
    scale,
    inv_t,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    E_PAD: tl.constexpr,
    ET_PAD: tl.constexpr,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d student_feats (dense part) for one block of rows; ``coef`` is [5, B]: a_u, a_1, lse_u, lse_1, lse_w."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E
    a_u, a_1, lse_u, lse_1, lse_w = _load_coefs(coef_ptr, offs_b, mask_b, B)
    x = tl.load(sf_ptr + offs_b[:, None] * E + offs_e[None, :], mask=mask_b[:, None] & mask_e[None, :], other=0.0)
    tx = x  # a stand-in, never read, unless the teacher is full feats
    if TEACHER == 2 and FULL:
        offs_f = tl.arange(0, ET_PAD)
        mask_f = offs_f < ET
        tx = tl.load(tf_ptr + offs_b[:, None] * ET + offs_f[None, :], mask=mask_b[:, None] & mask_f[None, :], other=0.0)
    acc = tl.zeros([BLOCK_B, E_PAD], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if HAS_MASK:
            mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=offs_c < C, other=0) != 0)
        valid = mask_b[:, None] & mask_c[None, :]
        w_emb = tl.load(
            ce_ptr + offs_c[:, None] * E + offs_e[None, :], mask=mask_c[:, None] & mask_e[None, :], other=0.0
        )
        t_emb = w_emb
        if TEACHER == 2 and FULL:
            t_emb = tl.load(
                tce_ptr + offs_c[:, None] * ET + offs_f[None, :], mask=mask_c[:, None] & mask_f[None, :], other=0.0
            )
        ds = _dense_ds(x, w_emb, tx, t_emb, t_ptr, offs_b, offs_c, valid, C, a_u, a_1, lse_u, lse_1, lse_w,
                       scale, inv_t, LSE_U, LSE_1, FULL, TEACHER, PRECISION)  # fmt: skip
        acc = tl.dot(ds.to(w_emb.dtype), w_emb, acc, input_precision=PRECISION)
    tl.store(dx_ptr + offs_b[:, None] * E + offs_e[None, :], acc * scale, mask=mask_b[:, None] & mask_e[None, :])


@triton.jit
def _kd_bwd_dw_kernel(
    sf_ptr,
    ce_ptr,
    t_ptr,
    tf_ptr,
    tce_ptr,
    mask_ptr,
    coef_ptr,
    dw_ptr,
    B,
    C,
    E,
    ET,
    scale,
    inv_t,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    E_PAD: tl.constexpr,
    ET_PAD: tl.constexpr,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d class_embeds (dense part) for one tile of classes, looping over every block of rows."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    in_range = mask_c
    if HAS_MASK:
        mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=in_range, other=0) != 0)
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E
    w_emb = tl.load(ce_ptr + offs_c[:, None] * E + offs_e[None, :], mask=mask_c[:, None] & mask_e[None, :], other=0.0)
    t_emb = w_emb  # a stand-in, never read, unless the teacher is full feats
    if TEACHER == 2 and FULL:
        offs_f = tl.arange(0, ET_PAD)
        mask_f = offs_f < ET
        t_emb = tl.load(
            tce_ptr + offs_c[:, None] * ET + offs_f[None, :], mask=mask_c[:, None] & mask_f[None, :], other=0.0
        )
    acc = tl.zeros([BLOCK_C, E_PAD], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        valid = mask_b[:, None] & mask_c[None, :]
        a_u, a_1, lse_u, lse_1, lse_w = _load_coefs(coef_ptr, offs_b, mask_b, B)
        x = tl.load(sf_ptr + offs_b[:, None] * E + offs_e[None, :], mask=mask_b[:, None] & mask_e[None, :], other=0.0)
        tx = x
        if TEACHER == 2 and FULL:
            tx = tl.load(
                tf_ptr + offs_b[:, None] * ET + offs_f[None, :], mask=mask_b[:, None] & mask_f[None, :], other=0.0
            )
        ds = _dense_ds(x, w_emb, tx, t_emb, t_ptr, offs_b, offs_c, valid, C, a_u, a_1, lse_u, lse_1, lse_w,
                       scale, inv_t, LSE_U, LSE_1, FULL, TEACHER, PRECISION)  # fmt: skip
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x, acc, input_precision=PRECISION)
    tl.store(dw_ptr + offs_c[:, None] * E + offs_e[None, :], acc * scale, mask=in_range[:, None] & mask_e[None, :])


def _bwd_config(p: Problem) -> dict:
    e_pad = _pow2(p.student_feats.shape[1])
    et_pad = _pow2(p.teacher_feats.shape[1]) if p.form == FEATS and p.full_teacher else 16
    # A [BLOCK_C, E_PAD] tile of class embeddings (and of the teacher's) stays on chip: at most 32 KiB each, so BLOCK_C
    # shrinks as E grows (tl.dot needs 16). The dispatch's TRITON_MAX_DIM keeps this inside sm_80's shared memory.
    elem = p.student_feats.element_size()
    block_c = max(16, min(64, 32768 // (max(e_pad, et_pad) * elem)))
    return dict(BLOCK_B=16, BLOCK_C=block_c, E_PAD=e_pad, ET_PAD=et_pad, num_warps=4)


def dense_backward(p, a_u, a_1, lse_u, lse_1, lse_w, need_dsf: bool, need_dce: bool):
    sf, ce, t, tf, tce, mask, et = _common_args(p)
    B, C, E = p.batch, p.num_classes, sf.shape[1]
    zeros = torch.zeros(B, device=sf.device, dtype=torch.float32)
    coef = torch.stack([a_u, a_1] + [x if x is not None else zeros for x in (lse_u, lse_1, lse_w)]).contiguous()
    cfg = _bwd_config(p)
    flags = dict(
        LSE_U=lse_u is not None,
        LSE_1=lse_1 is not None,
        FULL=lse_w is not None,
        TEACHER={LOGITS: 1, FEATS: 2}.get(p.form, 0),
        HAS_MASK=p.class_mask is not None,
        PRECISION=dot_precision(sf.dtype),
    )
    args = (sf, ce, t, tf, tce, mask, coef)
    sizes = (B, C, E, et, p.logit_scale, 1.0 / p.temperature)
    dsf = dce = None
    if need_dsf:
        dsf = torch.empty(B, E, device=sf.device, dtype=torch.float32)
        _kd_bwd_dx_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](*args, dsf, *sizes, **cfg, **flags)
    if need_dce:
        dce = torch.empty(C, E, device=sf.device, dtype=torch.float32)
        _kd_bwd_dw_kernel[(triton.cdiv(C, cfg["BLOCK_C"]),)](*args, dce, *sizes, **cfg, **flags)
    return dsf, dce


@triton.jit
def _kd_bwd_sparse_kernel(
    sf_ptr,
    ce_ptr,
    idx_ptr,
    coef_ptr,
    dx_ptr,
    dw_ptr,
    J,
    E,
    scale,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DX: tl.constexpr,
    DW: tl.constexpr,
):
    """``ds[row, idx[row, j]] += coef[row, j]`` pushed into both gradients; rows share classes, hence the atomics."""
    row = tl.program_id(0)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        x = tl.load(sf_ptr + row * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_E], tl.float32)
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < J
            idx = tl.load(idx_ptr + row * J + offs_j, mask=mask_j, other=0)
            c = tl.load(coef_ptr + row * J + offs_j, mask=mask_j, other=0.0) * scale
            m2 = mask_j[:, None] & mask_e[None, :]
            if DX:
                w = tl.load(ce_ptr + idx[:, None] * E + offs_e[None, :], mask=m2, other=0.0)
                acc += tl.sum(c[:, None] * w.to(tl.float32), 0)
            if DW:
                tl.atomic_add(dw_ptr + idx[:, None] * E + offs_e[None, :], c[:, None] * x[None, :], mask=m2)
        if DX:
            old = tl.load(dx_ptr + row * E + offs_e, mask=mask_e, other=0.0)
            tl.store(dx_ptr + row * E + offs_e, old + acc, mask=mask_e)


def sparse_backward(p, idx, coef, dsf, dce, need_dsf: bool, need_dce: bool):
    sf, ce = p.student_feats.contiguous(), p.class_embeds.contiguous()
    if need_dsf and dsf is None:
        dsf = torch.zeros(sf.shape, device=sf.device, dtype=torch.float32)
    if need_dce and dce is None:
        dce = torch.zeros(ce.shape, device=sf.device, dtype=torch.float32)
    B, J = idx.shape
    _kd_bwd_sparse_kernel[(B,)](
        sf,
        ce,
        idx.contiguous(),
        coef.contiguous(),
        dsf if need_dsf else sf,
        dce if need_dce else ce,
        J,
        sf.shape[1],
        p.logit_scale,
        BLOCK_J=min(64, _pow2(J, 16)),
        BLOCK_E=64,
        DX=need_dsf,
        DW=need_dce,
    )
    return dsf, dce
