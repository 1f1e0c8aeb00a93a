"""Shared inputs and checks for the KD loss tests (no tests here; imported by tests/ops/test_kd*.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.ops.kd.reference import topk_kd_loss_ref

# Worst absolute error allowed, relative to the largest reference magnitude (loss or gradient), per dtype.
# Both sides upcast the same rounded inputs to fp32, so values differ only by fp32 summation order; fp16 gradients are
# additionally rounded to fp16 at the end.
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 5e-5), torch.float16: (2e-5, 2e-3)}


@dataclass(frozen=True)
class Case:
    B: int
    C: int
    k: int | None
    T: float = 1.0
    form: str = "logits"  # logits | feats | topk
    support: str = "full"
    labels: bool = False
    mask: bool = False
    ties: bool = False
    E: int = 24
    Et: int = 40
    dead_row: bool = False  # one row whose teacher logits are all -inf

    def __str__(self) -> str:
        flags = [n for n in ("labels", "mask", "ties", "dead_row") if getattr(self, n)]
        return f"B{self.B}-C{self.C}-k{self.k}-T{self.T:g}-{self.form}-{self.support}" + "".join(f"-{f}" for f in flags)


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """(student_feats, class_embeds, teacher, kwargs) for one case; feats require grad."""
    g = torch.Generator().manual_seed(seed)
    B, C = case.B, case.C

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    sf = (randn(B, case.E) / case.E**0.5).to(dtype).to(device).requires_grad_()
    ce = randn(C, case.E).to(dtype).to(device).requires_grad_()
    mask = None
    if case.mask:
        mask = torch.rand(C, generator=g) > 0.3
        mask[0] = True
        mask = mask.to(device)
    if case.form == "feats":
        teacher = ((randn(B, case.Et) / case.Et**0.5).to(dtype).to(device), randn(C, case.Et).to(dtype).to(device))
    else:
        t = torch.randint(0, 3, (B, C), generator=g).float() if case.ties else 2 * randn(B, C)
        if case.dead_row:
            t[-1] = float("-inf")
        if case.form == "logits":
            teacher = t.to(dtype).to(device)
        else:
            width = min(C, (case.k or 8) + 3)  # a cache wider than k exercises the truncation
            vals, idx = torch.sort(t, dim=1, descending=True, stable=True)
            probs = torch.softmax(vals[:, :width] / case.T, dim=1)
            perm = torch.randperm(width, generator=g)  # cache order must not matter
            teacher = (idx[:, :width][:, perm].to(device), probs[:, perm].to(dtype).to(device))
    kwargs = dict(k=case.k, temperature=case.T, logit_scale=3.0, class_mask=mask, student_support=case.support)
    if case.labels:
        labels = torch.randint(0, C, (B,), generator=g)
        if mask is not None:
            labels = torch.where(mask[labels.to(device)].cpu(), labels, torch.zeros_like(labels))
        kwargs.update(labels=labels.to(device), ce_weight=0.7, kd_weight=0.9)
    return sf, ce, teacher, kwargs


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (got.double() - ref.double()).abs()
    bound = tol * max(1.0, ref.double().abs().max().item())
    worst = err.argmax().item() if err.numel() else 0
    assert err.numel() == 0 or err.max().item() <= bound, (
        f"{name}: max error {err.max().item():.3e} > {bound:.3e} at flat index {worst} "
        f"(got {got.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g})"
    )


def check_against_reference(case: Case, backend: str, dtype=torch.float32, device="cpu", reduction="mean"):
    sf, ce, teacher, kwargs = make_inputs(case, dtype, device)
    loss = topk_kd_loss(sf, ce, teacher, reduction=reduction, backend=backend, **kwargs)
    ref = topk_kd_loss_ref(sf, ce, teacher, reduction=reduction, **kwargs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(ref).all(), f"reference is not finite for {case}"
    vtol, gtol = TOL[dtype]
    assert_close(f"loss {case}", loss, ref, vtol)
    weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)  # distinct per-row upstream gradients
    got = torch.autograd.grad((loss * weights.to(device)).sum(), [sf, ce])
    want = torch.autograd.grad((ref * weights.to(device)).sum(), [sf, ce])
    for name, a, b in zip(("d student_feats", "d class_embeds"), got, want, strict=True):
        assert a.dtype == dtype
        assert_close(f"{name} {case}", a, b, gtol)
