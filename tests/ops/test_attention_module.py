"""PromptAttention: a drop-in nn.MultiheadAttention whose prompts equal MHA on the explicit concatenation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rpp_kernels import _dispatch
from rpp_kernels.attention import PromptAttention

EMBED, HEADS = 64, 2


def make_mha(batch_first=True, bias=True, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(EMBED, HEADS, bias=bias, batch_first=batch_first)
    if bias:
        with torch.no_grad():  # MHA initialises biases to 0, which would hide bias bugs
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def causal_float_mask(n):
    """open_clip's text-tower mask: -inf above the diagonal, 0 on and below."""
    return torch.full((n, n), float("-inf")).triu(1)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "triton" and _dispatch.triton_import_error():
        pytest.skip(_dispatch.triton_import_error())
    monkeypatch.setenv("RPP_KERNELS_BACKEND", request.param)
    return request.param


def grads_of(out, tensors, grad):
    # Token rows do not depend on prompt_q: the module leaves it out of the graph (None), the concat gives zeros.
    grads = torch.autograd.grad(out, tensors, grad, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]


def assert_all_close(got, want, names, atol=2e-5, rtol=1e-4):
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_no_prompts_matches_mha(backend, batch_first, bias):
    mha = make_mha(batch_first, bias)
    module = PromptAttention.from_mha(mha)
    x = torch.randn(3, 11, EMBED) if batch_first else torch.randn(11, 3, EMBED)
    x.requires_grad_()
    ref = mha(x, x, x, need_weights=False)[0]
    out, weights = module(x, x, x)
    assert weights is None and out.shape == ref.shape
    grad = torch.randn_like(ref)
    params = [module.in_proj_weight, module.out_proj.weight] + ([module.in_proj_bias] if bias else [])
    ref_params = [mha.in_proj_weight, mha.out_proj.weight] + ([mha.in_proj_bias] if bias else [])
    assert_all_close(
        [out, *grads_of(out, [x, *params], grad)],
        [ref, *grads_of(ref, [x, *ref_params], grad)],
        ["out", "dx", "d_in_proj_weight", "d_out_proj_weight", "d_in_proj_bias"][: 4 + bias],
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_prompts_match_mha_on_concatenation(backend, causal, shared):
    """Token rows (and, when asked, prompt rows first) equal MHA on cat(prompt rows, x), causal mask included."""
    batch, n, n_prompt = 3, 9, 4
    mha = make_mha()
    module = PromptAttention.from_mha(mha)
    x = torch.randn(batch, n, EMBED, requires_grad=True)
    prompts = [torch.randn(n_prompt, EMBED, requires_grad=True) for _ in range(1 if shared else 3)]
    rows = prompts * 3 if shared else prompts
    cat_q, cat_k, cat_v = (torch.cat([p.expand(batch, -1, -1), x], 1) for p in rows)
    mask = causal_float_mask(n_prompt + n) if causal else None
    ref = mha(cat_q, cat_k, cat_v, attn_mask=mask, need_weights=False)[0]
    token_mask = causal_float_mask(n) if causal else None  # the module also accepts the tokens' own causal mask
    kwargs = (
        {"prompt_q": prompts[0]} if shared else dict(zip(["prompt_q", "prompt_k", "prompt_v"], prompts, strict=True))
    )
    tokens = module(x, x, x, attn_mask=token_mask, **kwargs)[0]
    full = module(x, x, x, attn_mask=token_mask, return_prompt_outputs=True, **kwargs)[0]
    assert tokens.shape == (batch, n, EMBED) and full.shape == (batch, n_prompt + n, EMBED)
    torch.testing.assert_close(tokens, ref[:, n_prompt:], atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(ref)
    leaves = [x, *prompts, module.in_proj_weight, module.in_proj_bias, module.out_proj.weight]
    ref_leaves = [x, *prompts, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight]
    names = ["out", "dx"] + [f"dprompt{i}" for i in range(len(prompts))] + ["dW_in", "db_in", "dW_out"]
    assert_all_close([full, *grads_of(full, leaves, grad)], [ref, *grads_of(ref, ref_leaves, grad)], names)
    # Token rows alone: gradients reach the prompts through the prefix keys/values.
    token_grads = grads_of(tokens, [x, *prompts], grad[:, n_prompt:])
    ref_grads = grads_of(ref[:, n_prompt:], [x, *prompts], grad[:, n_prompt:])
    assert_all_close(token_grads, ref_grads, ["dx"] + [f"dprompt{i}" for i in range(len(prompts))])


def test_causal_masks_take_the_fast_path(monkeypatch):
    module = PromptAttention.from_mha(make_mha())
    monkeypatch.setattr(module, "_torch_forward", lambda *a, **k: pytest.fail("took the torch path"))
    x, prompt = torch.randn(2, 6, EMBED), torch.randn(3, EMBED)
    outs = [
        module(x, x, x, attn_mask=causal_float_mask(6))[0],
        module(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))[0],
        module(x, x, x, is_causal=True)[0],
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    module(x, x, x, attn_mask=causal_float_mask(9), prompt_q=prompt)


def test_state_dicts_load_both_ways():
    mha = make_mha()
    module = PromptAttention(EMBED, HEADS, batch_first=True)
    module.load_state_dict(mha.state_dict())
    assert module.state_dict().keys() == mha.state_dict().keys()
    other = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    other.load_state_dict(module.state_dict())
    x = torch.randn(2, 5, EMBED)
    torch.testing.assert_close(other(x, x, x)[0], mha(x, x, x)[0])
    assert isinstance(module.out_proj, nn.Linear)


def test_key_padding_mask_and_arbitrary_mask_match_mha():
    mha = make_mha()
    module = PromptAttention.from_mha(mha)
    x = torch.randn(2, 7, EMBED)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    torch.testing.assert_close(module(x, x, x, key_padding_mask=padding)[0], mha(x, x, x, key_padding_mask=padding)[0])
    mask = torch.randn(7, 7)
    torch.testing.assert_close(module(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])
    # With prompts, the padding mask covers the tokens; prompt rows are never padding.
    prompt = torch.randn(3, EMBED)
    cat = torch.cat([prompt.expand(2, -1, -1), x], 1)
    ref = mha(cat, cat, cat, key_padding_mask=torch.cat([torch.zeros(2, 3, dtype=torch.bool), padding], 1))[0]
    torch.testing.assert_close(module(x, x, x, key_padding_mask=padding, prompt_q=prompt)[0], ref[:, 3:])


def test_need_weights_returns_mha_weights():
    mha = make_mha()
    module = PromptAttention.from_mha(mha)
    x = torch.randn(2, 5, EMBED)
    for average in (True, False):
        out, weights = module(x, x, x, need_weights=True, average_attn_weights=average)
        ref, ref_weights = mha(x, x, x, need_weights=True, average_attn_weights=average)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(weights, ref_weights)


def test_dropout_in_training_runs_the_torch_path():
    mha = make_mha()
    mha.dropout = 0.5
    module = PromptAttention.from_mha(mha).train()
    x = torch.randn(2, 5, EMBED, requires_grad=True)
    torch.manual_seed(3)
    out = module(x, x, x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(out, mha.train()(x, x, x, need_weights=False)[0])
    out.sum().backward()
    module.eval()
    torch.testing.assert_close(module(x, x, x)[0], mha.eval()(x, x, x)[0])


def test_autocast_gives_one_dtype(backend):
    module = PromptAttention.from_mha(make_mha())
    x, prompt = torch.randn(2, 5, EMBED), torch.randn(3, EMBED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "triton":  # bf16 tl.dot is wrong in the interpreter: check the dtypes only
            from rpp_kernels.attention import prompt_qkv

            (q, _, _), prefix = prompt_qkv(x, module.in_proj_weight, module.in_proj_bias, HEADS, prompt)
            assert q.dtype == prefix[1].dtype == torch.bfloat16
        else:
            ref = make_mha()(x, x, x)[0]
            out = module(x, x, x, prompt_q=prompt)[0]
            assert out.dtype == torch.bfloat16 and module(x, x, x)[0].dtype == ref.dtype


def test_unbatched_input():
    mha = make_mha(batch_first=False)
    module = PromptAttention.from_mha(mha)
    x = torch.randn(5, EMBED)
    torch.testing.assert_close(module(x, x, x)[0], mha(x, x, x)[0])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"add_zero_attn": True}, "add_zero_attn"),
        ({"kdim": 32}, "kdim/vdim"),
        ({"num_heads": 3}, "divisible"),
    ],
)
def test_constructor_rejects_unsupported_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PromptAttention(**{"embed_dim": EMBED, "num_heads": HEADS, **kwargs})


def test_rejects_cross_attention_and_mismatched_prompt_masks():
    module = PromptAttention(EMBED, HEADS, batch_first=True)
    x, y = torch.randn(2, 5, EMBED), torch.randn(2, 5, EMBED)
    with pytest.raises(ValueError, match="self-attention only"):
        module(x, y, y)
    module(x, x.clone(), x.clone())  # equal tensors are fine
    # ... unless they need their own gradients: only query is read, so key/value would silently get none.
    q, k, v = (x.clone().requires_grad_() for _ in range(3))
    with pytest.raises(ValueError, match="their gradients would go to query"):
        module(q, k, v)
    module(q, q, q)
    with pytest.raises(ValueError, match=r"concatenated sequence \(\[8, 8\]"):
        module(x, x, x, attn_mask=torch.randn(5, 5), prompt_q=torch.randn(3, EMBED))


def test_causal_mask_check_is_not_reused_for_a_view_or_inference_tensor():
    mha = make_mha()
    module = PromptAttention.from_mha(mha)
    x = torch.randn(2, 6, EMBED)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    # causal.t() shares causal's data pointer, version, shape and dtype but masks the other triangle.
    for mask in (causal, causal.t()):
        torch.testing.assert_close(module(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])
    with torch.inference_mode():  # inference tensors have no version counter
        mask = causal_float_mask(6)
        torch.testing.assert_close(module(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])


def test_rejects_prompt_k_or_v_without_prompt_q():
    module = PromptAttention(EMBED, HEADS, batch_first=True)
    x, prompt = torch.randn(2, 5, EMBED), torch.randn(3, EMBED)
    for name in ("prompt_k", "prompt_v"):
        with pytest.raises(ValueError, match=f"{name} without prompt_q"):
            module(x, x, x, **{name: prompt})


def test_key_padding_mask_over_the_concatenation_is_refused_clearly():
    module = PromptAttention(EMBED, HEADS, batch_first=True)
    x, prompt = torch.randn(2, 5, EMBED), torch.randn(3, EMBED)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, N\] = \[2, 5\].*got \[2, 8\]"):
        module(x, x, x, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool), prompt_q=prompt)


@pytest.mark.gpu
def test_gpu_bf16_module_parity():
    mha = make_mha().cuda().bfloat16()
    module = PromptAttention.from_mha(mha)
    x = torch.randn(8, 197, EMBED, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(20, EMBED, device="cuda", dtype=torch.bfloat16)
    cat = torch.cat([prompt.expand(8, -1, -1), x], 1)
    ref = mha.float()(cat.float(), cat.float(), cat.float(), need_weights=False)[0][:, 20:]
    out = module(x, x, x, prompt_q=prompt)[0]
    assert (out.float() - ref).abs().max().item() < 3e-2


def test_from_mha_shares_parameters_by_default():
    mha = make_mha(batch_first=False).requires_grad_(False)
    module = PromptAttention.from_mha(mha)
    assert module.in_proj_weight is mha.in_proj_weight and module.in_proj_bias is mha.in_proj_bias
    assert module.out_proj is mha.out_proj
    assert not any(p.requires_grad for p in module.parameters())  # a frozen backbone stays frozen
    x = torch.randn(7, 2, EMBED, requires_grad=True)
    module(x, x, x)[0].sum().backward()
    assert mha.in_proj_weight.grad is None  # no weight gradient computed or stored
    with torch.no_grad():
        mha.in_proj_weight.mul_(2)  # the optimiser updates the original: the wrapper sees it
    torch.testing.assert_close(module(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=2e-5, rtol=1e-4)


def test_from_mha_copy_keeps_requires_grad():
    mha = make_mha()
    mha.in_proj_weight.requires_grad_(False)
    for module in (PromptAttention.from_mha(mha, copy=True), PromptAttention.from_mha(mha, share_parameters=False)):
        assert module.in_proj_weight is not mha.in_proj_weight and module.out_proj is not mha.out_proj
        assert torch.equal(module.in_proj_weight, mha.in_proj_weight)
        assert not module.in_proj_weight.requires_grad and module.in_proj_bias.requires_grad


def _copies(fn) -> int:
    """Number of aten copy/clone/contiguous kernels run by fn (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("copy_", "clone", "_to_copy", "contiguous"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_sequence_first_input_is_read_in_place(monkeypatch):
    """[N, B, E] (OpenAI CLIP's layout) costs no more copies than [B, N, E], and gives the same result."""
    monkeypatch.setenv("RPP_KERNELS_BACKEND", "torch")
    seq_first, batch_first = make_mha(batch_first=False), make_mha(batch_first=True)
    prompts = torch.randn(3, EMBED)
    x = torch.randn(2, 9, EMBED)
    mods = PromptAttention.from_mha(seq_first), PromptAttention.from_mha(batch_first)
    xs = x.transpose(0, 1).contiguous().requires_grad_(), x.clone().requires_grad_()
    runs = [lambda m=m, t=t: m(t, t, t, prompt_q=prompts)[0].sum().backward() for m, t in zip(mods, xs, strict=True)]
    counts = [_copies(run) for run in runs]
    assert counts[0] <= counts[1], f"[N, B, E] input: {counts[0]} copies, [B, N, E]: {counts[1]}"
    out_s, out_b = (m(t, t, t, prompt_q=prompts, return_prompt_outputs=True)[0] for m, t in zip(mods, xs, strict=True))
    torch.testing.assert_close(out_s.transpose(0, 1), out_b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(xs[0].grad.transpose(0, 1), xs[1].grad, atol=2e-5, rtol=1e-4)
