"""topk_kd_loss: validation, backend dispatch and the autograd.Function shared by every backend.

A backend supplies four pieces (see ``common.py``): ``stream``, ``gather``, ``dense_backward`` (which also takes the
sparse coefficients, folded into its ds) and ``sparse_backward`` (the sparse part alone, when there is no dense one).
The autograd.Function saves only the inputs, the teacher's top-k slots with one coefficient each (O(B*k)) and per-row
statistics; backward recomputes logits tile by tile.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import SimpleNamespace

import torch

from rpp_kernels import _dispatch
from rpp_kernels.ops.kd import chunked
from rpp_kernels.ops.kd.common import FEATS, LOGITS, TOPK, Problem, epilogue

REDUCTIONS = ("mean", "sum", "none")
SUPPORTS = ("full", "topk")
# The Triton top-k kernel keeps the running top-k in registers as one sorted [rows, KPAD] block of packed keys. The
# feature dims have no limit: every matmul loops over E in BLOCK_E slices (no [rows, E] tile stays on chip).
TRITON_MAX_K = 128


def _triton_check(*, device, dtype, k, **_):
    """``k``: the teacher top-k the backend must select (None: none, e.g. a full or precomputed teacher)."""
    if k is not None and k > TRITON_MAX_K:
        return [f"k={k} > {TRITON_MAX_K} (the running top-k lives in registers)"]
    return []


def _cuda_check(*, device, dtype, k, **_):
    from rpp_kernels.ops.kd import cuda as kd_cuda

    reasons = []
    if k is not None and k > kd_cuda.MAX_K:
        reasons.append(f"k={k} > {kd_cuda.MAX_K} (per-row top-k buffer in shared memory)")
    if device.type == "cuda":
        why = kd_cuda.arch_reason(torch.cuda.get_device_capability(device), kd_cuda.built_archs())
        if why:
            reasons.append(why)
    return reasons


BACKENDS = _dispatch.register(
    "kd",
    [
        _dispatch.Backend(
            "cuda",
            devices=("cuda",),
            dtypes=_dispatch.FLOATS,
            unavailable=lambda: (
                _dispatch.cuda_extension_error()
                or (None if _dispatch.cuda_extension_has_gpu_kernels() else "rpp_kernels._C was built without nvcc")
            ),
            check=_cuda_check,
        ),
        _dispatch.triton_backend(check=_triton_check),
        _dispatch.torch_backend(),
    ],
)


def _impl(name: str):
    """The four pieces of one backend. Triton and the extension are imported here, on first use, never at import."""
    if name == "torch":
        return chunked
    if name == "triton":
        return importlib.import_module("rpp_kernels.ops.kd.triton")
    if name == "cuda":
        cuda = importlib.import_module("rpp_kernels.ops.kd.cuda")
        return SimpleNamespace(
            stream=cuda.stream,
            gather=chunked.gather,
            dense_backward=chunked.dense_backward,
            sparse_backward=chunked.sparse_backward,
        )
    raise AssertionError(f"unhandled backend {name}")


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"topk_kd_loss: {name} must be a scalar, got a tensor of shape {_shape(value)}")
        value = value.detach().item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"topk_kd_loss: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise ValueError(f"topk_kd_loss: {name} must be finite, got {out}")
    return out


def _check_tensor(name: str, t, dims: int, device: torch.device, floating: bool | None = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"topk_kd_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"topk_kd_loss: {name} must have {dims} dims, got shape {_shape(t)}")
    if t.device != device:
        raise ValueError(f"topk_kd_loss: {name} is on {t.device} but student_feats is on {device}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"topk_kd_loss: {name} must be floating point, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"topk_kd_loss: {name} must be an integer tensor, got {t.dtype}")


def _sum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum()`` in fp32 (fp64 for fp64): a NaN anywhere makes it NaN, +inf makes it +inf (NaN next to a -inf), -inf
    alone makes it -inf. One reduction, 35x cheaper on CPU than ``isfinite(t).all()``; a false alarm would need finite
    values summing past 3e38."""
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _to_host(*values: torch.Tensor) -> list[float]:
    """Several 0-d checks fetched in one transfer: one host sync instead of one each (exact for ints below 2^53)."""
    return torch.stack([v.double() for v in values]).tolist()


def make_problem(
    student_feats,
    class_embeds,
    teacher,
    k,
    temperature,
    logit_scale,
    labels,
    kd_weight,
    ce_weight,
    class_mask,
    student_support,
    reduction,
    validate: bool = True,
) -> Problem:
    """Validate every argument (ValueError/TypeError naming the offending shape or value) and normalise them.

    ``validate=False`` skips the checks that read tensor values (label and index ranges, finiteness, a class mask that
    removes everything): each needs a device-to-host copy, i.e. a sync of the CUDA stream. Shapes, dtypes and devices
    are always checked (host metadata only)."""
    if not isinstance(student_feats, torch.Tensor):
        raise TypeError(f"topk_kd_loss: student_feats must be a torch.Tensor, got {type(student_feats).__name__}")
    dev = student_feats.device
    _check_tensor("student_feats", student_feats, 2, dev)
    _check_tensor("class_embeds", class_embeds, 2, dev)
    B, E = student_feats.shape
    C = class_embeds.shape[0]
    if class_embeds.shape[1] != E:
        raise ValueError(
            f"topk_kd_loss: class_embeds {_shape(class_embeds)} must be [C, E] with E={E} from student_feats "
            f"{_shape(student_feats)}"
        )
    if class_embeds.dtype != student_feats.dtype:
        raise TypeError(
            f"topk_kd_loss: class_embeds is {class_embeds.dtype} but student_feats is {student_feats.dtype}"
        )
    if C == 0:
        raise ValueError("topk_kd_loss: empty class set (class_embeds has 0 rows)")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"topk_kd_loss: k must be an int or None, got {k!r}")
        if k < 1:
            raise ValueError(f"topk_kd_loss: k must be >= 1 (or None for the full distribution), got {k}")
    T = _as_float("temperature", temperature)
    if T <= 0:
        raise ValueError(f"topk_kd_loss: temperature must be > 0, got {T}")
    if isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "topk_kd_loss: logit_scale requires grad, but the loss gives it no gradient; pass logit_scale.detach() "
            "(or a float) and learn it elsewhere"
        )
    scale = _as_float("logit_scale", logit_scale)
    kd_w = _as_float("kd_weight", kd_weight)
    ce_w = _as_float("ce_weight", ce_weight)
    if student_support not in SUPPORTS:
        raise ValueError(f"topk_kd_loss: student_support must be one of {SUPPORTS}, got {student_support!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"topk_kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if class_mask is not None:
        _check_tensor("class_mask", class_mask, 1, dev, floating=None)
        if class_mask.dtype != torch.bool or class_mask.shape[0] != C:
            raise ValueError(
                f"topk_kd_loss: class_mask must be a bool [C={C}] tensor, got {class_mask.dtype} {_shape(class_mask)}"
            )
        if validate and not bool(class_mask.any()):
            raise ValueError("topk_kd_loss: empty class set (class_mask removes every class)")
    if labels is not None:
        _check_tensor("labels", labels, 1, dev, floating=False)
        if labels.shape[0] != B:
            raise ValueError(f"topk_kd_loss: labels {_shape(labels)} must be [B={B}]")
        labels = labels.long()
        if B and validate:
            # The mask lookup is clamped so that an out-of-range label reports the range error, not an index fault.
            kept = class_mask[labels.clamp(0, C - 1)].all() if class_mask is not None else labels.new_ones(())
            lo, hi, all_kept = (int(v) for v in _to_host(labels.min(), labels.max(), kept))
            if lo < 0 or hi >= C:
                raise ValueError(f"topk_kd_loss: labels must be in [0, {C}), got min {lo}, max {hi}")
            if not all_kept:
                raise ValueError("topk_kd_loss: a label points at a class removed by class_mask")
    elif ce_w != 0.0:
        raise ValueError(f"topk_kd_loss: ce_weight={ce_w} needs labels")
    fields = dict(teacher_logits=None, teacher_feats=None, teacher_embeds=None, topk_indices=None, topk_probs=None)
    if isinstance(teacher, torch.Tensor):
        _check_tensor("teacher logits", teacher, 2, dev)
        if tuple(teacher.shape) != (B, C):
            raise ValueError(f"topk_kd_loss: teacher logits {_shape(teacher)} must be [B, C] = [{B}, {C}]")
        # -inf marks a class the teacher rules out; NaN and +inf have no distribution (the kernels would drop them).
        total = float(_sum(teacher)) if validate else 0.0
        if math.isnan(total) or total == math.inf:
            raise ValueError("topk_kd_loss: teacher logits contain NaN or +inf (-inf or class_mask drops a class)")
        form, fields["teacher_logits"] = LOGITS, teacher.detach()
    elif isinstance(teacher, (tuple, list)) and len(teacher) == 2:
        first, second = teacher
        if isinstance(first, torch.Tensor) and not first.is_floating_point():
            _check_tensor("teacher indices", first, 2, dev, floating=False)
            _check_tensor("teacher probs", second, 2, dev)
            if first.shape[0] != B or first.shape != second.shape or first.shape[1] == 0:
                raise ValueError(
                    f"topk_kd_loss: precomputed teacher (indices {_shape(first)}, probs {_shape(second)}) must be two "
                    f"[B={B}, k>=1] tensors"
                )
            if B and validate:
                by_class = first.sort(dim=1).values
                repeated = (by_class[:, 1:] == by_class[:, :-1]).any()
                probs_ok = ((second >= 0) & torch.isfinite(second)).all()
                lo, hi, repeated, probs_ok = (int(v) for v in _to_host(first.min(), first.max(), repeated, probs_ok))
                if lo < 0 or hi >= C:
                    raise ValueError(f"topk_kd_loss: teacher indices must be in [0, {C}), got min {lo}, max {hi}")
                if repeated:
                    raise ValueError(
                        "topk_kd_loss: teacher indices must be distinct within each row (a class is repeated)"
                    )
                if not probs_ok:
                    raise ValueError(
                        "topk_kd_loss: teacher probs must be finite and >= 0 (they are renormalised per row)"
                    )
            form = TOPK
            fields["topk_indices"], fields["topk_probs"] = first.long(), second.detach()
        else:
            _check_tensor("teacher_feats", first, 2, dev)
            _check_tensor("teacher_class_embeds", second, 2, dev)
            if first.shape[0] != B or second.shape[0] != C or first.shape[1] != second.shape[1]:
                raise ValueError(
                    f"topk_kd_loss: teacher (feats {_shape(first)}, class embeds {_shape(second)}) must be "
                    f"([B={B}, Et], [C={C}, Et])"
                )
            if first.dtype != second.dtype:
                raise TypeError(f"topk_kd_loss: teacher feats {first.dtype} and class embeds {second.dtype} differ")
            sums = _to_host(_sum(first), _sum(second)) if validate else [0.0, 0.0]
            for name, total in zip(("teacher_feats", "teacher_class_embeds"), sums, strict=True):
                if not math.isfinite(total):
                    raise ValueError(f"topk_kd_loss: {name} must be finite (NaN or inf would make teacher logits NaN)")
            form = FEATS
            fields["teacher_feats"], fields["teacher_embeds"] = first.detach(), second.detach()
    else:
        raise TypeError(
            "topk_kd_loss: teacher must be logits [B, C], a pair (teacher_feats [B, Et], teacher_class_embeds [C, Et]) "
            f"or a pair (indices [B, k] int, probs [B, k]); got {type(teacher).__name__}"
        )
    if form != TOPK and k is not None and k >= C:
        k = None  # the top-k of every class is the full distribution (same math, no selection needed)
    return Problem(
        student_feats=student_feats,
        class_embeds=class_embeds,
        form=form,
        **fields,
        k=k,
        temperature=T,
        logit_scale=scale,
        labels=labels,
        kd_weight=kd_w,
        ce_weight=ce_w,
        class_mask=class_mask,
        support="full" if form != TOPK and k is None else student_support,
    )


_TEACHER_FIELDS = (
    "teacher_logits",
    "teacher_feats",
    "teacher_embeds",
    "topk_indices",
    "topk_probs",
    "labels",
    "class_mask",
)


class TopKKDFunction(torch.autograd.Function):
    """Per-row loss ``[B]`` (fp32; fp64 for fp64 inputs) with gradients for ``student_feats`` and ``class_embeds``."""

    @staticmethod
    def forward(ctx, student_feats, class_embeds, p: Problem, impl):
        stats = impl.stream(p)
        ep = epilogue(p, stats, lambda idx: impl.gather(p, idx))
        others = [getattr(p, f) for f in _TEACHER_FIELDS]
        lse_u = stats.lse_u if p.need_student_lse else None
        ctx.save_for_backward(
            student_feats,
            class_embeds,
            *others,
            ep.slot_idx,
            ep.slot_coef,
            ep.a_u,
            ep.a_1,
            lse_u,
            stats.lse_1,
            ep.lse_w,
        )
        ctx.problem, ctx.impl = dataclasses.replace(p, **{f: None for f in _TEACHER_FIELDS}), impl
        return ep.rows

    @staticmethod
    def backward(ctx, grad_rows):
        need_dsf, need_dce = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dsf or need_dce):
            return None, None, None, None
        sf, ce, *rest = ctx.saved_tensors
        n = len(_TEACHER_FIELDS)
        p = dataclasses.replace(
            ctx.problem, student_feats=sf, class_embeds=ce, **dict(zip(_TEACHER_FIELDS, rest[:n], strict=True))
        )
        slot_idx, slot_coef, a_u, a_1, lse_u, lse_1, lse_w = rest[n:]
        g = grad_rows.to(p.acc_dtype)
        dsf = dce = None
        sparse = (slot_idx, g[:, None] * slot_coef) if slot_idx.shape[1] else None
        if lse_u is not None or lse_1 is not None:
            # The sparse coefficients ride along in the dense pass's ds (one set of matmuls for both parts).
            dsf, dce = ctx.impl.dense_backward(p, g * a_u, g * a_1, lse_u, lse_1, lse_w, need_dsf, need_dce, sparse)
        elif sparse is not None:
            dsf, dce = ctx.impl.sparse_backward(p, *sparse, dsf, dce, need_dsf, need_dce)
        dsf = dsf.to(sf.dtype) if need_dsf else None
        dce = dce.to(ce.dtype) if need_dce else None
        return dsf, dce, None, None


def topk_kd_loss(
    student_feats,
    class_embeds,
    teacher,
    *,
    k=100,
    temperature=1.0,
    logit_scale=1.0,
    labels=None,
    kd_weight=1.0,
    ce_weight=0.0,
    class_mask=None,
    student_support="full",
    reduction="mean",
    backend=None,
    validate=True,
) -> torch.Tensor:
    p = make_problem(
        student_feats,
        class_embeds,
        teacher,
        k,
        temperature,
        logit_scale,
        labels,
        kd_weight,
        ce_weight,
        class_mask,
        student_support,
        reduction,
        validate,
    )
    if p.batch == 0:
        # Keeps the graph connected so backward gives zero gradients of the right shapes.
        rows = (student_feats.to(p.acc_dtype) @ class_embeds.to(p.acc_dtype).T).sum(1) * 0.0
    else:
        # Only a logits/feats teacher's top-k is selected on the device (a precomputed one is just gathered).
        k_sel = p.k if p.form != TOPK else None
        name = _dispatch.select("kd", device=student_feats.device, dtype=student_feats.dtype, backend=backend, k=k_sel)
        rows = TopKKDFunction.apply(student_feats, class_embeds, p, _impl(name))
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
