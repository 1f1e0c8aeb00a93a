"""Backend-independent parts of the top-k KD loss: the problem, the O(B*k) epilogue and the backward coefficients.

Every backend computes the same four pieces, so this file holds the math once:

1. ``stream``: one pass over the classes per block of rows giving per-row statistics (student log-sum-exp at
   temperature T and at 1, the teacher's top-k indices/logits, or for the full teacher distribution its log-sum-exp and
   the running ``E_p[w - u]``);
2. ``gather``: student logits at B*k (index) positions;
3. the epilogue below turns those into the per-row loss and the coefficients backward needs (all O(B*k));
4. backward: a dense part ``ds = a_u * (softmax(u) - softmax(w)) + a_1 * softmax(s)`` (the ``softmax(w)`` term for a
   full teacher only) recomputed tile by tile and
   a sparse part (k coefficients per row, plus the label) scattered at the teacher's top-k indices.

Notation per row: ``s = logit_scale * student_feats @ class_embeds.T`` (fp32; fp64 for fp64 inputs, see
``Problem.acc_dtype``), ``u = s / T``, teacher logits ``t``, ``w = t / T``. Masked classes (``class_mask`` False) are
``-inf`` in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Teacher forms.
LOGITS, FEATS, TOPK = "logits", "feats", "topk"


@dataclass
class Problem:
    """Validated inputs of one call. ``k`` is None when the full teacher distribution is used (k=None or k >= C)."""

    student_feats: torch.Tensor  # [B, E]
    class_embeds: torch.Tensor  # [C, E]
    form: str  # LOGITS, FEATS or TOPK
    teacher_logits: torch.Tensor | None  # [B, C]        (LOGITS)
    teacher_feats: torch.Tensor | None  # [B, Et]        (FEATS)
    teacher_embeds: torch.Tensor | None  # [C, Et]       (FEATS)
    topk_indices: torch.Tensor | None  # [B, k] int64    (TOPK)
    topk_probs: torch.Tensor | None  # [B, k]           (TOPK)
    k: int | None
    temperature: float
    logit_scale: float
    labels: torch.Tensor | None  # [B] int64
    kd_weight: float
    ce_weight: float
    class_mask: torch.Tensor | None  # [C] bool
    support: str  # "full" or "topk"

    @property
    def batch(self) -> int:
        return self.student_feats.shape[0]

    @property
    def acc_dtype(self) -> torch.dtype:
        """Dtype of logits, statistics and the loss: fp32, or fp64 for fp64 inputs (gradcheck, reference runs)."""
        return torch.float64 if self.student_feats.dtype == torch.float64 else torch.float32

    @property
    def num_classes(self) -> int:
        return self.class_embeds.shape[0]

    @property
    def full_teacher(self) -> bool:
        """The teacher distribution is over all classes (no top-k truncation)."""
        return self.form != TOPK and self.k is None

    @property
    def need_student_lse(self) -> bool:
        """The student softmax is over all classes, so the stream must visit every student logit (make_problem sets
        ``support="full"`` for a full teacher)."""
        return self.support == "full"

    @property
    def need_ce(self) -> bool:
        return self.labels is not None and self.ce_weight != 0.0


@dataclass
class Stats:
    """Per-row results of the streaming pass (fp32). Fields not needed by the problem are None."""

    lse_u: torch.Tensor | None = None  # [B] logsumexp of s/T over unmasked classes
    lse_1: torch.Tensor | None = None  # [B] logsumexp of s over unmasked classes (cross-entropy)
    top_idx: torch.Tensor | None = None  # [B, k] int64 teacher top-k, sorted by (logit desc, index asc)
    top_val: torch.Tensor | None = None  # [B, k] fp32 teacher logits t (not divided by T); -inf = no class
    lse_w: torch.Tensor | None = None  # [B] logsumexp of t/T over unmasked classes (full teacher)
    ew_diff: torch.Tensor | None = None  # [B] E_{p_teacher}[w - u] over unmasked classes (full teacher)


def stable_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``values`` along dim 1 with the tie rule of this package: equal values, lower class index first.

    ``indices`` must be increasing along dim 1 within equal values (e.g. column order); a stable descending sort then
    keeps lower indices first. ``torch.topk`` does not promise any order among ties (on CPU it does not keep index
    order), so every backend uses this rule instead.
    """
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


KEY_EMPTY = -(2**63)  # smaller than every packed key: an unfilled top-k slot
LOW_BITS = 2**31 - 1


def unpack_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int64 keys ``[B, >=k]`` -> (logits fp32 ``[B, k]``, -inf for empty slots; class indices int64 ``[B, k]``).

    The Triton and CUDA backends keep the running top-k as keys ``order_preserving(logit) << 32 | (2^31 - 1 - class)``
    (see ``triton.py`` and ``csrc/kd_topk.h``): one integer comparison orders by logit, then by lower class index.
    """
    keys = keys[:, :k]
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    empty = keys == KEY_EMPTY
    vals = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    idx = torch.where(empty, torch.zeros_like(keys), LOW_BITS - (keys & 0xFFFFFFFF))
    return vals, idx


def select_precomputed(
    indices: torch.Tensor, probs: torch.Tensor, k: int | None, mask: torch.Tensor | None, dtype: torch.dtype
):
    """Slots of a precomputed top-k teacher: ``(idx [B, k'], probs [B, k'] in dtype, valid [B, k'])``.

    With ``k`` smaller than the cache's width the k most probable unmasked entries are kept (ties: lower class index).
    """
    idx = indices.long()
    pr = probs.to(dtype)
    valid = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask[idx]
    if k is not None and k < idx.shape[1]:
        by_index = torch.sort(idx, dim=1, stable=True).indices
        idx, pr, valid = idx.gather(1, by_index), pr.gather(1, by_index), valid.gather(1, by_index)
        key = torch.where(valid, pr, torch.full_like(pr, -1.0))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
        idx, pr, valid = idx.gather(1, order), pr.gather(1, order), valid.gather(1, order)
    return idx, torch.where(valid, pr, torch.zeros_like(pr)), valid


@dataclass
class Epilogue:
    """Per-row loss and what backward needs (all O(B*k) or O(B))."""

    rows: torch.Tensor  # [B] fp32 loss per row
    slot_coef: torch.Tensor  # [B, J] d row / d s at ``slot_idx`` (sparse part), per unit upstream gradient
    slot_idx: torch.Tensor  # [B, J] int64 (teacher top-k, then the label)
    a_u: torch.Tensor  # [B] coefficient of softmax(u) over all classes (dense part), and of -softmax(w) (full teacher)
    a_1: torch.Tensor  # [B] coefficient of softmax(s)
    lse_w: torch.Tensor | None  # [B] teacher log-sum-exp for the dense backward; +inf on rows without teacher mass


def epilogue(p: Problem, stats: Stats, gather) -> Epilogue:
    """Loss per row and backward coefficients from the streaming statistics.

    ``gather(idx [B, J]) -> s [B, J]`` returns student logits (fp32) at the given classes.
    Per row: ``kd_weight * T^2 * KL(p_t || p_s) + ce_weight * (lse_1 - s[label])``; d/ds of the KD term is
    ``kd_weight * T * (P * q - p_t)`` with ``q`` the student softmax over its support and ``P`` = 1 when the row has
    any teacher mass (0 otherwise: such rows contribute nothing).
    """
    T = p.temperature
    B = p.batch
    dev = p.student_feats.device
    kdw = p.kd_weight * T
    zeros = torch.zeros(B, device=dev, dtype=p.acc_dtype)
    slot_idx = [torch.zeros(B, 0, dtype=torch.long, device=dev)]
    slot_coef = [torch.zeros(B, 0, dtype=p.acc_dtype, device=dev)]
    a_u, a_1 = zeros, zeros
    label_cols = 1 if p.need_ce else 0
    s_label = None
    lse_w_bwd = None
    if p.full_teacher:
        has = torch.isfinite(stats.lse_w)
        kl = torch.where(has, stats.ew_diff - stats.lse_w + stats.lse_u, zeros)
        a_u = kdw * has.to(p.acc_dtype)
        # exp(w - inf) = 0: rows with no teacher mass get no -softmax(w) term instead of exp(-inf + inf) = nan.
        lse_w_bwd = torch.where(has, stats.lse_w, torch.full_like(zeros, float("inf")))
        if label_cols:
            s_label = gather(p.labels[:, None])[:, 0]
    else:
        if p.form == TOPK:
            idx, pt, valid = select_precomputed(p.topk_indices, p.topk_probs, p.k, p.class_mask, p.acc_dtype)
            total = pt.sum(1, keepdim=True)
            has = total[:, 0] > 0
            pt = torch.where(total > 0, pt / total.clamp_min(torch.finfo(pt.dtype).tiny), torch.zeros_like(pt))
            logp = torch.log(pt)
        else:
            idx = stats.top_idx
            valid = torch.isfinite(stats.top_val)
            w = torch.where(valid, stats.top_val / T, torch.full_like(stats.top_val, float("-inf")))
            lse = torch.logsumexp(w, dim=1, keepdim=True)
            has = torch.isfinite(lse[:, 0])
            logp = torch.where(valid & has[:, None], w - lse, torch.full_like(w, float("-inf")))
            pt = torch.exp(logp)
        cols = torch.cat([idx, p.labels[:, None]], 1) if label_cols else idx
        s_all = gather(cols)
        s_slots = s_all[:, : idx.shape[1]]
        if label_cols:
            s_label = s_all[:, -1]
        u = s_slots / T
        if p.support == "topk":
            lse_u = torch.logsumexp(torch.where(valid, u, torch.full_like(u, float("-inf"))), dim=1)
        else:
            lse_u = stats.lse_u
        logq = u - lse_u[:, None]
        kl = torch.where(pt > 0, pt * (logp - logq), torch.zeros_like(pt)).sum(1)
        coef = -kdw * pt
        if p.support == "topk":
            q = torch.where(valid & has[:, None], torch.exp(logq), torch.zeros_like(logq))
            coef = coef + kdw * q
        else:
            a_u = kdw * has.to(p.acc_dtype)
        slot_idx.append(idx)
        slot_coef.append(coef)
    rows = p.kd_weight * T * T * kl
    if label_cols:
        rows = rows + p.ce_weight * (stats.lse_1 - s_label)
        a_1 = torch.full_like(zeros, p.ce_weight)
        slot_idx.append(p.labels[:, None])
        slot_coef.append(torch.full((B, 1), -p.ce_weight, device=dev, dtype=p.acc_dtype))
    return Epilogue(rows, torch.cat(slot_coef, 1), torch.cat(slot_idx, 1), a_u, a_1, lse_w_bwd)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (fp64 for fp64). On CUDA, fp16/bf16 operands stay half and run on
    tensor cores with fp32 accumulation and an fp32 output (cuBLAS, ``out_dtype``); upcasting them first would run an
    fp32 GEMM (SIMT, or TF32 when allowed) and read twice the bytes. Elsewhere (CPU, the interpreter, fp32/fp64 inputs)
    both are upcast.
    """
    half = next((t.dtype for t in (a, b) if t.dtype in (torch.float16, torch.bfloat16)), None)
    if a.is_cuda and half is not None:
        # An fp32 operand next to a half one (backward's ds) is rounded to that half dtype, as the Triton backend does.
        return torch.mm(a.to(half), b.to(half), out_dtype=torch.float32)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.to(acc) @ b.to(acc)
