"""Triton kernels of the top-k KD loss (the ``triton`` backend). Imported lazily: ``import rpp_kernels`` never imports
Triton.

The grids split the classes across CTAs (flash-decoding style): B = 256 rows are only 4 blocks of 64, so one program
per row block (the previous design) ran 4-16 CTAs on an H100's 132 SMs. ``split_classes`` picks the fewest class
splits that give two CTAs per SM; every split writes partial results and a small second pass (a few torch ops on
O(B * splits * k) data) merges them.

Forward:

* ``_kd_fwd_kernel`` (grid: row blocks x class splits, 64-row tiles = one Hopper warpgroup MMA): per tile of classes it
  forms the student logits with ``tl.dot`` (fp32 accumulation over E) and folds them into online log-sum-exps (at T
  and at 1); for a full teacher it also forms the teacher's tile (loaded, or ``tl.dot`` of the teacher feats with the
  teacher's class-embedding tile) for the online teacher log-sum-exp and ``E_p[w - u]``. Partials merge by logsumexp.
* ``_kd_topk_kernel`` (grid: 16-row blocks x class splits): the teacher's top-k over a split of teacher logits (given,
  or a chunk of ``teacher_feats @ teacher_class_embeds.T`` from one cuBLAS matmul). It has no matmul, so its row block
  is as small as the running top-k needs: ``[rows, KPAD]`` int64 keys plus a tile of keys stay in registers, which at
  64 rows spilled ~1 KB per thread. Each (logit, class) pair is packed into one int64 key,
  ``order_preserving(logit) << 32 | (2^31 - 1 - class)``: comparing keys compares logits and, among equal logits,
  prefers the lower class (the package's tie rule), and every key is distinct, so the merge is an exact ``topk`` of
  integers. Per tile, a bitonic network sorts the tile's keys ascending and keeps its KPAD largest; the elementwise
  maximum of the descending running block and that ascending block is a bitonic sequence holding the KPAD largest
  keys of their union (the bitonic merge-split step), and one bitonic merge sorts it again. KPAD = next power of two
  >= k, at most BLOCK_C. A tile with no key above any row's current k-th key skips both networks.
* ``_kd_gather_kernel``: student logits at the top-k classes (and labels) for the O(B*k) epilogue.

Backward, dense part ``ds = a_u (softmax(u) - softmax(w)) + a_1 softmax(s)``: ``_kd_bwd_ds_kernel`` recomputes the
logits of a chunk of classes tile by tile (grid: row blocks x class tiles) and writes ``ds * logit_scale`` in the input
dtype (the precision the matmul operand had before); the two gradient matmuls ``ds @ class_embeds`` and
``ds.T @ student_feats`` then run on cuBLAS (tensor cores, fp32 accumulation; ``common.mm_f32``). A chunk holds at most
``DS_ELEMS`` entries of ``[B, classes]``. The sparse part (k + 1 coefficients per row: teacher top-k, label) is added
into each ds chunk (``_kd_bwd_ds_sparse_kernel``, O(B * k)) so the same matmuls carry it; without a dense part
(``student_support="topk"``, no labels) it is ``_kd_bwd_sparse_dx_kernel`` (one program per row) and
``_kd_bwd_sparse_dw_kernel`` (one program per class, over that class's entries in a fixed order). No atomics
anywhere: both gradients are deterministic (bitwise reproducible run to run), as ``torch.use_deterministic_algorithms``
asks.

Row offsets are formed in int64 (``B * C`` and ``C * E`` may exceed 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpp_kernels.ops import _triton
from rpp_kernels.ops._triton import dot_precision
from rpp_kernels.ops.kd.common import FEATS, LOGITS, TOPK, Problem, Stats, mm_f32, unpack_keys

# Entries of the [B, classes] chunk that backward (ds) and a top-k feats teacher (its logits) materialise: 64 MiB fp32.
DS_ELEMS = 1 << 24
# Rows per program of the matmul kernels: 64 is the M of one Hopper warpgroup MMA (wgmma), so every tl.dot can use it.
BLOCK_B = 64
# fp32 inputs: 3xTF32 tensor-core products keep fp32-level error (see _triton.dot_precision) at tensor-core speed.
FP32_DOT = "tf32x3"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _logits_tile(
    a_ptr,
    b_ptr,
    rows_m,
    rows_n,
    mask_m,
    mask_n,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``a[rows_m] @ b[rows_n].T`` ([M, K] and [N, K] row-major; ``rows_*`` int64) in fp32, looping over K."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + rows_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
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
def _lse(m, l):
    return tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))


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
    part_ptr,
    B,
    C,
    E,
    ET,
    SPLIT,
    scale,
    inv_t,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_ET: tl.constexpr,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    FULL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial statistics of rows ``pid(0)`` over the classes of split ``pid(1)``: ``part`` [4, splits, B] holds the
    split's lse of s/T, lse of s, and for a full teacher (``FULL``: 1 logits, 2 feats) lse of t/T and E_p[w - u]."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_B], tl.float32)
    m_u, l_u, m_1, l_1, m_w, l_w, acc_w = neg, zero, neg, zero, neg, zero, zero
    c_begin = pid_s * SPLIT
    c_end = tl.minimum(C, c_begin + SPLIT)
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        if HAS_MASK:
            mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=offs_c < c_end, other=0) != 0)
        valid = mask_b[:, None] & mask_c[None, :]
        cols = offs_c.to(tl.int64)
        s = _logits_tile(sf_ptr, ce_ptr, rows, cols, mask_b, mask_c, E, BLOCK_B, BLOCK_C, BLOCK_E, PRECISION)
        s = tl.where(valid, s * scale, float("-inf"))
        if LSE_U:
            m_u, l_u = _online_lse(m_u, l_u, s * inv_t)
        if LSE_1:
            m_1, l_1 = _online_lse(m_1, l_1, s)
        if FULL != 0:
            if FULL == 1:
                t = tl.load(t_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=float("-inf"))
                t = t.to(tl.float32)
            else:
                t = (
                    _logits_tile(tf_ptr, tce_ptr, rows, cols, mask_b, mask_c, ET, BLOCK_B, BLOCK_C, BLOCK_ET, PRECISION)
                    * scale
                )
            w = tl.where(valid, t * inv_t, float("-inf"))
            m_new = tl.maximum(m_w, tl.max(w, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_w - m_safe)
            e = tl.exp(w - m_safe[:, None])
            diff = tl.where(w > float("-inf"), w - s * inv_t, 0.0)
            l_w = l_w * alpha + tl.sum(e, 1)
            acc_w = acc_w * alpha + tl.sum(e * diff, 1)
            m_w = m_new
    part = part_ptr + pid_s * B + rows
    if LSE_U:
        tl.store(part, _lse(m_u, l_u), mask=mask_b)
    if LSE_1:
        tl.store(part + n_split * B, _lse(m_1, l_1), mask=mask_b)
    if FULL != 0:
        has = l_w > 0
        tl.store(part + 2 * n_split * B, _lse(m_w, l_w), mask=mask_b)
        tl.store(part + 3 * n_split * B, tl.where(has, acc_w / tl.where(has, l_w, 1.0), 0.0), mask=mask_b)


@triton.jit
def _kd_topk_kernel(
    t_ptr,
    mask_ptr,
    keys_ptr,
    B,
    NC,
    LD,
    COL0,
    K,
    SPLIT,
    SPLIT0,
    N_SPLIT,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KPAD: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_C: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Top-KPAD keys of ``scale * t`` (``t`` [B, NC] with row stride LD: classes COL0 ..) over the columns of split
    ``pid(1)``, written to ``keys`` [B, N_SPLIT, KPAD] at split ``SPLIT0 + pid(1)``. No matmul here, so the row block
    is as small as the running top-k ([rows, KPAD] int64 in registers) needs."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pid_s = tl.program_id(1)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    run = tl.full([BLOCK_B, KPAD], -9223372036854775808, tl.int64)
    offs_kpad = tl.arange(0, KPAD)
    j_begin = pid_s * SPLIT
    j_end = tl.minimum(NC, j_begin + SPLIT)
    for j0 in range(j_begin, j_end, BLOCK_C):
        offs_j = j0 + tl.arange(0, BLOCK_C)
        mask_c = offs_j < j_end
        offs_c = COL0 + offs_j
        if HAS_MASK:
            mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=offs_j < j_end, other=0) != 0)
        valid = mask_b[:, None] & mask_c[None, :]
        t = tl.load(t_ptr + rows[:, None] * LD + offs_j[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        keys = _pack_keys(t * scale, offs_c, valid)
        # Merge only when some row of the block has a key above its current k-th: once the top-k has settled most
        # tiles are skipped, saving the two sorting networks.
        kth = tl.sum(tl.where(offs_kpad[None, :] == K - 1, run, 0), 1)
        if tl.max((keys > kth[:, None]).to(tl.int32)) > 0:
            # Tile sorted ascending; its top KPAD are the elementwise max over KPAD-wide slices.
            keys = _sort_keys(keys, LOG_C, 0)
            top = tl.max(tl.reshape(keys, [BLOCK_B, BLOCK_C // KPAD, KPAD]), 1)
            # Descending run vs ascending top: the elementwise max is bitonic and holds the KPAD largest keys.
            run = _bitonic_merge(tl.maximum(run, top), LOG_K, 1, LOG_K)
    dst = keys_ptr + (rows[:, None] * N_SPLIT + SPLIT0 + pid_s) * KPAD + offs_kpad[None, :]
    tl.store(dst, run, mask=mask_b[:, None])


def fwd_config(p: Problem) -> dict:
    """Tiles of ``_kd_fwd_kernel`` (also read by the static gate and the work model): 64 rows, the M of one Hopper
    warpgroup MMA; 2 stages of [64 + BLOCK_C, BLOCK_E] operand tiles per matmul."""
    if p.full_teacher and p.form == LOGITS:
        # A loaded [64, 128] teacher tile beside the MMA's s still spilled ~0.5 KB at 8 warps; 64 classes do not.
        fp32 = p.student_feats.dtype == torch.float32  # 3xTF32 keeps 8 warps (see _tiles)
        return {**_tiles(p), "BLOCK_C": 64, "num_warps": 8 if fp32 else 4}
    return _tiles(p)


def _tiles(p: Problem) -> dict:
    fp32 = p.student_feats.dtype == torch.float32
    # 8 warps where more than one [64, 128] fp32 tile is live: a full teacher's logits beside s, or 3xTF32's split
    # operands (4 warps spilled 0.1-0.5 KB on sm_80 in both cases).
    wide = p.full_teacher or fp32
    return dict(BLOCK_B=BLOCK_B, BLOCK_C=128, BLOCK_E=32 if fp32 else 64, BLOCK_ET=32 if fp32 else 64,
                num_warps=8 if wide else 4, num_stages=2)  # fmt: skip


# Opt-in shared memory per block (bytes): the budget every config below is checked against (tests/ops/test_kd_triton).
SMEM_LIMIT = {80: 166912, 90: 232448}


def smem_bytes(cfg: dict, elem: int, teacher_dot: bool) -> int:
    """Upper bound on the shared memory of ``_kd_fwd_kernel`` / ``_kd_bwd_ds_kernel`` with ``cfg``: every pipeline
    stage holds both operand tiles (``[BLOCK_B, BLOCK_E]`` feats and ``[BLOCK_C, BLOCK_E]`` class embeddings), for the
    teacher's matmul too when it runs (``teacher_dot``), as if the two loops shared nothing. The compiled kernels use
    at most this (sm_90: 49-64 KiB at the gate's shapes; the static gate reports the real figure)."""
    per_stage = (cfg["BLOCK_B"] + cfg["BLOCK_C"]) * (cfg["BLOCK_E"] + (cfg["BLOCK_ET"] if teacher_dot else 0)) * elem
    return cfg["num_stages"] * per_stage


def topk_config(k: int) -> dict:
    """Tiles of ``_kd_topk_kernel``: 16 rows over 8 warps keep the running top-k and the tile's keys in registers
    unspilled (4 warps spilled 60 B on sm_90 for a bf16 logits teacher)."""
    kpad = _pow2(k, 16)
    block_c = max(128, kpad)
    return dict(
        BLOCK_B=16, BLOCK_C=block_c, KPAD=kpad, LOG_K=kpad.bit_length() - 1, LOG_C=block_c.bit_length() - 1, num_warps=8
    )


def split_classes(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(tiles per split, splits): enough splits for two CTAs per SM, as few as that allows (each split writes its own
    partial statistics or top-k candidates). Splits stay on grid axis 1, so at most 65,535."""
    target = 2 * _triton.num_sms(device)
    per_split = max(1, (n_tiles * n_row_blocks) // target, triton.cdiv(n_tiles, 65535))
    return per_split, triton.cdiv(n_tiles, per_split)


def _common_args(p: Problem):
    sf = p.student_feats.contiguous()
    ce = p.class_embeds.contiguous()
    t = p.teacher_logits.contiguous() if p.form == LOGITS else sf
    tf = p.teacher_feats.contiguous() if p.form == FEATS else sf
    tce = p.teacher_embeds.contiguous() if p.form == FEATS else ce
    mask = p.class_mask.view(torch.uint8) if p.class_mask is not None else sf
    et = tf.shape[1] if p.form == FEATS else 0
    return sf, ce, t, tf, tce, mask, et


def teacher_chunk(p: Problem) -> int:
    """Classes per chunk of feats-teacher logits materialised for the top-k pass (``[B, chunk]`` within DS_ELEMS)."""
    return max(128, (DS_ELEMS // max(1, p.batch)) // 128 * 128)


def _stream_dense(p: Problem, st: Stats) -> None:
    """Student log-sum-exps and, for a full teacher, its log-sum-exp and ``E_p[w - u]``: one fused pass."""
    B, C = p.batch, p.num_classes
    sf, ce, t, tf, tce, mask, et = _common_args(p)
    full = {LOGITS: 1, FEATS: 2}[p.form] if p.full_teacher else 0
    cfg = fwd_config(p)
    n_rb = triton.cdiv(B, cfg["BLOCK_B"])
    per_split, n_split = split_classes(n_rb, triton.cdiv(C, cfg["BLOCK_C"]), sf.device)
    part = torch.empty(4, n_split, B, device=sf.device, dtype=torch.float32)
    _kd_fwd_kernel[(n_rb, n_split)](
        sf, ce, t, tf, tce, mask, part, B, C, sf.shape[1], et, per_split * cfg["BLOCK_C"], p.logit_scale,
        1.0 / p.temperature, LSE_U=p.need_student_lse, LSE_1=p.need_ce, FULL=full, HAS_MASK=p.class_mask is not None,
        PRECISION=dot_precision(sf.dtype, fp32=FP32_DOT), **cfg,
    )  # fmt: skip
    if p.need_student_lse:
        st.lse_u = torch.logsumexp(part[0], 0)
    if p.need_ce:
        st.lse_1 = torch.logsumexp(part[1], 0)
    if full:
        lse_w = torch.logsumexp(part[2], 0)
        has = torch.isfinite(part[2])
        weight = torch.where(has, torch.exp(part[2] - torch.where(torch.isfinite(lse_w), lse_w, 0.0)), 0.0)
        st.lse_w, st.ew_diff = lse_w, (weight * torch.where(has, part[3], 0.0)).sum(0)


def _stream_topk(p: Problem, st: Stats) -> None:
    """The teacher's top-k: split over (row blocks, class splits) per chunk of teacher logits (given, or one cuBLAS
    matmul per chunk for feats), then an exact ``topk`` of the candidates' distinct int64 keys."""
    B, C = p.batch, p.num_classes
    cfg = topk_config(p.k)
    n_rb = triton.cdiv(B, cfg["BLOCK_B"])
    chunk = C if p.form == LOGITS else min(C, teacher_chunk(p))
    per_split, _ = split_classes(n_rb, triton.cdiv(chunk, cfg["BLOCK_C"]), p.student_feats.device)
    split = per_split * cfg["BLOCK_C"]
    bounds = [(c0, min(C, c0 + chunk)) for c0 in range(0, C, chunk)]
    offsets = [0]
    for c0, c1 in bounds:
        offsets.append(offsets[-1] + triton.cdiv(c1 - c0, split))
    keys = torch.empty(B, offsets[-1], cfg["KPAD"], device=p.student_feats.device, dtype=torch.int64)
    mask = p.class_mask.view(torch.uint8) if p.class_mask is not None else keys
    for (c0, c1), split0 in zip(bounds, offsets, strict=False):
        if p.form == LOGITS:
            # Any row stride (a slice of a wider logits tensor is read in place); classes must be contiguous.
            t = p.teacher_logits if p.teacher_logits.stride(1) == 1 else p.teacher_logits.contiguous()
            scale = 1.0
        else:
            t, scale = mm_f32(p.teacher_feats, p.teacher_embeds[c0:c1].T), p.logit_scale
        n_split = triton.cdiv(c1 - c0, split)
        _kd_topk_kernel[(n_rb, n_split)](
            t, mask, keys, B, c1 - c0, t.stride(0), c0, p.k, split, split0, offsets[-1], scale,
            HAS_MASK=p.class_mask is not None, **cfg,
        )  # fmt: skip
    # Keys are distinct, so the top-k of the candidates is exact and needs no tie rule of its own.
    cand = keys.view(B, -1)
    st.top_val, st.top_idx = unpack_keys(cand.topk(min(p.k, cand.shape[1]), dim=1).values, p.k)


def stream(p: Problem) -> Stats:
    st = Stats()
    if p.need_student_lse or p.need_ce or p.full_teacher:
        _stream_dense(p, st)
    if p.form != TOPK and not p.full_teacher:
        _stream_topk(p, st)
    return st


@triton.jit
def _kd_gather_kernel(sf_ptr, ce_ptr, idx_ptr, out_ptr, J, E, scale, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
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
def _kd_bwd_ds_kernel(
    sf_ptr,
    ce_ptr,
    t_ptr,
    tf_ptr,
    tce_ptr,
    mask_ptr,
    coef_ptr,
    ds_ptr,
    B,
    C,
    C0,
    NC,
    E,
    ET,
    scale,
    inv_t,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_ET: tl.constexpr,
    LSE_U: tl.constexpr,
    LSE_1: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``logit_scale * d row / d s`` on the (rows ``pid(0)``, classes ``C0 + pid(1)``) tile of the chunk ``ds`` [B, NC]:
    ``a_u (softmax(s/T) - softmax(t/T)) + a_1 softmax(s)``, logits recomputed (masked classes are -inf: 0).
    ``coef`` is [5, B]: a_u, a_1, lse_u, lse_1, lse_w."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_c = C0 + offs_n
    mask_c = offs_n < NC
    in_chunk = mask_c
    if HAS_MASK:
        mask_c = mask_c & (tl.load(mask_ptr + offs_c, mask=in_chunk, other=0) != 0)
    valid = mask_b[:, None] & mask_c[None, :]
    cols = offs_c.to(tl.int64)
    s = _logits_tile(sf_ptr, ce_ptr, rows, cols, mask_b, mask_c, E, BLOCK_B, BLOCK_C, BLOCK_E, PRECISION) * scale
    s = tl.where(valid, s, float("-inf"))
    a_u = tl.load(coef_ptr + offs_b, mask=mask_b, other=0.0)
    ds = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    if LSE_U:
        lse_u = tl.load(coef_ptr + 2 * B + offs_b, mask=mask_b, other=0.0)
        ds += a_u[:, None] * tl.exp(s * inv_t - lse_u[:, None])
    if LSE_1:
        a_1 = tl.load(coef_ptr + B + offs_b, mask=mask_b, other=0.0)
        lse_1 = tl.load(coef_ptr + 3 * B + offs_b, mask=mask_b, other=0.0)
        ds += a_1[:, None] * tl.exp(s - lse_1[:, None])
    if FULL:
        if TEACHER == 1:
            w = tl.load(t_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        else:
            w = (
                _logits_tile(tf_ptr, tce_ptr, rows, cols, mask_b, mask_c, ET, BLOCK_B, BLOCK_C, BLOCK_ET, PRECISION)
                * scale
            )
        w = tl.where(valid, w, float("-inf"))
        lse_w = tl.load(coef_ptr + 4 * B + offs_b, mask=mask_b, other=0.0)
        ds -= a_u[:, None] * tl.exp(w * inv_t - lse_w[:, None])
    dst = ds_ptr + rows[:, None] * NC + offs_n[None, :]
    tl.store(dst, (ds * scale).to(ds_ptr.dtype.element_ty), mask=mask_b[:, None] & in_chunk[None, :])


def bwd_config(p: Problem) -> dict:
    """Tiles of ``_kd_bwd_ds_kernel`` (also read by the static gate and the work model): those of the forward."""
    return _tiles(p)


def ds_chunk(p: Problem, block_c: int) -> int:
    """Classes per backward chunk: ``[B, chunk]`` within DS_ELEMS, a multiple of the tile, at most 65,535 tiles."""
    per = max(block_c, (DS_ELEMS // max(1, p.batch)) // block_c * block_c)
    return min(per, 65535 * block_c, triton.cdiv(p.num_classes, block_c) * block_c)


@triton.jit
def _kd_bwd_ds_sparse_kernel(ds_ptr, idx_ptr, coef_ptr, J, C0, NC, scale, BLOCK_J: tl.constexpr):
    """``ds[row, idx - C0] += scale * coef`` for the slots of one row that fall in the chunk. Columns ``0 .. J-2`` (the
    teacher's top-k) are distinct classes, so one vector read-modify-write is exact; the last column (the label, which
    may repeat one of them) goes second, after a barrier. Zero coefficients (empty slots, all at class 0) store
    nothing. One program per row, no atomics: deterministic."""
    row = tl.program_id(0).to(tl.int64)
    for last in tl.static_range(2):
        if last == 0:
            offs_j = tl.arange(0, BLOCK_J)
            mask_j = offs_j < J - 1
        else:
            tl.debug_barrier()
            offs_j = J - 1 + tl.arange(0, BLOCK_J)
            mask_j = offs_j == J - 1
        idx = tl.load(idx_ptr + row * J + offs_j, mask=mask_j, other=0) - C0
        c = tl.load(coef_ptr + row * J + offs_j, mask=mask_j, other=0.0) * scale
        hit = mask_j & (idx >= 0) & (idx < NC) & (c != 0.0)
        dst = ds_ptr + row * NC + idx
        old = tl.load(dst, mask=hit, other=0.0).to(tl.float32)
        tl.store(dst, (old + c).to(ds_ptr.dtype.element_ty), mask=hit)


def dense_backward(p, a_u, a_1, lse_u, lse_1, lse_w, need_dsf: bool, need_dce: bool, sparse=None):
    """Gradients of the dense part; ``sparse = (idx [B, J], coef [B, J])`` folds the sparse part into each ds chunk
    (teacher top-k columns distinct per row, the label last), so the cuBLAS matmuls carry it at no extra pass."""
    sf, ce, t, tf, tce, mask, et = _common_args(p)
    B, C, E = p.batch, p.num_classes, sf.shape[1]
    zeros = torch.zeros(B, device=sf.device, dtype=torch.float32)
    coef = torch.stack([a_u, a_1] + [x if x is not None else zeros for x in (lse_u, lse_1, lse_w)]).contiguous()
    cfg = bwd_config(p)
    flags = dict(
        LSE_U=lse_u is not None,
        LSE_1=lse_1 is not None,
        FULL=lse_w is not None,
        TEACHER={LOGITS: 1, FEATS: 2}.get(p.form, 0),
        HAS_MASK=p.class_mask is not None,
        PRECISION=dot_precision(sf.dtype, fp32=FP32_DOT),
    )
    if sparse is not None:
        slot_idx, slot_coef = sparse[0].contiguous(), sparse[1].to(torch.float32).contiguous()
        J = slot_idx.shape[1]
    chunk = ds_chunk(p, cfg["BLOCK_C"])
    ds = torch.empty(B, min(chunk, C), device=sf.device, dtype=sf.dtype)
    dsf = torch.zeros(B, E, device=sf.device, dtype=torch.float32) if need_dsf else None
    dce = torch.empty(C, E, device=sf.device, dtype=torch.float32) if need_dce else None
    for c0 in range(0, C, chunk):
        n = min(chunk, C - c0)
        d = ds[:, :n] if n == ds.shape[1] else ds.view(-1)[: B * n].view(B, n)
        grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(n, cfg["BLOCK_C"]))
        _kd_bwd_ds_kernel[grid](
            sf, ce, t, tf, tce, mask, coef, d, B, C, c0, n, E, et, p.logit_scale, 1.0 / p.temperature, **cfg, **flags
        )
        if sparse is not None:
            _kd_bwd_ds_sparse_kernel[(B,)](d, slot_idx, slot_coef, J, c0, n, p.logit_scale, BLOCK_J=_pow2(J))
        if need_dsf:
            dsf += mm_f32(d, ce[c0 : c0 + n])
        if need_dce:
            dce[c0 : c0 + n] = mm_f32(d.T, sf)
    return dsf, dce


@triton.jit
def _kd_bwd_sparse_dx_kernel(
    ce_ptr, idx_ptr, coef_ptr, dx_ptr, J, E, scale, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr
):
    """``dx[row] += scale * sum_j coef[row, j] * class_embeds[idx[row, j]]`` (one program per row)."""
    row = tl.program_id(0).to(tl.int64)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        acc = tl.zeros([BLOCK_E], tl.float32)
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < J
            idx = tl.load(idx_ptr + row * J + offs_j, mask=mask_j, other=0)
            c = tl.load(coef_ptr + row * J + offs_j, mask=mask_j, other=0.0) * scale
            w = tl.load(ce_ptr + idx[:, None] * E + offs_e[None, :], mask=mask_j[:, None] & mask_e[None, :], other=0.0)
            acc += tl.sum(c[:, None] * w.to(tl.float32), 0)
        old = tl.load(dx_ptr + row * E + offs_e, mask=mask_e, other=0.0)
        tl.store(dx_ptr + row * E + offs_e, old + acc, mask=mask_e)


@triton.jit
def _kd_bwd_sparse_dw_kernel(
    sf_ptr, start_ptr, src_ptr, coef_ptr, dw_ptr, J, E, scale, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr
):
    """``dw[c] += scale * sum coef[i] * student_feats[row(i)]`` over class c's entries ``start[c] .. start[c + 1]`` of
    the slots sorted by class (``src``: flat slot index ``row * J + j``), always summed in that order: deterministic,
    and each program owns its class, so no atomics."""
    cls = tl.program_id(0).to(tl.int64)
    begin = tl.load(start_ptr + cls)
    end = tl.load(start_ptr + cls + 1)
    if end > begin:
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            acc = tl.zeros([BLOCK_E], tl.float32)
            for n0 in range(begin, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                slot = tl.load(src_ptr + offs_n, mask=mask_n, other=0)
                c = tl.load(coef_ptr + slot, mask=mask_n, other=0.0) * scale
                x = tl.load(
                    sf_ptr + (slot // J)[:, None] * E + offs_e[None, :],
                    mask=mask_n[:, None] & mask_e[None, :],
                    other=0.0,
                )
                acc += tl.sum(c[:, None] * x.to(tl.float32), 0)
            old = tl.load(dw_ptr + cls * E + offs_e, mask=mask_e, other=0.0)
            tl.store(dw_ptr + cls * E + offs_e, old + acc, mask=mask_e)


def sparse_backward(p, idx, coef, dsf, dce, need_dsf: bool, need_dce: bool):
    """Adds ``ds[b, idx[b, j]] += coef[b, j]`` to both gradients without atomics (see ``_kd_bwd_sparse_dw_kernel``)."""
    sf, ce = p.student_feats.contiguous(), p.class_embeds.contiguous()
    B, J = idx.shape
    C, E = ce.shape
    idx, coef = idx.contiguous(), coef.to(torch.float32).contiguous()
    block_j = min(64, _pow2(J, 16))
    if need_dsf:
        if dsf is None:
            dsf = torch.zeros(sf.shape, device=sf.device, dtype=torch.float32)
        _kd_bwd_sparse_dx_kernel[(B,)](ce, idx, coef, dsf, J, E, p.logit_scale, BLOCK_J=block_j, BLOCK_E=64)
    if need_dce:
        if dce is None:
            dce = torch.zeros(ce.shape, device=sf.device, dtype=torch.float32)
        # Slots grouped by class (stable: each class's entries in row order) with CSR offsets per class.
        by_class, src = torch.sort(idx.view(-1), stable=True)
        start = torch.searchsorted(by_class, torch.arange(C + 1, device=idx.device, dtype=by_class.dtype))
        _kd_bwd_sparse_dw_kernel[(C,)](sf, start, src, coef, dce, J, E, p.logit_scale, BLOCK_N=block_j, BLOCK_E=64)
    return dsf, dce
