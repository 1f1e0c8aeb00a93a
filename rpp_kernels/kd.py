"""rpp_kernels.kd: fused top-k teacher-student distillation loss with the class-embedding matmul fused in."""

from __future__ import annotations

import torch
from torch import nn

from rpp_kernels.ops.kd import topk_kd_loss as _topk_kd_loss

__all__ = ["topk_kd_loss", "TopKDistillationLoss"]

Teacher = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def topk_kd_loss(
    student_feats: torch.Tensor,
    class_embeds: torch.Tensor,
    teacher: Teacher,
    *,
    k: int | None = 100,
    temperature: float = 1.0,
    logit_scale: float | torch.Tensor = 1.0,
    labels: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    class_mask: torch.Tensor | None = None,
    student_support: str = "full",
    reduction: str = "mean",
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Top-k knowledge-distillation loss of student logits ``logit_scale * student_feats @ class_embeds.T`` against a
    teacher, computed chunk by chunk over the classes: ``[B, C]`` logits are never held whole.

    student_feats: ``[B, E]``; class_embeds: ``[C, E]`` (same dtype; both may require grad).
    teacher, one of (no gradient flows to it):
      * logits ``[B, C]`` (``-inf`` rules a class out; NaN or ``+inf`` is an error);
      * ``(teacher_feats [B, Et], teacher_class_embeds [C, Et])``: logits ``logit_scale * feats @ embeds.T``, fused
        (both finite);
      * ``(indices [B, k'] int, probs [B, k'])``: a precomputed top-k (probabilities already at temperature T; entries
        are renormalised over the unmasked ones; with ``k < k'`` the k most probable are kept). Indices must be
        distinct within a row, probs finite and ``>= 0``.
    logit_scale: a float or a one-element tensor used as a constant: no gradient flows to it (a tensor that requires
      grad is an error).
    k: teacher ``softmax(t / T)`` is truncated to its top-k classes and renormalised; ``None`` (or ``k >= C``): the
      full distribution. Ties at the k-th value: the lower class index wins (``torch.topk`` promises no order).
    student_support: ``"full"`` softmax over all classes, or ``"topk"`` renormalised over the teacher's top-k (then,
      with no labels, the other classes' student logits are never computed). Top-k slots whose teacher logit is -inf
      leave the support; with ``k >= C`` (or None) ``"topk"`` is ``"full"``, so every unmasked class stays in it.
    labels: ``[B]`` int; adds ``ce_weight * cross_entropy(s, labels)`` over all unmasked classes, at temperature 1
      (``ce_weight != 0`` needs labels). class_mask: ``[C]`` bool, False removes a class from both distributions (a
      label on a removed class is an error).
    Returns the loss in float32 (float64 for float64 inputs): a scalar for ``reduction`` ``"mean"`` (over rows) /
    ``"sum"``, ``[B]`` for ``"none"``; ``"mean"`` of an empty batch is nan, as ``torch.mean`` (backward gives zeros).
    A row whose teacher has no probability mass (every class masked or -inf) contributes no KD term.
    validate: check tensor values (label/index ranges, distinct indices, finite teacher, non-empty class mask). Each
      check reads values back to the host, which on CUDA waits for the stream; ``validate=False`` skips them (trusted
      inputs: the call then never syncs, given a float ``logit_scale``). Shapes, dtypes and devices are always checked.

    Equivalent PyTorch (``k < C``, logits teacher, ``student_support="full"``)::

        s = logit_scale * student_feats.float() @ class_embeds.float().T
        vals, idx = t.float().topk(k)  # ties: lower index
        p = torch.zeros_like(s).scatter(1, idx, torch.softmax(vals / T, 1))
        kl = (p * (p.log() - torch.log_softmax(s / T, 1))).nan_to_num().sum(1)
        loss = (kd_weight * T**2 * kl + ce_weight * F.cross_entropy(s, labels, reduction="none")).mean()
    """
    return _topk_kd_loss(
        student_feats,
        class_embeds,
        teacher,
        k=k,
        temperature=temperature,
        logit_scale=logit_scale,
        labels=labels,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        class_mask=class_mask,
        student_support=student_support,
        reduction=reduction,
        backend=backend,
        validate=validate,
    )


class TopKDistillationLoss(nn.Module):
    """Module form of :func:`topk_kd_loss`; the keyword arguments are fixed at construction.

    ``forward(student_feats, class_embeds, teacher, labels=None)``.
    """

    def __init__(
        self,
        *,
        k: int | None = 100,
        temperature: float = 1.0,
        logit_scale: float | torch.Tensor = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        class_mask: torch.Tensor | None = None,
        student_support: str = "full",
        reduction: str = "mean",
        backend: str | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.k = k
        self.temperature = temperature
        self.logit_scale = logit_scale
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.register_buffer("class_mask", class_mask, persistent=False)
        self.student_support = student_support
        self.reduction = reduction
        self.backend = backend
        self.validate = validate

    def forward(
        self,
        student_feats: torch.Tensor,
        class_embeds: torch.Tensor,
        teacher: Teacher,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return topk_kd_loss(
            student_feats,
            class_embeds,
            teacher,
            k=self.k,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            labels=labels,
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            class_mask=self.class_mask,
            student_support=self.student_support,
            reduction=self.reduction,
            backend=self.backend,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
            f"student_support={self.student_support!r}, reduction={self.reduction!r}"
        )
