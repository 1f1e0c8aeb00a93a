"""The ``cuda`` backend: the chunked algorithm with its per-row reductions (log-sum-exp, running top-k) done by the
warp-level kernel of ``csrc/kd_topk.cu``; the logits come from cuBLAS chunk by chunk (fp16/bf16 operands on tensor
cores with fp32 accumulation, ``common.mm_f32``), backward is the chunked one. No host sync on the way (pass
``validate=False`` to skip the value checks, which need one).

``rpp::kd_topk_stats`` is registered with ``torch.library.custom_op`` (and a fake) so ``torch.compile`` traces around
it. The extension's CPU instance runs the same per-row code (``csrc/kd_topk.h``) on CPU tensors; the tests use it.
"""

from __future__ import annotations

import torch

from rpp_kernels.ops.kd import chunked
from rpp_kernels.ops.kd.common import KEY_EMPTY, Problem, Stats, unpack_keys

MAX_K = 256  # csrc/kd_topk.h kMaxK: the per-row top-k buffer (shared memory, one per warp)
# What an extension built before the list was recorded holds (setup.py's default then: SASS only, no PTX).
LEGACY_ARCHS = "sm_80;sm_90"


def built_archs() -> str:
    """``rpp_kernels._C.CUDA_ARCHS``: the SASS and PTX targets the extension's CUDA code was compiled for."""
    from rpp_kernels import _C

    return getattr(_C, "CUDA_ARCHS", LEGACY_ARCHS)


def arch_reason(capability: tuple[int, int], archs: str) -> str | None:
    """Why kernels built for ``archs`` (``"sm_80;sm_90;compute_90"``) cannot run on a GPU of ``capability``, or None.

    SASS ``sm_XY`` runs on compute capability X.Z for Z >= Y (same major); PTX ``compute_XY`` is JIT-compiled by the
    driver for any capability >= X.Y. Checked before dispatch so a newer GPU falls back to another backend with this
    reason instead of failing with "no kernel image is available"."""
    major, minor = capability
    device = major * 10 + minor
    codes = [c for c in archs.split(";") if c]
    for code in codes:
        kind, _, num = code.partition("_")
        arch = int(num)
        if (kind == "sm" and arch // 10 == major and arch <= device) or (kind == "compute" and arch <= device):
            return None
    return (
        f"compute capability {major}.{minor} has no kernel image in rpp_kernels._C (built for {', '.join(codes)}); "
        f"rebuild with RPP_CUDA_ARCHS={major}{minor}"
    )


@torch.library.custom_op("rpp::kd_topk_stats", mutates_args=("row_lse", "row_lse_1", "keys"))
def kd_topk_stats(
    x: torch.Tensor,
    col0: int,
    inv_t: float,
    mask: torch.Tensor | None,
    row_lse: torch.Tensor,
    row_lse_1: torch.Tensor,
    keys: torch.Tensor,
) -> None:
    """Fold the chunk ``x [B, n]`` (classes ``col0 ..``) into ``row_lse [B]`` (log-sum-exp of ``x * inv_t`` over
    unmasked classes), ``row_lse_1 [B]`` (the same of ``x``, in the same pass; pass empty tensors to skip either) and
    ``keys [B, k]`` (running top-k as packed keys, sorted descending, ``KEY_EMPTY`` when unfilled; ``k = 0`` to skip),
    in place."""
    from rpp_kernels import _C

    _C.kd_topk_stats(x, col0, inv_t, mask, row_lse, row_lse_1, keys)


@kd_topk_stats.register_fake
def _(x, col0, inv_t, mask, row_lse, row_lse_1, keys) -> None:
    return None


def _none(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, device=x.device)


class ExtensionReducer:
    """``chunked.stream``'s per-chunk reductions through ``rpp::kd_topk_stats`` (state: lse [B], keys [B, k])."""

    @staticmethod
    def lse(lse: torch.Tensor, x: torch.Tensor, inv_t: float) -> torch.Tensor:
        lse = lse.contiguous()
        keys = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
        kd_topk_stats(x.contiguous(), 0, inv_t, None, lse, _none(x), keys)
        return lse

    @staticmethod
    def lse_pair(lse: torch.Tensor, lse_1: torch.Tensor, x: torch.Tensor, inv_t: float):
        """Both student log-sum-exps (at T and at 1) in one pass over the chunk."""
        lse, lse_1 = lse.contiguous(), lse_1.contiguous()
        keys = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
        kd_topk_stats(x.contiguous(), 0, inv_t, None, lse, lse_1, keys)
        return lse, lse_1

    @staticmethod
    def topk_init(batch: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch, k), KEY_EMPTY, dtype=torch.long, device=device)

    @staticmethod
    def topk_update(keys: torch.Tensor, t: torch.Tensor, c0: int, k: int) -> torch.Tensor:
        kd_topk_stats(t.contiguous(), c0, 1.0, None, _none(t), _none(t), keys)
        return keys

    @staticmethod
    def topk_result(keys: torch.Tensor, k: int):
        return unpack_keys(keys, k)


def stream(p: Problem) -> Stats:
    return chunked.stream(p, reducer=ExtensionReducer)
