"""The ``torch`` backend: the streaming algorithm in plain PyTorch, chunk by chunk over the classes (the CPU path).

Never holds more than ``[B, CHUNK]`` logits (fp32) at once: forward keeps per-row running statistics and a running
teacher top-k; backward recomputes each chunk's logits from the inputs. Extra memory O(B*k + B*CHUNK).
"fp32" below means ``Problem.acc_dtype``: fp64 for fp64 inputs (only this backend takes them), so gradcheck works.
"""

from __future__ import annotations

import torch

from rpp_kernels.ops.kd.common import FEATS, LOGITS, Problem, Stats, mm_f32, stable_topk

CHUNK = 4096  # classes per chunk: [B, 4096] fp32 is 16 MiB at B = 1024
GATHER_ELEMS = 1 << 22  # rows of [rows, J, E] gathered at once in the sparse parts (16 MiB fp32)

NEG_INF = float("-inf")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def student_chunk(p: Problem, c0: int, c1: int) -> torch.Tensor:
    """Student logits ``s[:, c0:c1]`` in fp32 (``mm_f32``: half inputs on CUDA stay on tensor cores), masked -inf."""
    s = mm_f32(p.student_feats, p.class_embeds[c0:c1].T) * p.logit_scale
    return _mask(p, s, c0, c1)


def teacher_chunk(p: Problem, c0: int, c1: int) -> torch.Tensor:
    """Teacher logits ``t[:, c0:c1]`` in fp32, masked classes -inf."""
    if p.form == LOGITS:
        t = p.teacher_logits[:, c0:c1].to(p.acc_dtype)
    else:
        t = mm_f32(p.teacher_feats, p.teacher_embeds[c0:c1].T) * p.logit_scale
    return _mask(p, t, c0, c1)


def _mask(p: Problem, x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    if p.class_mask is None:
        return x
    return x.masked_fill(~p.class_mask[c0:c1], NEG_INF)


class TorchReducer:
    """Per-chunk row reductions in plain PyTorch: log-sum-exp and the running top-k as (values, indices)."""

    @staticmethod
    def lse(lse: torch.Tensor, x: torch.Tensor, inv_t: float) -> torch.Tensor:
        return torch.logaddexp(lse, torch.logsumexp(x * inv_t, dim=1))

    @staticmethod
    def lse_pair(lse: torch.Tensor, lse_1: torch.Tensor, x: torch.Tensor, inv_t: float):
        """The log-sum-exps at ``inv_t`` and at 1 (the cuda reducer does both in one pass over ``x``)."""
        return TorchReducer.lse(lse, x, inv_t), TorchReducer.lse(lse_1, x, 1.0)

    @staticmethod
    def topk_init(batch: int, k: int, device: torch.device):
        return torch.empty(batch, 0, device=device), torch.empty(batch, 0, dtype=torch.long, device=device)

    @staticmethod
    def topk_update(state, t: torch.Tensor, c0: int, k: int):
        top_val, top_idx = state
        cols = torch.arange(c0, c0 + t.shape[1], device=t.device).expand(t.shape[0], -1)
        # Running entries come from lower class indices than this chunk, so the stable sort keeps the tie rule.
        return stable_topk(torch.cat([top_val, t], 1), torch.cat([top_idx, cols], 1), k)

    @staticmethod
    def topk_result(state, k: int):
        return state


def stream(p: Problem, reducer=TorchReducer) -> Stats:
    """One pass over the classes: running log-sum-exps, the running teacher top-k and, for the full teacher
    distribution, ``E_p[w - u]`` with the online-softmax rescaling. ``reducer`` does the per-chunk row reductions
    (the ``cuda`` backend passes its warp-level kernel)."""
    B, C, T = p.batch, p.num_classes, p.temperature
    dev = p.student_feats.device
    need_teacher = p.form in (LOGITS, FEATS)
    full = p.full_teacher
    need_s = p.need_student_lse or p.need_ce
    neg = torch.full((B,), NEG_INF, device=dev, dtype=p.acc_dtype)
    st = Stats()
    lse_u = neg.clone() if p.need_student_lse else None
    lse_1 = neg.clone() if p.need_ce else None
    if need_teacher and not full:
        top = reducer.topk_init(B, p.k, dev)
    if full:
        m_w, l_w, acc = neg.clone(), torch.zeros_like(neg), torch.zeros_like(neg)
    for c0, c1 in _chunks(C, CHUNK):
        s = student_chunk(p, c0, c1) if need_s else None
        if lse_u is not None and lse_1 is not None:
            lse_u, lse_1 = reducer.lse_pair(lse_u, lse_1, s, 1.0 / T)
        elif lse_u is not None:
            lse_u = reducer.lse(lse_u, s, 1.0 / T)
        elif lse_1 is not None:
            lse_1 = reducer.lse(lse_1, s, 1.0)
        if not need_teacher:
            continue
        t = teacher_chunk(p, c0, c1)
        if full:
            w = t / T
            m_new = torch.maximum(m_w, w.max(dim=1).values)
            # Rows whose classes so far are all -inf keep m = -inf; scale factors there are 0, not exp(nan).
            alpha = torch.where(torch.isfinite(m_new), torch.exp(m_w - m_new), torch.zeros_like(m_new))
            finite = torch.isfinite(w)
            e = torch.where(finite, torch.exp(w - m_new[:, None]), torch.zeros_like(w))
            diff = torch.where(finite, w - s / T, torch.zeros_like(w))
            l_w = l_w * alpha + e.sum(1)
            acc = acc * alpha + (e * diff).sum(1)
            m_w = m_new
        else:
            top = reducer.topk_update(top, t, c0, p.k)
    st.lse_u, st.lse_1 = lse_u, lse_1
    if need_teacher and not full:
        st.top_val, st.top_idx = reducer.topk_result(top, p.k)
    if full:
        has = l_w > 0
        st.lse_w = torch.where(has, m_w + torch.log(l_w), neg)
        st.ew_diff = torch.where(has, acc / l_w.clamp_min(torch.finfo(l_w.dtype).tiny), torch.zeros_like(acc))
    return st


def _row_blocks(p: Problem, width: int):
    rows = max(1, GATHER_ELEMS // max(1, width * p.student_feats.shape[1]))
    return _chunks(p.batch, rows)


def gather(p: Problem, idx: torch.Tensor) -> torch.Tensor:
    """Student logits ``s[b, idx[b, j]]`` (fp32) without forming ``[B, C]``: ``[B, J]``."""
    acc = p.acc_dtype
    out = torch.empty(idx.shape, device=idx.device, dtype=acc)
    for r0, r1 in _row_blocks(p, idx.shape[1]):
        rows = p.class_embeds[idx[r0:r1]].to(acc)  # [b, J, E]
        out[r0:r1] = torch.einsum("bje,be->bj", rows, p.student_feats[r0:r1].to(acc)) * p.logit_scale
    return out


def dense_backward(p, a_u, a_1, lse_u, lse_1, lse_w, need_dsf: bool, need_dce: bool, sparse=None):
    """``ds = a_u*(softmax(u) - softmax(w)) + a_1*softmax(s)`` chunk by chunk (recomputed), returning fp32
    ``(d student_feats, d class_embeds)`` contributions (already times ``logit_scale``). ``sparse = (idx [B, J],
    coef [B, J])`` is added into each chunk's ``ds`` (``ds[b, idx] += coef``) before the matmuls."""
    T = p.temperature
    sf = p.student_feats
    dsf = torch.zeros(sf.shape, device=sf.device, dtype=p.acc_dtype) if need_dsf else None
    dce = torch.empty(p.class_embeds.shape, device=sf.device, dtype=p.acc_dtype) if need_dce else None
    for c0, c1 in _chunks(p.num_classes, CHUNK):
        ce = p.class_embeds[c0:c1]
        s = student_chunk(p, c0, c1)
        ds = torch.zeros_like(s)
        if lse_u is not None:
            ds += a_u[:, None] * torch.exp(s / T - lse_u[:, None])
        if lse_1 is not None:
            ds += a_1[:, None] * torch.exp(s - lse_1[:, None])
        if lse_w is not None:
            ds -= a_u[:, None] * torch.exp(teacher_chunk(p, c0, c1) / T - lse_w[:, None])
        if sparse is not None:
            idx, coef = sparse
            inside = (idx >= c0) & (idx < c1)
            ds.scatter_add_(1, torch.where(inside, idx - c0, 0), torch.where(inside, coef.to(ds.dtype), 0.0))
        ds *= p.logit_scale
        if dsf is not None:
            dsf += mm_f32(ds, ce)
        if dce is not None:
            dce[c0:c1] = mm_f32(ds.T, sf)
    return dsf, dce


def sparse_backward(p, idx, coef, dsf, dce, need_dsf: bool, need_dce: bool):
    """Add ``ds[b, idx[b, j]] += coef[b, j]`` to the gradients without a dense ``ds``: returns ``(dsf, dce)`` fp32."""
    sf32 = p.student_feats.to(p.acc_dtype)
    if need_dsf and dsf is None:
        dsf = torch.zeros_like(sf32)
    if need_dce and dce is None:
        dce = torch.zeros(p.class_embeds.shape, device=sf32.device, dtype=sf32.dtype)
    coef = coef * p.logit_scale
    E = sf32.shape[1]
    for r0, r1 in _row_blocks(p, idx.shape[1]):
        c, i = coef[r0:r1], idx[r0:r1]
        if dsf is not None:
            dsf[r0:r1] += torch.einsum("bj,bje->be", c, p.class_embeds[i].to(sf32.dtype))
        if dce is not None:
            dce.index_add_(0, i.reshape(-1), (c[:, :, None] * sf32[r0:r1, None, :]).reshape(-1, E))
    return dsf, dce
