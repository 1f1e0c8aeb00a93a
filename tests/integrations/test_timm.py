"""rpp_kernels.integrations.timm: prompted timm ViTs against an explicit-concat VPT implementation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from rpp_kernels.integrations import timm as rpp_timm
from rpp_kernels.integrations.timm import add_prompts, load_backbone_weights, remove_prompts, vpt_forward_features

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=5)
# Model variants exercising every timm detail the deep path re-implements.
VARIANTS = {
    "plain": {},
    "qknorm-layerscale-nobias": dict(qkv_bias=False, qk_norm=True, init_values=0.1),
    "registers-prenorm": dict(reg_tokens=2, pre_norm=True, no_embed_class=True),
    "no-cls": dict(class_token=False, global_pool="avg"),
}


def tiny_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **kwargs}).eval()
    # Non-trivial norms and biases so that a skipped LayerNorm or bias shows up in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a - b).abs()
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"max |diff| {diff.max().item():.3g} at {idx}: {a[idx].item():.6g} vs {b[idx].item():.6g}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.abs().max().item(), 1.0)
    assert torch.allclose(actual, expected, atol=tol * scale, rtol=tol), max_err(actual, expected)


def reference_logits(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(vpt_forward_features(model, images))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_parity_with_explicit_vpt_frozen_backbone(variant, pool, mode):
    kwargs = {"global_pool": pool, **VARIANTS[variant]}
    if kwargs.get("class_token") is False and pool == "token":
        pytest.skip("token pooling needs a class token")
    model = add_prompts(tiny_vit(**kwargs), num_prompts=3, mode=mode)
    model.requires_grad_(False)
    model.prompt_tokens.requires_grad_(True)
    model.head.requires_grad_(True)
    images = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 4])

    def run(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(images)
        F.cross_entropy(logits, target).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, ours_grads = run(model)
    ref, ref_grads = run(lambda x: reference_logits(model, x))
    assert_close(ours, ref)
    assert ours_grads.keys() == {"prompt_tokens", "head.weight", "head.bias"}
    for name, grad in ref_grads.items():
        assert grad.abs().max() > 0, f"{name}: reference gradient is zero, the test would prove nothing"
        assert_close(ours_grads[name], grad)


@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_parity_gradients_of_every_parameter_and_input(mode):
    """Unfrozen backbone: the deep path's shared Q/K/V projection must give the same weight gradients."""
    model = add_prompts(tiny_vit(global_pool="avg", **VARIANTS["qknorm-layerscale-nobias"]), 4, mode)
    images = torch.randn(3, 3, 32, 32)
    grads = []
    for forward in (model, lambda x: reference_logits(model, x)):
        model.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_(True)
        (forward(x) ** 2).sum().backward()
        grads.append({"images": x.grad, **{n: p.grad for n, p in model.named_parameters()}})
    ours, ref = grads
    missing = [n for n, g in ours.items() if g is None and ref[n] is not None]
    assert not missing, f"no gradient reached {missing}"
    for name, grad in ref.items():
        if grad is not None:
            assert_close(ours[name], grad, tol=5e-5)


@pytest.mark.parametrize("pool", ["token", "avg", "", "map"])
def test_deep_residual_stream_holds_prompts_only_when_the_head_reads_them(pool):
    model = add_prompts(tiny_vit(global_pool=pool), num_prompts=3, mode="deep")
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    n_patches = model.patch_embed.num_patches
    assert features.shape == (2, 1 + (0 if pool == "token" else 3) + n_patches, 64)
    assert_close(model(images), reference_logits(model, images))


def test_deep_path_projects_prompts_once_per_block_and_uses_the_shared_prefix(monkeypatch):
    """The prompt rows go through prompt_qkv as [P, dim] (not per sample), and attention gets an [H, P, D] prefix."""
    calls = []
    real_qkv, real_attention = rpp_timm.prompt_qkv, rpp_timm.prompt_attention

    def qkv(x, w, b, heads, pq, pk, pv):
        calls.append(("qkv", tuple(x.shape), tuple(pq.shape)))
        return real_qkv(x, w, b, heads, pq, pk, pv)

    def attention(q, k, v, prefix_k, prefix_v, **kw):
        calls.append(("attn", tuple(q.shape), tuple(prefix_k.shape)))
        return real_attention(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(rpp_timm, "prompt_qkv", qkv)
    monkeypatch.setattr(rpp_timm, "prompt_attention", attention)
    model = add_prompts(tiny_vit(), num_prompts=3, mode="deep")
    model(torch.randn(2, 3, 32, 32))
    assert calls == [("qkv", (2, 17, 64), (3, 64)), ("attn", (2, 4, 17, 16), (4, 3, 16))] * 3


@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_remove_prompts_restores_original_outputs(mode):
    model = tiny_vit(global_pool="avg")
    images = torch.randn(2, 3, 32, 32)
    before, keys = model(images), set(model.state_dict())
    add_prompts(model, 3, mode)
    assert not torch.allclose(model(images), before)
    assert set(model.state_dict()) == keys | {"prompt_tokens"}
    with pytest.raises(NotImplementedError, match="forward_intermediates.*unprompted"):
        model.get_intermediate_layers(images, 1)  # would silently skip the prompts
    remove_prompts(model)
    assert torch.equal(model(images), before)
    assert set(model.state_dict()) == keys
    assert "forward_features" not in vars(model) and "forward_intermediates" not in vars(model)
    assert not hasattr(model, "prompt_tokens")
    model.get_intermediate_layers(images, 1)  # the backbone's own again
    add_prompts(model, 5, mode)  # and it can be prompted again
    assert model.prompt_tokens.shape[1] == 5


def test_prompt_shapes_and_init():
    model = tiny_vit()
    add_prompts(model, 4, "deep")
    assert model.prompt_tokens.shape == (3, 4, 64) and model.prompt_tokens.requires_grad
    bound = (6.0 / (3 * 8 * 8 + 64)) ** 0.5  # VPT's uniform init
    assert model.prompt_tokens.abs().max() <= bound
    remove_prompts(model)
    init = torch.randn(1, 4, 64)
    add_prompts(model, 4, "shallow", init=init)
    assert torch.equal(model.prompt_tokens.detach(), init)
    assert model.prompt_tokens.data_ptr() != init.data_ptr()


def test_grad_checkpointing_matches():
    model = add_prompts(tiny_vit(global_pool="avg"), 3, "deep")
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        model(images).sum().backward()
        grads.append(model.prompt_tokens.grad.clone())
    assert_close(grads[1], grads[0])


def test_vit_base_patch16_224_deep_parity():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval()
    add_prompts(model, 20, "deep")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close(model(images), reference_logits(model, images), tol=5e-5)


def test_errors():
    model = tiny_vit()
    with pytest.raises(TypeError, match="VisionTransformer"):
        add_prompts(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="mode"):
        add_prompts(model, 3, "middle")
    with pytest.raises(ValueError, match="num_prompts"):
        add_prompts(model, 0)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 64\)"):
        add_prompts(model, 4, "deep", init=torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="no prompts"):
        remove_prompts(model)
    add_prompts(model, 3)
    with pytest.raises(ValueError, match="already has prompts"):
        add_prompts(model, 3)
    with pytest.raises(ValueError, match="attention dropout"):
        add_prompts(tiny_vit(attn_drop_rate=0.1), 3, "deep")
    add_prompts(tiny_vit(attn_drop_rate=0.1), 3, "shallow")  # shallow runs the unmodified blocks


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_load_mae_and_mocov3_checkpoints(tmp_path):
    source = tiny_vit(seed=1)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    images = torch.randn(2, 3, 32, 32)

    # MAE pre-training checkpoint: {"model": encoder + decoder}; avg pooling drops the encoder's final norm.
    mae = {**encoder, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64)}
    model = tiny_vit(seed=2, global_pool="avg")
    assert load_backbone_weights(model, _save({"model": mae, "epoch": 3}, tmp_path / "mae.pth")) == "mae"
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    expected = source.blocks(source._pos_embed(source.patch_embed(images)))[:, 1:].mean(1)
    assert_close(model.forward_head(model.forward_features(images), pre_logits=True), model.fc_norm(expected))

    # MoCo v3 pre-training checkpoint: {"state_dict": module.base_encoder.* + momentum encoder + predictor}.
    moco = {f"module.base_encoder.{k}": v for k, v in encoder.items()}
    moco |= {f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in encoder.items()}
    moco |= {"module.base_encoder.head.0.weight": torch.zeros(8, 64), "module.predictor.0.weight": torch.zeros(8, 8)}
    model = tiny_vit(seed=2)
    assert load_backbone_weights(model, _save({"state_dict": moco}, tmp_path / "moco.pth.tar")) == "mocov3"
    assert_close(model.forward_features(images), source.forward_features(images))

    # timm state dict of another image size: pos_embed is resampled.
    model = tiny_vit(seed=2, img_size=48)
    assert load_backbone_weights(model, _save(source.state_dict(), tmp_path / "timm.pth")) == "timm"
    assert model.pos_embed.shape == (1, 1 + 36, 64)


def test_load_errors(tmp_path):
    model = tiny_vit()
    with pytest.raises(FileNotFoundError, match="expected a checkpoint file at"):
        load_backbone_weights(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_backbone_weights(model, tmp_path / "junk.pth")
    wide = VisionTransformer(**{**TINY, "embed_dim": 32, "num_heads": 2}).state_dict()
    with pytest.raises(ValueError, match="shape mismatch: cls_token"):
        load_backbone_weights(model, _save(wide, tmp_path / "wide.pth"))
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.2.")}
    with pytest.raises(ValueError, match="missing: blocks.2"):
        load_backbone_weights(model, _save(partial, tmp_path / "partial.pth"))


def _low_precision_parity(device: torch.device, dtype: torch.dtype) -> None:
    """FlashAttention's rule: our error against the fp32 reference is at most 2x that of explicit VPT in ``dtype``."""
    # Weights rounded to ``dtype`` first, so that the fp32 reference and the low-precision runs share them exactly.
    model = add_prompts(tiny_vit(global_pool="avg", embed_dim=64, num_heads=2), 4, "deep").to(device, dtype).float()
    images = torch.randn(4, 3, 32, 32, device=device).to(dtype).float()
    target = torch.tensor([0, 1, 2, 3], device=device)
    with torch.no_grad():
        expected = reference_logits(model, images)
    grads = {}
    for name, forward, dt in (("ours", model, dtype), ("vpt", lambda x: reference_logits(model, x), dtype)):
        model.to(dt).zero_grad(set_to_none=True)
        logits = forward(images.to(dt))
        F.cross_entropy(logits.float(), target).backward()
        grads[name] = (logits.float(), model.prompt_tokens.grad.float())
    model.float().zero_grad(set_to_none=True)
    F.cross_entropy(reference_logits(model, images), target).backward()
    grad_ref = model.prompt_tokens.grad
    for i, (ref, factor) in enumerate(((expected, 2), (grad_ref, 3))):
        ours_err = (grads["ours"][i] - ref).abs().max().item()
        vpt_err = (grads["vpt"][i] - ref).abs().max().item()
        assert ours_err <= factor * vpt_err + 1e-5 * ref.abs().max().item(), (i, ours_err, vpt_err)


def test_bf16_within_twice_the_error_of_explicit_vpt_cpu():
    _low_precision_parity(torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parity_cuda(dtype):
    """On a GPU the deep path runs the Triton prompt-attention kernel (head dim 32)."""
    _low_precision_parity(torch.device("cuda"), dtype)


@pytest.mark.gpu
def test_parity_cuda_fp32():
    model = add_prompts(tiny_vit(global_pool="avg", embed_dim=64, num_heads=2), 4, "deep").cuda()
    images = torch.randn(3, 3, 32, 32, device="cuda")
    assert_close(model(images), reference_logits(model, images), tol=1e-3)  # the kernel may use TF32 dots


# ------------------------------------------------------------------------------------------ VPT's own code
def vpt_client_logits(model, x, prompt_embeddings, deep_prompt_embeddings, prompt_proj, prompt_dropout):
    """VPT's ``PromptedTransformer.incorporate_prompt`` + ``forward_deep_prompt`` (deep=None: shallow), written
    for timm's modules: prompts after the class token, replaced before every block (deep), per-sample dropout."""
    batch, num_tokens = x.shape[0], prompt_embeddings.shape[1]
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    x = torch.cat(
        (x[:, :1, :], prompt_dropout(prompt_proj(prompt_embeddings).expand(batch, -1, -1)), x[:, 1:, :]), dim=1
    )
    hidden_states = None
    for i in range(len(model.blocks)):
        if i == 0:
            hidden_states = model.blocks[i](x)
        else:
            if deep_prompt_embeddings is not None and i <= deep_prompt_embeddings.shape[0]:
                deep_prompt_emb = prompt_dropout(prompt_proj(deep_prompt_embeddings[i - 1]).expand(batch, -1, -1))
                hidden_states = torch.cat(
                    (hidden_states[:, :1, :], deep_prompt_emb, hidden_states[:, (1 + num_tokens) :, :]), dim=1
                )
            hidden_states = model.blocks[i](hidden_states)
    return model.forward_head(model.norm(hidden_states))


@pytest.mark.parametrize("mode", ["deep", "shallow"])
@pytest.mark.parametrize(("dropout", "project"), [(0.0, None), (0.25, None), (0.0, 16), (0.25, 16)])
def test_vpt_client_code_with_dropout_and_projection(mode, dropout, project):
    model = add_prompts(tiny_vit(), 4, mode, dropout=dropout, project=project).train()
    images = torch.randn(3, 3, 32, 32)
    prompts = model.prompt_tokens
    proj = getattr(model, "prompt_proj", torch.nn.Identity())
    drop = getattr(model, "prompt_dropout", torch.nn.Identity())
    params = [prompts, *proj.parameters()]
    torch.manual_seed(7)  # the same dropout masks: both draw them per sample, layer by layer, in the same order
    out = model(images)
    torch.manual_seed(7)
    ref = vpt_client_logits(model, images, prompts[:1], prompts[1:] if mode == "deep" else None, proj, drop)
    assert_close(out, ref, tol=5e-5)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        assert r.abs().max() > 0
        assert_close(g, r, tol=1e-4)
    if dropout:
        torch.manual_seed(8)
        assert not torch.allclose(model(images), out)  # dropout is live in training
    with torch.no_grad():
        assert_close(model.eval()(images), reference_logits(model, images), tol=5e-5)


def test_refuses_unknown_or_incomplete_or_prompted_models():
    class MAEBackbone(VisionTransformer):  # VPT's MAE backbone: own forward_features, deletes norm, own prompts
        def forward_features(self, x):
            return super().forward_features(x)

    with pytest.raises(TypeError, match="overrides forward_features"):
        add_prompts(MAEBackbone(**TINY), 3)
    model = tiny_vit()
    del model.norm
    with pytest.raises(TypeError, match="lacks norm"):
        add_prompts(model, 3)
    model = tiny_vit()
    model.prompt_embeddings = torch.nn.Parameter(torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="prompted by other code"):
        add_prompts(model, 3)
    with pytest.raises(ValueError, match="dropout"):
        add_prompts(tiny_vit(), 3, dropout=1.0)
    with pytest.raises(ValueError, match="project"):
        add_prompts(tiny_vit(), 3, project=0)
    model = add_prompts(tiny_vit(), 3, dropout=0.1, project=8)
    remove_prompts(model)
    assert not any(hasattr(model, n) for n in ("prompt_tokens", "prompt_proj", "prompt_dropout"))
