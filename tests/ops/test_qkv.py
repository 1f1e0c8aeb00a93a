"""prompt_qkv (cuBLAS + head-split views, copy-free backward) against plain autograd and the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from test_attention import assert_matches_gold
from torch.utils._python_dispatch import TorchDispatchMode

from rpp_kernels.attention import prompt_qkv
from rpp_kernels.ops.attention import packed_slots
from rpp_kernels.ops.attention.reference import prompt_qkv_ref

NAMES = ["q", "k", "v", "prefix_q", "prefix_k", "prefix_v"]


def make_inputs(batch, n, embed, n_prompt, dtype, bias=True, shared_prompt=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, embed, generator=gen)
    weight = torch.randn(3 * embed, embed, generator=gen) * embed**-0.5
    b = torch.randn(3 * embed, generator=gen) if bias else None
    prompts = [torch.randn(n_prompt, embed, generator=gen) for _ in range(1 if shared_prompt else 3)]
    return [None if t is None else t.to(dtype).requires_grad_() for t in [x, weight, b, *prompts]]


def flat_outputs(result):
    (q, k, v), prefix = result
    return [q, k, v, *(prefix or ())]


def run(fn, inputs, heads, grads_out, seed=1):
    outs = flat_outputs(fn(inputs[0], inputs[1], inputs[2], heads, *inputs[3:]))
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, grads_out[: len(outs)])
    return outs, grads


def plain_torch(x, weight, bias, heads, *prompts):
    """What prompt_qkv replaces: F.linear + view/permute/unbind under plain autograd, prompts projected alike."""
    batch, n, embed = x.shape
    y = torch.nn.functional.linear(x, weight, bias).view(batch, n, 3, heads, embed // heads)
    qkv = tuple(y.permute(2, 0, 3, 1, 4).unbind(0))
    if not prompts:
        return qkv, None
    prompts = prompts * 3 if len(prompts) == 1 else prompts
    biases = (None,) * 3 if bias is None else bias.chunk(3)
    prefix = tuple(
        torch.nn.functional.linear(p, w, b).unflatten(-1, (heads, -1)).transpose(0, 1)
        for p, w, b in zip(prompts, weight.chunk(3), biases, strict=True)
    )
    return qkv, prefix


@pytest.mark.parametrize(
    ("batch", "n", "embed", "heads", "n_prompt", "dtype", "bias"),
    [
        (3, 63, 128, 4, 20, torch.float32, True),  # D = 32
        (1, 197, 128, 2, 1, torch.float16, True),  # D = 64
        (3, 1, 144, 2, 20, torch.float16, False),  # D = 72
        (0, 5, 64, 2, 3, torch.float32, True),  # empty batch
    ],
)
def test_matches_reference(batch, n, embed, heads, n_prompt, dtype, bias):
    inputs = make_inputs(batch, n, embed, n_prompt, dtype, bias)
    gold_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    gen = torch.Generator().manual_seed(5)
    head_dim = embed // heads
    grads_out = [torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype) for _ in range(3)]
    grads_out += [torch.randn(heads, n_prompt, head_dim, generator=gen).to(dtype) for _ in range(3)]

    got = run(prompt_qkv, inputs, heads, grads_out)
    base = run(plain_torch, inputs, heads, grads_out)
    gold = run(prompt_qkv_ref, gold_inputs, heads, [g.double() for g in grads_out])
    for name, a, b, c in zip(NAMES, got[0], base[0], gold[0], strict=True):
        assert a.shape == c.shape and a.dtype == dtype, f"{name}: {list(a.shape)} {a.dtype}"
        assert_matches_gold(name, a, b, c, 2.0)
    grad_names = ["dx", "dweight"] + (["dbias"] if bias else []) + ["dprompt_q", "dprompt_k", "dprompt_v"]
    for name, a, b, c in zip(grad_names, got[1], base[1], gold[1], strict=True):
        assert_matches_gold(name, a, b, c, 3.0)


def test_frozen_weight_shared_prompt_and_seq_first_input():
    """Frozen weights get no gradient; one prompt tensor serves q, k and v; x may be a transposed [N, B, E] view."""
    x, weight, bias, prompt = make_inputs(2, 7, 64, 4, torch.float32, shared_prompt=True)
    weight.requires_grad_(False)
    x_seq_first = x.detach().transpose(0, 1).contiguous().requires_grad_()
    (q, k, v), prefix = prompt_qkv(x_seq_first.transpose(0, 1), weight, bias, 2, prompt)
    (q_ref, k_ref, v_ref), prefix_ref = prompt_qkv_ref(x.detach(), weight, bias, 2, prompt, prompt, prompt)
    for a, b in zip([q, k, v, *prefix], [q_ref, k_ref, v_ref, *prefix_ref], strict=True):
        torch.testing.assert_close(a, b)
    (q.sum() + k.square().sum() + v.sum() + prefix[1].sum()).backward()
    assert weight.grad is None
    assert x_seq_first.grad is not None and x_seq_first.grad.shape == (7, 2, 64)
    assert bias.grad is not None and prompt.grad is not None


def test_outputs_are_views_of_one_projection():
    """q, k, v are head-split views of one [B, N, 3, H, D] F.linear output: no permute or contiguous copy."""
    x, weight, bias, *_ = make_inputs(2, 5, 64, 3, torch.float32)
    (q, k, v), _ = prompt_qkv(x, weight, bias, 2)
    assert q.shape == (2, 2, 5, 32) and packed_slots(q, k, v)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


COPIES = {"aten.copy_", "aten.stack", "aten.cat", "aten.clone", "aten._to_copy", "aten.contiguous"}


@pytest.mark.parametrize("packed", [True, False])
def test_backward_uses_a_packed_gradient_in_place(packed):
    """Gradients that are slots of one packed buffer (what the attention backward writes) are the projection's
    output gradient as they are: the backward runs its GEMMs with no copy; others are copied once into their slot."""
    x, weight, bias, *_ = make_inputs(2, 5, 64, 3, torch.float32)
    (q, k, v), _ = prompt_qkv(x, weight, bias, 2)
    if packed:
        buf = torch.randn(2, 5, 3, 2, 32)
        grads = [buf[:, :, i].transpose(1, 2) for i in range(3)]
    else:
        grads = [torch.randn(2, 2, 5, 32) for _ in range(3)]
    with OpLog() as log:
        got = torch.autograd.grad((q, k, v), (x, weight, bias), grads)
    copies = [op for op in log.ops if op in COPIES]
    assert copies == ([] if packed else ["aten.copy_"] * 3), copies
    dy = torch.stack([g.transpose(1, 2) for g in grads], 2).reshape(10, 192)
    want = ((dy @ weight.detach()).view(2, 5, 64), dy.t() @ x.detach().reshape(10, 64), dy.sum(0))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_no_prompts_returns_none():
    x, weight, bias, *_ = make_inputs(2, 5, 64, 3, torch.float32)
    qkv, prefix = prompt_qkv(x, weight, bias, 4)
    assert prefix is None and qkv[0].shape == (2, 4, 5, 16)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"x": torch.randn(2, 5)}, r"\[B, N, E\].*\[2, 5\]"),
        ({"num_heads": 3}, r"embed dim 64.*\[2, 5, 64\].*num_heads=3"),
        ({"in_proj_weight": torch.randn(192, 32)}, r"\[192, 64\].*got \[192, 32\]"),
        ({"in_proj_bias": torch.randn(64)}, r"in_proj_bias must be \[192\], got \[64\]"),
        ({"prompt_k": torch.randn(4, 64)}, r"same P.*\[3, 64\], \[4, 64\], \[3, 64\]"),
        ({"prompt_v": torch.randn(3, 32)}, r"E = 64.*\[3, 32\]"),
        ({"in_proj_weight": torch.randn(192, 64).double()}, r"in_proj_weight \[192, 64\] has dtype torch.float64"),
        ({"prompt_q": torch.randn(3, 64, device="meta")}, r"prompt_q is on meta"),
    ],
)
def test_mismatched_inputs_raise_value_error(change, pattern):
    args = {
        "x": torch.randn(2, 5, 64),
        "in_proj_weight": torch.randn(192, 64),
        "in_proj_bias": torch.randn(192),
        "num_heads": 2,
        "prompt_q": torch.randn(3, 64),
        "prompt_k": torch.randn(3, 64),
        "prompt_v": torch.randn(3, 64),
    }
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        prompt_qkv(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_parity(dtype):
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(8, 197, 768, 20, dtype)]
    gold_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grads_out = [torch.randn(8, 12, 197, 64, device="cuda").to(dtype) for _ in range(3)]
    grads_out += [torch.randn(12, 20, 64, device="cuda").to(dtype) for _ in range(3)]
    got = run(prompt_qkv, inputs, 12, grads_out)
    base = run(plain_torch, inputs, 12, grads_out)
    gold = run(prompt_qkv_ref, gold_inputs, 12, [g.double() for g in grads_out])
    for i, (a, b, c) in enumerate(zip(got[0] + got[1], base[0] + base[1], gold[0] + gold[1], strict=True)):
        assert_matches_gold(str(i), a, b, c, 2.0 if i < 6 else 3.0)
