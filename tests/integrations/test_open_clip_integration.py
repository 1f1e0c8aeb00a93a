"""Deep vision prompts patched into open_clip's VisionTransformer vs an explicit concatenation implementation."""

import pytest
import torch
from open_clip.transformer import VisionTransformer

from rpp_kernels.integrations.open_clip import apply_vision_prompts, encode_image_explicit, remove_vision_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: intra-op threads only add contention


def tiny_visual(ls_init_value=None, layers=3, seed=0):
    torch.manual_seed(seed)
    visual = VisionTransformer(
        image_size=32,
        patch_size=8,
        width=64,
        layers=layers,
        heads=2,
        mlp_ratio=2.0,
        output_dim=32,
        ls_init_value=ls_init_value,
    )
    return visual.eval()


SEMANTICS = {
    "rpp-unshared": dict(unshared_qkv=True),
    "carry-ln_pre": dict(),  # the default for shared tokens: MaPLe / IVLP / VPT-deep
    "drop": dict(carry=False, ln_pre=False),
}


@pytest.mark.parametrize("semantics", list(SEMANTICS))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("num_prompts", [1, 5])
@pytest.mark.parametrize("ls_init_value", [None, 0.5])
def test_prompted_forward_and_grads_match_explicit(semantics, depth, num_prompts, ls_init_value):
    visual = tiny_visual(ls_init_value)
    prompts = apply_vision_prompts(visual, num_prompts, depth, init_std=0.5, **SEMANTICS[semantics])
    images = torch.randn(3, 3, 32, 32)

    out = visual(images)
    grads = torch.autograd.grad(out.square().sum(), list(prompts.parameters()))
    ref = encode_image_explicit(visual, images, prompts)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(prompts.parameters()))

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    # Prompts change the output (a wiring mistake that ignores them would pass the parity checks above).
    remove_vision_prompts(visual)
    assert not torch.allclose(visual(images), out)


def test_remove_restores_model_and_state_dict():
    visual = tiny_visual()
    images = torch.randn(2, 3, 32, 32)
    before = visual(images)
    keys = set(visual.state_dict())
    prompts = apply_vision_prompts(visual, 4, 2)
    assert set(visual.state_dict()) == keys
    with prompts.disabled():
        torch.testing.assert_close(visual(images), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has prompts"):
        apply_vision_prompts(visual, 4, 2)
    remove_vision_prompts(visual)
    torch.testing.assert_close(visual(images), before, rtol=0, atol=0)
    apply_vision_prompts(visual, 2, 1)  # can be applied again after removal


def test_bf16_autocast_close_to_fp32():
    visual = tiny_visual()
    apply_vision_prompts(visual, 3, 3, init_std=0.5)
    images = torch.randn(2, 3, 32, 32)
    ref = visual(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = visual(images)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def test_rejects_bad_arguments():
    visual = tiny_visual()
    with pytest.raises(ValueError, match="depth must be in"):
        apply_vision_prompts(visual, 4, 4)
    with pytest.raises(ValueError, match="num_prompts"):
        apply_vision_prompts(visual, 0, 1)
    with pytest.raises(TypeError, match="VisionTransformer"):
        apply_vision_prompts(torch.nn.Linear(2, 2), 1, 1)


def test_defaults_follow_the_prompt_kind():
    shared = apply_vision_prompts(tiny_visual(), 2, 2)
    assert (shared.unshared_qkv, shared.carry, shared.ln_pre) == (False, True, True)
    rpp = apply_vision_prompts(tiny_visual(), 2, 2, unshared_qkv=True)
    assert (rpp.carry, rpp.ln_pre) == (False, False)
    with pytest.raises(ValueError, match="carry=True needs shared prompt tokens"):
        apply_vision_prompts(tiny_visual(), 2, 2, unshared_qkv=True, carry=True)


def test_carry_differs_from_drop_before_the_last_block():
    """The carried rows change the result when depth < layers (the 7% MaPLe difference of issue 12)."""
    images = torch.randn(2, 3, 32, 32)
    outs = []
    for carry in (True, False):
        visual = tiny_visual()
        prompts = apply_vision_prompts(visual, 2, 2, carry=carry, init_std=0.5)
        with torch.no_grad():
            for p in prompts.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            outs.append(visual(images))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_prompts_per_call():
    visual = tiny_visual()
    prompts = apply_vision_prompts(visual, 3, 2, init_std=0.5)
    images = torch.randn(2, 3, 32, 32)
    rows = torch.randn(2, 3, 64, requires_grad=True)
    out = visual(images, prompts=rows)
    ref = encode_image_explicit(visual, images, prompts, rows)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g, r = (torch.autograd.grad(t.square().sum(), rows)[0] for t in (out, ref))
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    with torch.no_grad():  # the module's own prompts again after the call, and as a list
        torch.testing.assert_close(visual(images), encode_image_explicit(visual, images, prompts))
        torch.testing.assert_close(visual(images, prompts=list(rows)), out)
    with pytest.raises(ValueError, match="prompts must be"):
        visual(images, prompts=torch.randn(3, 3, 64))
    visual.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        visual(images, prompts=rows)
