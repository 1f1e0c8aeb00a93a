"""prompt_attention: the Triton kernels (interpreter on CPU, forced) and the torch backend vs the explicit concat.

Tolerance (CONVENTIONS §4, FlashAttention's rule): the kernel's error against a float64 reference is at most 2x
(outputs) / 3x (gradients) the error of plain PyTorch (SDPA on the concatenation) in the same dtype, plus a small
per-dtype floor for the cases where PyTorch happens to be exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rpp_kernels import _dispatch
from rpp_kernels.attention import prompt_attention
from rpp_kernels.ops.attention.reference import prompt_attention_ref, prompt_attention_torch

needs_triton = pytest.mark.skipif(_dispatch.triton_import_error() is not None, reason="triton is not importable")
# The README's `pytest tests` runs every marker, so the long interpreter sweeps also need RPP_RUN_SLOW=1 to run.
slow = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RPP_RUN_SLOW", "0") in ("", "0"), reason="long sweep: set RPP_RUN_SLOW=1"),
]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_matches_gold(name: str, got: torch.Tensor, base: torch.Tensor, gold: torch.Tensor, factor: float) -> None:
    """|got - gold| <= factor * |base - gold| (worst elements) + floor * max(1, |gold|); report the worst element."""
    assert got.shape == gold.shape, f"{name}: shape {list(got.shape)} != reference {list(gold.shape)}"
    if gold.numel() == 0:
        return
    err = (got.double() - gold).abs()
    base_err = (base.double() - gold).abs().max().item()
    bound = factor * base_err + FLOOR[got.dtype] * max(1.0, gold.abs().max().item())
    worst = err.argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.max().item() <= bound, (
        f"{name}: max error {err.max().item():.3e} > {bound:.3e} ({factor}x PyTorch's {base_err:.3e} + floor) at "
        f"{list(idx)}: got {got[idx].item():.6f}, reference {gold[idx].item():.6f}"
    )


def make_inputs(batch, heads, n, n_prefix, head_dim, dtype, layout, seed=0, n_k=None):
    gen = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    shape = {"hpd": (heads, n_prefix, head_dim), "1hpd": (1, heads, n_prefix, head_dim)}.get(
        layout, (batch, heads, n_prefix, head_dim)
    )
    tensors = [
        torch.randn(batch, heads, n, head_dim, generator=gen),
        torch.randn(batch, heads, n_k, head_dim, generator=gen),
        torch.randn(batch, heads, n_k, head_dim, generator=gen),
        torch.randn(shape, generator=gen),
        torch.randn(shape, generator=gen),
    ]
    return [t.to(dtype).requires_grad_() for t in tensors]


def run_with_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    # A zero-length prefix may be left out of the graph (SDPA path): its gradient is an empty tensor either way.
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [out, *(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True))]


def check_parity(batch, heads, n, n_prefix, head_dim, causal, dtype, layout, n_k=None, softmax_scale=None):
    inputs = make_inputs(batch, heads, n, n_prefix, head_dim, dtype, layout, n_k=n_k)
    gold_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = torch.randn(batch, heads, n, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)

    def kernel(q, k, v, pk, pv):
        return prompt_attention(q, k, v, pk, pv, causal=causal, softmax_scale=softmax_scale, backend="triton")

    def torch_path(q, k, v, pk, pv):
        return prompt_attention_torch(q, k, v, pk, pv, causal, softmax_scale)

    def gold_fn(q, k, v, pk, pv):
        return prompt_attention_ref(q, k, v, pk, pv, causal, softmax_scale)

    got = run_with_grads(kernel, inputs, grad_out)
    base = run_with_grads(torch_path, inputs, grad_out)
    gold = run_with_grads(gold_fn, gold_inputs, grad_out.double())
    for i, name in enumerate(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]):
        assert got[i].dtype == dtype, f"{name}: dtype {got[i].dtype}"
        assert_matches_gold(name, got[i], base[i], gold[i], 2.0 if i == 0 else 3.0)


# B in {1, 3}, H in {1, 4}, N in {1, 63, 197}, P in {0, 1, 20}, D in {32, 64} (+ 80), causal, fp32/fp16 and the three
# prefix layouts, each value in several combinations; the full cross product is the slow sweep below.
CASES = [
    # B, H, N, P, D, causal, dtype, prefix layout
    (1, 1, 1, 0, 32, False, torch.float32, "hpd"),
    (3, 4, 63, 20, 64, True, torch.float16, "hpd"),
    (3, 1, 197, 1, 32, False, torch.float16, "1hpd"),
    (1, 4, 197, 20, 64, True, torch.float32, "bhpd"),
    (3, 4, 1, 20, 32, True, torch.float32, "hpd"),
    (1, 1, 63, 1, 64, False, torch.float32, "bhpd"),
    (3, 4, 197, 0, 64, False, torch.float16, "hpd"),
    (3, 2, 63, 20, 80, True, torch.float16, "1hpd"),
    (1, 4, 63, 0, 32, True, torch.float16, "hpd"),
    (3, 1, 1, 1, 64, False, torch.float16, "bhpd"),
    (3, 1, 197, 20, 32, True, torch.float32, "1hpd"),
    (3, 4, 63, 1, 64, False, torch.float32, "hpd"),
]


@needs_triton
@pytest.mark.parametrize(("batch", "heads", "n", "n_prefix", "head_dim", "causal", "dtype", "layout"), CASES)
def test_triton_matches_concat_reference(batch, heads, n, n_prefix, head_dim, causal, dtype, layout):
    check_parity(batch, heads, n, n_prefix, head_dim, causal, dtype, layout)


@needs_triton
def test_triton_keys_longer_than_queries_and_custom_scale():
    check_parity(2, 2, 17, 5, 32, False, torch.float32, "hpd", n_k=40, softmax_scale=0.3)


@needs_triton
@slow[0]
@slow[1]
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 80, 128])
@pytest.mark.parametrize("n_prefix", [1, 20])
@pytest.mark.parametrize("n", [1, 63, 217])
def test_triton_sweep(n, n_prefix, head_dim, causal, dtype):
    check_parity(3, 4, n, n_prefix, head_dim, causal, dtype, "hpd")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_matches_reference(causal):
    inputs = make_inputs(2, 3, 9, 4, 16, torch.float64, "hpd")
    got = run_with_grads(
        lambda *t: prompt_attention(*t, causal=causal, backend="torch"), inputs, torch.ones(2, 3, 9, 16).double()
    )
    gold = run_with_grads(lambda *t: prompt_attention_ref(*t, causal), inputs, torch.ones(2, 3, 9, 16).double())
    for a, b in zip(got, gold, strict=True):
        torch.testing.assert_close(a, b)


def test_causal_prefix_semantics_by_hand():
    """Causal: query 0 sees every prefix key and token 0 only, so changing token 1's key/value cannot affect it."""
    q, k, v, pk, pv = (t.detach() for t in make_inputs(1, 1, 4, 3, 32, torch.float32, "hpd"))
    out = prompt_attention(q, k, v, pk, pv, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 1:] += 5
    v2[:, :, 1:] -= 5
    out2 = prompt_attention(q, k2, v2, pk, pv, causal=True)
    torch.testing.assert_close(out[:, :, 0], out2[:, :, 0])
    assert not torch.allclose(out[:, :, 1:], out2[:, :, 1:])
    pv2 = pv.clone()
    pv2[:, -1] += 5  # the last prefix row is visible to query 0
    assert not torch.allclose(prompt_attention(q, k, v, pk, pv2, causal=True)[:, :, 0], out[:, :, 0])


@needs_triton
@pytest.mark.parametrize("layout", ["hpd", "1hpd", "bhpd"])
def test_prefix_grad_keeps_prefix_shape_and_is_deterministic(layout):
    inputs = make_inputs(3, 2, 20, 5, 32, torch.float32, layout)
    grad_out = torch.randn(3, 2, 20, 32)
    first = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, grad_out)
    second = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, grad_out)
    assert first[4].shape == inputs[3].shape and first[5].shape == inputs[4].shape
    assert torch.equal(first[4], second[4]) and torch.equal(first[5], second[5])


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    q, k, v, pk, pv = make_inputs(0, 2, 5, 3, 32, torch.float32, "hpd")
    out = prompt_attention(q, k, v, pk, pv, backend=backend)
    assert out.shape == (0, 2, 5, 32)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), torch.zeros_like(out))
    assert [tuple(g.shape) for g in grads] == [(0, 2, 5, 32)] * 3 + [(2, 3, 32)] * 2
    assert all(not g.any() for g in grads)


@needs_triton
def test_zero_length_prefix_and_no_prefix_agree():
    q, k, v, pk, pv = make_inputs(2, 2, 7, 0, 32, torch.float32, "1hpd")
    out = prompt_attention(q, k, v, pk, pv, backend="triton")
    grads = torch.autograd.grad(out, (pk, pv), torch.ones_like(out))
    assert grads[0].shape == (1, 2, 0, 32)
    torch.testing.assert_close(out, prompt_attention(q, k, v, backend="triton"))


@needs_triton
def test_double_backward_through_the_kernels_raises():
    # The Triton backward is not differentiable: a gradient penalty must fail loudly, not silently drop its term.
    q, k, v, pk, pv = make_inputs(1, 1, 4, 2, 32, torch.float32, "hpd")
    out = prompt_attention(q, k, v, pk, pv, backend="triton")
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\)"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


def _errors(**overrides):
    args = dict(
        q=torch.randn(2, 4, 8, 32),
        k=torch.randn(2, 4, 8, 32),
        v=torch.randn(2, 4, 8, 32),
        prefix_k=torch.randn(4, 3, 32),
        prefix_v=torch.randn(4, 3, 32),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"prefix_k": torch.randn(2, 3, 32), "prefix_v": torch.randn(2, 3, 32)}, r"H=4.*\[2, 3, 32\]"),
        ({"prefix_k": torch.randn(4, 3, 16), "prefix_v": torch.randn(4, 3, 16)}, r"D=32.*\[4, 3, 16\]"),
        ({"prefix_k": torch.randn(5, 4, 3, 32), "prefix_v": torch.randn(5, 4, 3, 32)}, r"B=2.*\[5, 4, 3, 32\]"),
        ({"k": torch.randn(2, 3, 8, 32)}, r"heads differ.*\[2, 3, 8, 32\]"),
        ({"v": torch.randn(2, 4, 8, 64)}, r"head dims differ.*\[2, 4, 8, 64\]"),
        ({"prefix_v": torch.randn(4, 2, 32)}, r"prefix_k \[4, 3, 32\] and prefix_v \[4, 2, 32\]"),
        ({"prefix_k": torch.randn(4, 3, 32).half()}, r"prefix_k \[4, 3, 32\] has dtype torch.float16"),
        ({"v": torch.randn(2, 4, 8, 32, device="meta")}, r"v \[2, 4, 8, 32\] is on meta"),
        ({"prefix_v": None}, r"both prefix_k and prefix_v"),
    ],
)
def test_mismatched_inputs_raise_value_error_naming_shapes(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        prompt_attention(**_errors(**overrides))


def test_causal_needs_square_scores():
    with pytest.raises(ValueError, match=r"causal=True needs len\(q\) == len\(k\)"):
        prompt_attention(**_errors(k=torch.randn(2, 4, 9, 32), v=torch.randn(2, 4, 9, 32)), causal=True)


def test_dispatch_reasons():
    # Automatic choice on CPU skips the interpreter (a test path) and runs torch.
    args = _errors()
    torch.testing.assert_close(prompt_attention(**args), prompt_attention(**args, backend="torch"))
    small = [torch.randn(2, 4, 8, 16) for _ in range(3)]
    with pytest.raises(NotImplementedError, match=r"'triton'.*head dim 16 outside \[32, 128\]"):
        prompt_attention(*small, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        prompt_attention(**args, backend="cuda")


def test_importing_the_package_does_not_import_triton():
    code = "import sys, rpp_kernels, rpp_kernels.attention; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("batch", "heads", "n", "n_prefix"), [(4, 12, 197, 20), (64, 8, 16, 17), (2, 4, 1, 0)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_bf16_parity(batch, heads, n, n_prefix, head_dim, causal):
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(batch, heads, n, n_prefix, head_dim,
                                                                       torch.bfloat16, "hpd")]  # fmt: skip
    gold_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = torch.randn(batch, heads, n, head_dim, device="cuda").bfloat16()
    got = run_with_grads(lambda *t: prompt_attention(*t, causal=causal, backend="triton"), inputs, grad_out)
    base = run_with_grads(lambda *t: prompt_attention_torch(*t, causal), inputs, grad_out)
    gold = run_with_grads(lambda *t: prompt_attention_ref(*t, causal), gold_inputs, grad_out.double())
    for i, name in enumerate(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]):
        assert_matches_gold(name, got[i], base[i], gold[i], 2.0 if i == 0 else 3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_parity_other_dtypes(dtype):
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(3, 4, 197, 20, 64, dtype, "1hpd")]
    gold_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = torch.randn(3, 4, 197, 64, device="cuda").to(dtype)
    got = run_with_grads(lambda *t: prompt_attention(*t, causal=True, backend="triton"), inputs, grad_out)
    base = run_with_grads(lambda *t: prompt_attention_torch(*t, True), inputs, grad_out)
    gold = run_with_grads(lambda *t: prompt_attention_ref(*t, True), gold_inputs, grad_out.double())
    for i in range(6):
        assert_matches_gold(str(i), got[i], base[i], gold[i], 2.0 if i == 0 else 3.0)
