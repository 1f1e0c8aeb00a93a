"""The cuda KD backend's dispatch and build without a GPU: the compute-capability check (a GPU the extension has no
kernel image for falls back with a reason), setup.py's PTX for forward compatibility, tensor-core matmuls for half
inputs, and a hot path without host syncs when validation is off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_kd_helpers import Case, make_inputs

from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.ops.kd import common
from rpp_kernels.ops.kd.cuda import LEGACY_ARCHS, arch_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "cc, archs, runs",
    [
        ((8, 0), "sm_80;sm_90;compute_90", True),
        ((8, 6), "sm_80;sm_90;compute_90", True),  # sm_80 SASS runs on 8.x
        ((9, 0), "sm_80;sm_90;compute_90", True),
        ((10, 0), "sm_80;sm_90;compute_90", True),  # PTX JIT-compiled for Blackwell
        ((12, 0), "sm_80;sm_90;compute_90", True),
        ((7, 5), "sm_80;sm_90;compute_90", False),  # older than every target
        ((10, 0), LEGACY_ARCHS, False),  # SASS only: "no kernel image" on a newer GPU
        ((8, 0), "sm_90;compute_90", False),
    ],
)
def test_arch_reason(cc, archs, runs):
    why = arch_reason(cc, archs)
    assert (why is None) == runs
    if not runs:
        assert f"compute capability {cc[0]}.{cc[1]}" in why and f"RPP_CUDA_ARCHS={cc[0]}{cc[1]}" in why


def _setup_module():
    spec = importlib.util.spec_from_file_location("rpp_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def test_setup_embeds_ptx_of_the_highest_arch():
    archs, flags = _setup_module().cuda_targets("90, 80")
    assert archs == [80, 90]
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]
    # What the extension reports from these flags is what the dispatch check reads.
    assert arch_reason((10, 0), "sm_80;sm_90;compute_90") is None
    with pytest.raises(SystemExit, match="RPP_CUDA_ARCHS must list"):
        _setup_module().cuda_targets("sm90")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mm_f32_keeps_half_operands_on_tensor_cores(dtype):
    a, b = torch.randn(64, 96, device="cuda", dtype=dtype), torch.randn(96, 80, device="cuda", dtype=dtype)
    got = common.mm_f32(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, a.float() @ b.float(), rtol=1e-3, atol=1e-3)


class _NoHostSync:
    """Every way a tensor's value reaches the host raises inside this context."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(name):
            def fn(self, *args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name}")

            return fn

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize(
    "case",
    [
        Case(7, 50, 5, form="logits", labels=True, mask=True),
        Case(7, 50, None, T=2.0, form="feats", labels=True),
        Case(7, 50, 3, form="topk", mask=True),
    ],
    ids=str,
)
def test_no_host_sync_when_validation_is_off(case):
    """``validate=False``: forward and backward never read a tensor value on the host (on CUDA: no stream sync).
    The validated call does (its checks), which shows the detector works."""
    sf, ce, teacher, kw = make_inputs(case)
    want = topk_kd_loss(sf, ce, teacher, backend="torch", **kw)
    with _NoHostSync():
        loss = topk_kd_loss(sf, ce, teacher, backend="torch", validate=False, **kw)
        grads = torch.autograd.grad(loss, [sf, ce])
        with pytest.raises(AssertionError, match="host sync"):
            topk_kd_loss(sf, ce, teacher, backend="torch", **kw)
    torch.testing.assert_close(loss, want)
    assert all(torch.isfinite(g).all() for g in grads)
