"""The CPU instance of the CUDA top-k/softmax-statistics logic (csrc/kd_topk.h through rpp_kernels._C), against
torch: the same per-row code the warp-level kernel runs, tested without a GPU. The GPU instance is checked too when
there is one."""

from __future__ import annotations

import pytest
import torch

from rpp_kernels import _dispatch

if _dispatch.cuda_extension_error() is not None:
    pytest.skip(_dispatch.cuda_extension_error(), allow_module_level=True)

from rpp_kernels.ops.kd import cuda as kd_cuda  # noqa: E402
from rpp_kernels.ops.kd.common import KEY_EMPTY, stable_topk, unpack_keys  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if _dispatch.cuda_extension_has_gpu_kernels() and torch.cuda.is_available() else [])


def _run_chunks(x, k, inv_t, mask, chunk, with_lse_1=False):
    B, C = x.shape
    lse = torch.full((B,), float("-inf"), device=x.device)
    lse_1 = torch.full((B,), float("-inf"), device=x.device) if with_lse_1 else torch.empty(0, device=x.device)
    keys = torch.full((B, k), KEY_EMPTY, dtype=torch.long, device=x.device)
    for c0 in range(0, C, chunk):
        kd_cuda.kd_topk_stats(x[:, c0 : c0 + chunk], c0, inv_t, mask, lse, lse_1, keys)
    return (lse, lse_1, keys) if with_lse_1 else (lse, keys)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, k, chunk", [(1, 1, 1, 1), (7, 10, 5, 3), (64, 1000, 100, 256), (3, 21841, 100, 4096)])
@pytest.mark.parametrize("ties, masked", [(False, False), (True, True)])
def test_topk_and_lse_match_torch(device, dtype, B, C, k, chunk, ties, masked):
    g = torch.Generator().manual_seed(B * C + k)
    x = torch.randint(0, 4, (B, C), generator=g).float() if ties else 3 * torch.randn(B, C, generator=g)
    x = x.to(dtype).to(device)
    mask = None
    if masked:
        mask = (torch.rand(C, generator=g) > 0.3).to(device)
        mask[0] = True
    lse, lse_1, keys = _run_chunks(x, k, 0.5, mask, chunk, with_lse_1=True)
    ref_x = x.float() if mask is None else x.float().masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(ref_x * 0.5, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_1, torch.logsumexp(ref_x, 1), rtol=1e-5, atol=1e-5)
    kk = min(k, C)
    cols = torch.arange(C, device=device).expand(B, -1)
    want_val, want_idx = stable_topk(ref_x, cols, kk)
    got_val, got_idx = unpack_keys(keys, kk)
    finite = torch.isfinite(want_val)
    assert torch.equal(got_val, want_val.masked_fill(~finite, float("-inf")))
    assert torch.equal(got_idx[finite], want_idx[finite])  # empty slots (masked classes) carry no index


def test_signed_zero_and_extension_flags():
    x = torch.tensor([[0.0, -0.0, 0.0, -1.0]])
    lse, keys = _run_chunks(x, 3, 1.0, None, 4)
    assert unpack_keys(keys, 3)[1].tolist() == [[0, 1, 2]]
    from rpp_kernels import _C

    assert _C.KD_MAX_K == kd_cuda.MAX_K
    assert isinstance(_C.WITH_CUDA, bool)
    if _C.WITH_CUDA:
        # setup.py's default targets: SASS for sm_80 and sm_90 plus PTX, so a newer GPU JIT-compiles instead of failing.
        assert _C.CUDA_ARCHS.split(";")[-1].startswith("compute_"), _C.CUDA_ARCHS
        assert kd_cuda.built_archs() == _C.CUDA_ARCHS and kd_cuda.arch_reason((10, 0), _C.CUDA_ARCHS) is None
    else:
        assert _C.CUDA_ARCHS == ""


def test_readable_errors():
    lse = torch.zeros(2)
    with pytest.raises(RuntimeError, match="keys must be a contiguous int64"):
        kd_cuda.kd_topk_stats(torch.randn(2, 5), 0, 1.0, None, lse, lse, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="exceeds the maximum"):
        kd_cuda.kd_topk_stats(torch.randn(2, 5), 0, 1.0, None, lse, lse, torch.zeros(2, 300, dtype=torch.long))
    with pytest.raises(RuntimeError, match="mask has 3 classes"):
        kd_cuda.kd_topk_stats(
            torch.randn(2, 5), 0, 1.0, torch.ones(3, dtype=torch.bool), lse, lse, torch.zeros(2, 1, dtype=torch.long)
        )


@pytest.mark.gpu
def test_cuda_backend_matches_reference():
    from test_kd_helpers import Case, check_against_reference

    if not _dispatch.cuda_extension_has_gpu_kernels():
        pytest.skip("rpp_kernels._C built without nvcc")
    for case in (
        Case(64, 21841, 100, T=2.0, form="feats", labels=True, mask=True, E=512, Et=768),
        Case(7, 1000, 5, form="logits", support="topk", ties=True),
    ):
        check_against_reference(case, "cuda", dtype=torch.float32, device="cuda")


def test_extension_reducer_matches_torch_reducer():
    """The cuda backend's stream (chunked.stream with the extension's reductions; both student log-sum-exps in one
    pass) gives the torch backend's statistics; run here on the extension's CPU instance."""
    from test_kd_helpers import Case, make_inputs

    from rpp_kernels.ops.kd import chunked, make_problem

    sf, ce, t, kw = make_inputs(Case(7, 300, 5, T=2.0, form="logits", labels=True, mask=True, ties=True))
    p = make_problem(sf, ce, t, kw["k"], kw["temperature"], kw["logit_scale"], kw["labels"], kw["kd_weight"],
                     kw["ce_weight"], kw["class_mask"], "full", "mean")  # fmt: skip
    got, want = chunked.stream(p, reducer=kd_cuda.ExtensionReducer), chunked.stream(p)
    for name in ("lse_u", "lse_1", "top_val"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.top_idx, want.top_idx)
