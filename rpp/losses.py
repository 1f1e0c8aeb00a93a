"""Class sampling per step and the locally corrected cross-entropy over the sampled classes.

Two objectives (``--sampling``):

* ``pomp``: POMP's code (amazon-science/prompt-pretraining, ``trainers/pomp.py``): every row scores its own label
  against ``K - 1`` negatives shared by the batch (:func:`sample_pomp_negatives`); a negative equal to the row's label
  is masked; each row's negatives get its own local correction (:func:`pomp_correction`); :func:`pomp_cross_entropy`.
* ``rpp``: one shared class set per step (:func:`sample_classes`): in-batch labels (optionally with the teacher's
  top-k) and uniform random negatives up to ``K``, one global correction (:func:`local_correction`),
  :func:`corrected_cross_entropy` over the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NEGATIVE_MODES",
    "ClassSample",
    "corrected_cross_entropy",
    "full_class_set",
    "local_correction",
    "negative_probs",
    "pomp_correction",
    "pomp_cross_entropy",
    "sample_classes",
    "sample_pomp_negatives",
]

NEGATIVE_MODES = ("random", "hard", "easy")


@dataclass
class ClassSample:
    """The classes of one step and the batch's targets expressed as positions in them.

    classes: ``[K]`` int64 global class ids, all distinct (CPU). targets: ``[B]`` positions of the labels in
    ``classes``. teacher_positions: ``[B, k]`` positions of the teacher's top-k classes (None without a teacher).
    num_classes: the size ``C`` of the full class set.
    """

    classes: torch.Tensor
    targets: torch.Tensor
    teacher_positions: torch.Tensor | None
    num_classes: int

    @property
    def is_full(self) -> bool:
        return len(self.classes) == self.num_classes


def sample_classes(
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    generator: torch.Generator,
    teacher_indices: torch.Tensor | None = None,
) -> ClassSample:
    """The class set of one step (POMP): in-batch labels ∪ the teacher's top-k ∪ uniform random negatives up to ``k``.

    labels: ``[B]`` global ids; teacher_indices: ``[B, k_t]`` global ids or None. The required classes (labels and
    teacher top-k) are always all kept, sorted, first; if there are ``k`` or more of them no negatives are drawn
    (the set is then larger than ``k``). Negatives are drawn without replacement from the classes that are neither
    labels nor teacher classes (ground-truth masking: a negative column never duplicates a label's class), in the
    order of ``torch.randperm(num_classes, generator=generator)``, so the sample is a deterministic function of the
    inputs and the generator state. Equivalent to::

        required = sorted(set(labels) | set(teacher_indices.flatten()))
        rest = [c for c in torch.randperm(C, generator=g).tolist() if c not in required]
        classes = required + rest[: max(0, k - len(required))]
    """
    if k < 1:
        raise ValueError(f"sample_classes: k must be >= 1, got {k}")
    labels = labels.detach().cpu().long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"sample_classes: labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    required = (
        labels if teacher_indices is None else torch.cat([labels, teacher_indices.detach().cpu().long().flatten()])
    )
    required = torch.unique(required)  # sorted
    need = k - len(required)
    if need > 0:
        perm = torch.randperm(num_classes, generator=generator, device=generator.device).cpu()
        negatives = perm[~torch.isin(perm, required)][:need]
        classes = torch.cat([required, negatives])
    else:
        classes = required
    targets = torch.searchsorted(required, labels)
    positions = None if teacher_indices is None else torch.searchsorted(required, teacher_indices.detach().cpu().long())
    return ClassSample(classes, targets, positions, num_classes)


def full_class_set(labels: torch.Tensor, num_classes: int, teacher_indices: torch.Tensor | None = None) -> ClassSample:
    """Every class, in order (no sampling, no correction): targets are the labels themselves."""
    labels = labels.detach().cpu().long()
    positions = None if teacher_indices is None else teacher_indices.detach().cpu().long()
    return ClassSample(torch.arange(num_classes), labels, positions, num_classes)


def local_correction(num_classes: int, num_sampled: int, log10: bool = False) -> float:
    """POMP's local correction ``log((C - 1) / (K - 1))`` added to every negative logit of a sampled softmax.

    Each of the ``K - 1`` negatives in the sampled set stands for ``(C - 1) / (K - 1)`` classes of the full set, so
    adding the log of that ratio to the negative logits makes the sampled softmax an estimate of the full one. 0 when
    nothing is sampled away (``K == C``) or there are no negatives (``K <= 1``). POMP's released code computes the
    ratio with ``log10`` (a correction ``ln(10)`` times smaller); ``log10=True`` reproduces it. POMP's sampled set
    holds only random negatives; here it also holds the other in-batch labels and the teacher's top-k, which are
    corrected alike (an approximation: those are not uniform draws, and the teacher's are the hardest negatives).
    """
    if num_sampled <= 1 or num_sampled >= num_classes:
        return 0.0
    ratio = (num_classes - 1) / (num_sampled - 1)
    return math.log10(ratio) if log10 else math.log(ratio)


def corrected_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, correction: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over the sampled classes with ``correction`` added to every non-target logit.

    logits: ``[B, K]``; targets: ``[B]``. Softmax is shift invariant, so this subtracts ``correction`` from the target
    logit instead of adding it to the ``K - 1`` others. Equivalent PyTorch::

        F.cross_entropy(logits + correction * (1 - F.one_hot(targets, K)), targets)
    """
    if correction:
        target_logits = logits.gather(1, targets[:, None]) - correction
        logits = logits.scatter(1, targets[:, None], target_logits)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


# ------------------------------------------------------------------------------------------------------------ POMP


def negative_probs(image_feats: torch.Tensor, bank: torch.Tensor, logit_scale: float, mode: str) -> torch.Tensor:
    """POMP's sampling distribution ``[C]`` over all classes for ``hard`` / ``easy`` negatives.

    image_feats: ``[B, E]`` unit norm; bank: ``[C, E]`` unit-norm text features of every class. The batch-mean logit
    of each class, softmaxed (``hard``: likely classes drawn more often) or negated first (``easy``). Equivalent::

        m = (logit_scale * image_feats @ bank.T).mean(0)
        torch.softmax(m if mode == "hard" else -m, 0)
    """
    if mode not in ("hard", "easy"):
        raise ValueError(f"negative_probs: mode must be 'hard' or 'easy', got {mode!r}")
    mean_logits = (logit_scale * image_feats.detach().float() @ bank.detach().float().T).mean(0)
    return torch.softmax(mean_logits if mode == "hard" else -mean_logits, dim=0)


def sample_pomp_negatives(
    num_classes: int, num_negatives: int, generator: torch.Generator, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """``[num_negatives]`` int64 class ids shared by every row of the batch (CPU), drawn from all classes, labels
    included (those are masked per row by :func:`pomp_correction`).

    ``probs`` None (POMP's ``random`` mode): distinct classes, the first of ``torch.randperm(num_classes,
    generator=generator)``. ``probs`` ``[C]`` (``hard`` / ``easy``, see :func:`negative_probs`): drawn with
    replacement, as POMP's ``np.random.choice(C, size, p=probs)``, here ``torch.multinomial(probs, n, True,
    generator=generator)``.
    """
    if num_negatives < 1 or (probs is None and num_negatives > num_classes):  # with replacement: any number
        raise ValueError(f"sample_pomp_negatives: need 1 <= negatives <= {num_classes} classes, got {num_negatives}")
    if probs is None:
        return torch.randperm(num_classes, generator=generator, device=generator.device).cpu()[:num_negatives]
    if probs.shape != (num_classes,):
        raise ValueError(f"sample_pomp_negatives: probs must have shape [{num_classes}], got {list(probs.shape)}")
    return torch.multinomial(probs.detach().float().cpu(), num_negatives, replacement=True, generator=generator)


def pomp_correction(
    labels: torch.Tensor,
    negatives: torch.Tensor,
    num_classes: int,
    neg_probs: torch.Tensor | None = None,
    log10: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correction [B, N], reject [B, N])`` for labels ``[B]`` and shared negatives ``[N]`` (global ids).

    reject: ``labels[i] == negatives[j]`` (that column is the row's own class: masked out of its softmax).
    correction, added to row i's negative logits (POMP's local correction; ``log`` is ``log10`` as in POMP's code, or
    the natural log with ``log10=False``):

    * random negatives: ``log(C - 1) - log(N - r_i)`` with ``r_i`` the row's rejected columns: each of the row's
      ``N - r_i`` true negatives stands for ``(C - 1) / (N - r_i)`` classes;
    * hard / easy negatives drawn with probabilities ``p`` (``neg_probs`` ``[N]``, the probability of each drawn
      class): ``-log(p_j)``, the same for every row.
    """
    labels, negatives = labels.detach().long(), negatives.detach().long().to(labels.device)
    reject = labels[:, None] == negatives[None, :]
    log = torch.log10 if log10 else torch.log
    if neg_probs is None:
        true_negatives = (len(negatives) - reject.sum(-1, keepdim=True)).clamp_min(1).double()
        correction = log(torch.tensor(float(num_classes - 1), dtype=torch.float64)) - log(true_negatives)
        correction = correction.float().expand(-1, len(negatives))
    else:
        correction = -log(neg_probs.detach().double().to(labels.device)).float()[None, :].expand(len(labels), -1)
    return correction, reject


def pomp_cross_entropy(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    reject: torch.Tensor,
    correction: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """POMP's loss: cross-entropy of ``[pos_i, negatives of row i]`` with the positive as target.

    pos_logits: ``[B]`` (row i against its own label); neg_logits: ``[B, N]``; reject ``[B, N]`` bool masks a
    negative equal to the row's label (POMP subtracts 1e6; here -inf, the same softmax); correction ``[B, N]`` is
    added to the negative logits. Equivalent PyTorch::

        logits = torch.cat([pos[:, None], neg - 1e6 * reject + correction], 1)
        F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    """
    neg = neg_logits.float()
    if correction is not None:
        neg = neg + correction.to(neg.device)
    neg = neg.masked_fill(reject.to(neg.device), float("-inf"))
    logits = torch.cat([pos_logits.float()[:, None], neg], dim=1)
    targets = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, targets, reduction=reduction)
