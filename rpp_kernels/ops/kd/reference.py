"""Plain eager reference of the top-k KD loss: materialises fp32 ``[B, C]`` logits. Defines the semantics the backends
are tested against (and is the "eager" baseline of the benchmarks' memory numbers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _topk_tie_low_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim 1; among equal values the lower column wins (a stable descending sort)."""
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return x.gather(1, order), order


def topk_kd_loss_ref(
    student_feats: torch.Tensor,
    class_embeds: torch.Tensor,
    teacher,
    *,
    k: int | None = 100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    labels: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    class_mask: torch.Tensor | None = None,
    student_support: str = "full",
    reduction: str = "mean",
) -> torch.Tensor:
    """Same contract as :func:`rpp_kernels.kd.topk_kd_loss` (no validation), computed densely in fp32 (fp64 for fp64
    inputs).

    student_feats: ``[B, E]``; class_embeds: ``[C, E]``; teacher: logits ``[B, C]``, ``(feats [B, Et], embeds [C, Et])``
    or ``(indices [B, k] int, probs [B, k])``. Returns the loss in fp32 (``[B]`` for ``reduction="none"``).
    """
    acc = torch.float64 if student_feats.dtype == torch.float64 else torch.float32
    T = float(temperature)
    scale = float(logit_scale)
    s = scale * (student_feats.to(acc) @ class_embeds.to(acc).T)  # [B, C]
    B, C = s.shape
    neg = torch.full_like(s, float("-inf"))
    keep = torch.ones(C, dtype=torch.bool, device=s.device) if class_mask is None else class_mask
    s = torch.where(keep, s, neg)
    u = s / T
    if isinstance(teacher, (tuple, list)) and not teacher[0].is_floating_point():
        # Dense view of the cache: prob for unmasked entries, -1 for masked ones, -2 for classes not in the cache.
        idx = teacher[0].long()
        given = torch.where(keep[idx], teacher[1].to(acc), torch.full_like(teacher[1], -1.0, dtype=acc))
        dense = torch.full((B, C), -2.0, device=s.device, dtype=acc).scatter(1, idx, given)
        if k is not None and k < idx.shape[1]:
            _, idx = _topk_tie_low_index(dense, k)
        vals = dense.gather(1, idx)
        support = torch.zeros(B, C, dtype=torch.bool, device=s.device).scatter(1, idx, vals >= 0)
        p_dense = torch.zeros(B, C, device=s.device, dtype=acc).scatter(1, idx, vals.clamp_min(0))
        p_dense = p_dense / p_dense.sum(1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    else:
        if isinstance(teacher, (tuple, list)):
            t = scale * (teacher[0].to(acc) @ teacher[1].to(acc).T)
        else:
            t = teacher.to(acc)
        t = torch.where(keep, t, neg)
        if k is None or k >= C:
            support = keep.expand(B, C)
            kept = t
        else:
            vals, idx = _topk_tie_low_index(t, k)
            support = torch.zeros(B, C, dtype=torch.bool, device=s.device).scatter(1, idx, True)
            support &= torch.isfinite(t)
            kept = torch.where(support, t, neg)
        p_dense = torch.softmax(kept / T, dim=1).nan_to_num(0.0)  # a row with no finite teacher logit: p = 0
    if student_support == "topk":
        logq = torch.log_softmax(torch.where(support, u, neg), dim=1)
    else:
        logq = torch.log_softmax(u, dim=1)
    logp = torch.log(p_dense)
    kl = torch.where(p_dense > 0, p_dense * (logp - logq), torch.zeros_like(p_dense)).sum(1)
    rows = kd_weight * T * T * kl
    if labels is not None and ce_weight != 0.0:
        rows = rows + ce_weight * F.cross_entropy(s, labels.long(), reduction="none")
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def eager_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The usual eager PyTorch baseline (benchmarks): ``log_softmax`` + dense renormalised top-k + ``kl_div``."""
    T = temperature
    log_q = F.log_softmax(student_logits.float() / T, dim=1)
    vals, idx = torch.topk(teacher_logits.float(), k, dim=1)
    p = torch.zeros_like(log_q).scatter(1, idx, torch.softmax(vals / T, dim=1))
    return F.kl_div(log_q, p, reduction="batchmean") * T * T
