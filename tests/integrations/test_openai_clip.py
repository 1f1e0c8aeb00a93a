"""Our modules dropped into the code of CoOp-family repositories, on OpenAI's ``clip.model.CLIP`` (clip-anytorch).

Each test writes the client's own computation explicitly, the way its repository does (CoOp's ``TextEncoder`` and
``PromptLearner``, CoCoOp's per-image loop, MaPLe's compound prompts, PromptSRC's losses) and checks that our module,
used with at most two lines of user code, gives the same outputs and prompt gradients (fp32: rel <= 1e-5).
Models are tiny and random (text width 64, 3 layers; vision width 64, 3 layers), with CLIP's real vocabulary.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources
    clip = pytest.importorskip("clip")
    from clip.model import CLIP, convert_weights

from rpp_kernels.integrations.open_clip import apply_vision_prompts, encode_image_explicit, remove_vision_prompts
from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.text import SharedPrefixTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["tench", "goldfish", "great white shark", "jack-o'-lantern", "crane (bird)", "a", "hot dog, hotdog"]
N_CTX = 4


def tiny_openai_clip(seed: int = 0, layers: int = 3) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(32, 32, layers, 64, 8, 77, 49408, 64, 4, layers).eval()
    with torch.no_grad():
        # OpenAI zero-initialises biases and sets LayerNorms to identity: randomise them so both are exercised.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model() -> CLIP:
    return tiny_openai_clip()


def rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (actual.float() - expected.float()).abs().max()
    scale = expected.float().abs().max().clamp_min(1e-12)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g}, relative {err / scale:.3g} > {tol}"


# ------------------------------------------------------------------------------------------ client code (CoOp)
class CoOpTextEncoder(nn.Module):
    """CoOp's ``trainers/coop.py`` TextEncoder, verbatim."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection
        return x


def coop_prefix_suffix(clip_model, classnames, n_ctx):
    """CoOp's PromptLearner.__init__ (class_token_position 'end'): token prefix/suffix buffers and tokenized prompts."""
    prompt_prefix = " ".join(["X"] * n_ctx)
    prompts = [prompt_prefix + " " + name + "." for name in classnames]
    tokenized_prompts = torch.cat([clip.tokenize(p) for p in prompts])
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokenized_prompts).type(clip_model.dtype)
    return embedding[:, :1, :], embedding[:, 1 + n_ctx :, :], tokenized_prompts


def coop_text_features(clip_model, classnames, ctx, deep=None):
    """CoOp's PromptLearner.forward + TextEncoder; with ``deep`` MaPLe's text side (rows 1..n_ctx replaced at
    layers 1..len(deep), as ``ResidualAttentionBlock_MaPLe`` does)."""
    prefix, suffix, tokenized = coop_prefix_suffix(clip_model, classnames, ctx.shape[0])
    n_cls = len(classnames)
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), suffix], dim=1)
    if deep is None:
        return CoOpTextEncoder(clip_model)(prompts, tokenized)
    dtype = clip_model.dtype
    x = (prompts + clip_model.positional_embedding.type(dtype)).permute(1, 0, 2)
    for counter, blk in enumerate(clip_model.transformer.resblocks):
        if counter >= 1 and counter - 1 < len(deep):
            n_ctx = deep[counter - 1].shape[0]
            textual_context = deep[counter - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).type(dtype)
            x = torch.cat([x[:1], textual_context, x[1 + n_ctx :]], dim=0)
        x = blk(x)
    x = clip_model.ln_final(x.permute(1, 0, 2)).type(dtype)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip_model.text_projection


def grads(out, params, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, params, g)


# ------------------------------------------------------------------------------------------ tests
def test_coop_features_and_ctx_grad(model):
    ctx = nn.Parameter(torch.randn(N_CTX, 64) * 0.5)
    ref = coop_text_features(model, NAMES, ctx)
    enc = SharedPrefixTextEncoder(model, N_CTX)  # our module
    out = enc(NAMES, ctx=ctx)  # user line 1 (or enc(NAMES) with enc.ctx as the learnable context)
    assert enc.family == "openai" and out.shape == (len(NAMES), 32)
    rel_close(out, ref, "CoOp text features")
    rel_close(grads(out, ctx)[0], grads(ref, ctx)[0], "CoOp ctx grad")


def test_coop_own_ctx_and_frozen_shared_tower(model):
    m = copy.deepcopy(model)
    enc = SharedPrefixTextEncoder(m, N_CTX, ctx_init="a photo of a")
    assert enc.transformer is m.transformer and enc.token_embedding.weight is m.token_embedding.weight  # shared
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"ctx"}
    tokens = clip.tokenize(["a photo of a " + n + "." for n in NAMES])
    with torch.no_grad():
        rel_close(enc(NAMES), m.encode_text(tokens), "ctx_init vs clip encode_text")
    state = enc.prompt_state_dict()
    assert list(state) == ["ctx"] and state["ctx"].shape == (N_CTX, 64)
    other = SharedPrefixTextEncoder(m, N_CTX)
    other.load_prompt_state_dict(state)
    assert torch.equal(other.ctx, enc.ctx)
    with pytest.raises(ValueError, match="missing \\['ctx'\\]"):
        other.load_prompt_state_dict({})


def test_cocoop_per_image_ctx_batched(model):
    """CoCoOp: ctx + meta_net(image features), one text encoding per image (the client loops; we batch)."""
    torch.manual_seed(1)
    batch = 3
    ctx = nn.Parameter(torch.randn(N_CTX, 64) * 0.5)
    meta_net = nn.Sequential(nn.Linear(32, 4), nn.ReLU(inplace=True), nn.Linear(4, 64))
    image_features = F.normalize(torch.randn(batch, 32), dim=-1)
    logit_scale = model.logit_scale.exp().detach()

    # The client (CoCoOp's PromptLearner.forward + CustomCLIP.forward), looping over images.
    bias = meta_net(image_features)
    ctx_shifted = ctx.unsqueeze(0) + bias.unsqueeze(1)
    ref_logits = []
    for ctx_shifted_i, imf_i in zip(ctx_shifted, image_features, strict=True):
        text_features = coop_text_features(model, NAMES, ctx_shifted_i)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        ref_logits.append(logit_scale * imf_i @ text_features.t())
    ref_logits = torch.stack(ref_logits)

    enc = SharedPrefixTextEncoder(model, N_CTX)
    text = F.normalize(enc(NAMES, ctx=ctx + meta_net(image_features)[:, None]), dim=-1)  # user line 1: [B, C, D]
    logits = logit_scale * torch.einsum("bd,bcd->bc", image_features, text)  # user line 2
    assert text.shape == (batch, len(NAMES), 32)
    rel_close(logits, ref_logits, "CoCoOp logits")
    params = [ctx, *meta_net.parameters()]
    got, expected = grads(logits, params), grads(ref_logits, params)
    for name, g, r in zip(["ctx", "w1", "b1", "w2", "b2"], got, expected, strict=True):
        rel_close(g, r, f"CoCoOp grad {name}")


def test_cocoop_per_image_equals_shared_per_image(model):
    enc = SharedPrefixTextEncoder(model, N_CTX, chunk_size=2)
    ctx = torch.randn(2, N_CTX, 64)
    with torch.no_grad():
        batched = enc(NAMES, ctx=ctx)
        for b in range(2):
            rel_close(batched[b], enc(NAMES, ctx=ctx[b]), f"image {b}")


def test_maple_deep_text_prompts(model):
    """MaPLe's text side: learner-owned ctx and compound_prompts_text passed per call."""
    torch.manual_seed(2)
    ctx = nn.Parameter(torch.randn(N_CTX, 64) * 0.5)
    compound_prompts_text = nn.ParameterList([nn.Parameter(torch.randn(N_CTX, 64) * 0.5) for _ in range(2)])
    ref = coop_text_features(model, NAMES, ctx, deep=list(compound_prompts_text))
    enc = SharedPrefixTextEncoder(model, N_CTX)
    out = enc(NAMES, ctx=ctx, deep_prompts=list(compound_prompts_text))
    rel_close(out, ref, "MaPLe text features")
    params = [ctx, *compound_prompts_text]
    for i, (g, r) in enumerate(zip(grads(out, params), grads(ref, params), strict=True)):
        assert r.abs().max() > 0
        rel_close(g, r, f"MaPLe text grad {i}")
    # The module's own deep prompts are the same computation.
    own = SharedPrefixTextEncoder(model, N_CTX, deep_prompts=3)
    own.load_prompt_state_dict({"ctx": ctx.detach(), "deep_ctx": torch.stack(list(compound_prompts_text)).detach()})
    with torch.no_grad():
        rel_close(own(NAMES), ref, "MaPLe via deep_prompts=3")


def test_fp16_model_like_clip_load(model):
    """clip.load converts weights to fp16 (convert_weights): compute in the model's dtype like CoOp, or in fp32."""
    m16 = copy.deepcopy(model)
    convert_weights(m16)
    assert m16.dtype == torch.float16 and m16.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    ctx32 = torch.randn(N_CTX, 64) * 0.5
    enc = SharedPrefixTextEncoder(m16, N_CTX)
    assert enc.dtype == torch.float16 and enc.ctx.dtype == torch.float16
    assert m16.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16  # no dtype change of the model
    ctx = ctx32.half().requires_grad_()
    out, ref = enc(NAMES, ctx=ctx), coop_text_features(m16, NAMES, ctx)
    assert out.dtype == torch.float16
    rel_close(out, ref, "fp16 features", tol=1e-2)
    rel_close(grads(out, ctx)[0], grads(ref, ctx)[0], "fp16 ctx grad", tol=2e-2)

    # A dtype of the user's choice: fp32 arithmetic on the fp16 weights equals the client on the upcast model.
    m32 = copy.deepcopy(m16).float()
    enc32 = SharedPrefixTextEncoder(m16, N_CTX, dtype=torch.float32)
    ctx = ctx32.clone().requires_grad_()
    out, ref = enc32(NAMES, ctx=ctx), coop_text_features(m32, NAMES, ctx)
    assert out.dtype == torch.float32
    rel_close(out, ref, "fp32-on-fp16 features")
    rel_close(grads(out, ctx)[0], grads(ref, ctx)[0], "fp32-on-fp16 ctx grad")


def test_promptsrc_logit_distillation_is_topk_kd(model):
    """PromptSRC's CE + logit KL (reduction 'sum' / logits.numel()) == topk_kd_loss(k=None, kd_weight=1/C)."""
    torch.manual_seed(4)
    batch, n_cls = 5, len(NAMES)
    image = F.normalize(torch.randn(batch, 32), dim=-1)
    zs_image = F.normalize(torch.randn(batch, 32), dim=-1)
    zs_text = F.normalize(torch.randn(n_cls, 32), dim=-1)
    labels = torch.randint(0, n_cls, (batch,))
    logit_scale = model.logit_scale.exp().item()
    ctx = nn.Parameter(torch.randn(N_CTX, 64) * 0.5)
    enc = SharedPrefixTextEncoder(model, N_CTX)

    def promptsrc_loss():  # PromptSRC's trainer: loss_ce + L_SCL_logits
        text = F.normalize(coop_text_features(model, NAMES, ctx), dim=-1)
        logits = logit_scale * image @ text.t()
        zero_shot_logits = logit_scale * zs_image @ zs_text.t()
        loss_ce = F.cross_entropy(logits, labels)
        kl = F.kl_div(
            F.log_softmax(logits / 1, dim=1), F.log_softmax(zero_shot_logits / 1, dim=1), reduction="sum",
            log_target=True,
        ) * (1 * 1) / logits.numel()  # fmt: skip
        return loss_ce + kl

    text = F.normalize(enc(NAMES, ctx=ctx), dim=-1)
    ours = topk_kd_loss(
        image, text, (zs_image, zs_text), k=None, logit_scale=logit_scale, labels=labels, kd_weight=1 / n_cls,
        ce_weight=1.0,
    )  # fmt: skip
    ref = promptsrc_loss()
    rel_close(ours, ref, "PromptSRC loss")
    rel_close(torch.autograd.grad(ours, ctx)[0], torch.autograd.grad(ref, ctx)[0], "PromptSRC ctx grad")


def test_clear_errors(model):
    enc = SharedPrefixTextEncoder(model, N_CTX)
    with pytest.raises(ValueError, match="class_token_position='middle'"):
        SharedPrefixTextEncoder(model, N_CTX, class_token_position="middle")
    with pytest.raises(ValueError, match="CSC"):
        SharedPrefixTextEncoder(model, N_CTX, class_specific_ctx=True)
    with pytest.raises(ValueError, match="ctx must be"):
        enc(NAMES, ctx=torch.randn(5, 64))
    with pytest.raises(ValueError, match="deep_prompts must be"):
        enc(NAMES, deep_prompts=torch.randn(3, N_CTX, 64))  # 3 text layers: at most 2 deep layers
    with pytest.raises(ValueError, match="same batch size"):
        enc(NAMES, ctx=torch.randn(2, N_CTX, 64), deep_prompts=torch.randn(3, 1, N_CTX, 64))
    rpp = SharedPrefixTextEncoder(model, N_CTX, unshared_qkv=True)
    with pytest.raises(ValueError, match="unshared_qkv"):
        rpp(NAMES, deep_prompts=torch.randn(1, N_CTX, 64))
    with pytest.raises(TypeError, match="OpenAI's clip.model.CLIP"):
        SharedPrefixTextEncoder(model.visual, N_CTX)


# ------------------------------------------------------------------------------------------ vision (MaPLe / IVLP)
def maple_encode_image(visual, image, shared_ctx, compound_deeper_prompts):
    """MaPLe's ``VisionTransformer_MaPLe.forward`` + ``ResidualAttentionBlock_MaPLe`` (vision side), written out:
    prompts appended after the patches before ``ln_pre``, replaced at layers 1..len(deep), carried afterwards."""
    x = visual.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([visual.class_embedding.to(x.dtype) + zeros, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    visual_ctx = shared_ctx.expand(x.shape[0], -1, -1).type(x.dtype)
    x = torch.cat([x, visual_ctx], dim=1)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    n_ctx = shared_ctx.shape[0]
    for counter, blk in enumerate(visual.transformer.resblocks):
        if counter >= 1 and counter - 1 < len(compound_deeper_prompts):
            prefix = x[0 : x.shape[0] - n_ctx, :, :]
            visual_context = compound_deeper_prompts[counter - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, visual_context.type(x.dtype)], dim=0)
        x = blk(x)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x[:, 0, :])
    return x @ visual.proj


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_maple_text_and_vision_prompts(model, depth):
    """MaPLe: vision prompts are projections of the text prompts (computed per step), deep on both sides."""
    torch.manual_seed(5)
    m = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32)
    ctx = nn.Parameter(torch.randn(N_CTX, 64) * 0.5)
    deep_text = nn.ParameterList([nn.Parameter(torch.randn(N_CTX, 64) * 0.5) for _ in range(depth - 1)])
    proj = nn.Linear(64, 64)  # MaPLe's self.proj: text width -> vision width
    deep_projs = nn.ModuleList([nn.Linear(64, 64) for _ in range(depth - 1)])

    def learner():  # MaPLe's MultiModalPromptLearner.forward
        return proj(ctx), [layer(p) for layer, p in zip(deep_projs, deep_text, strict=True)]

    shared_ctx, deep_vision = learner()
    ref_image = maple_encode_image(m.visual, images, shared_ctx, deep_vision)
    ref_text = coop_text_features(m, NAMES, ctx, deep=list(deep_text))
    ref = F.normalize(ref_image, dim=-1) @ F.normalize(ref_text, dim=-1).t()

    enc = SharedPrefixTextEncoder(m, N_CTX)
    apply_vision_prompts(m.visual, N_CTX, depth)  # our modules
    shared_ctx, deep_vision = learner()
    image = m.visual(images, prompts=[shared_ctx, *deep_vision])  # user line 1
    text = enc(NAMES, ctx=ctx, deep_prompts=list(deep_text) or None)  # user line 2
    out = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    rel_close(image, ref_image, "MaPLe image features")
    rel_close(out, ref, "MaPLe logits")
    params = [ctx, *deep_text, *proj.parameters(), *deep_projs.parameters()]
    for i, (g, r) in enumerate(zip(grads(out, params), grads(ref, params), strict=True)):
        assert r.abs().max() > 0
        rel_close(g, r, f"MaPLe grad {i}")
    remove_vision_prompts(m.visual)
    with torch.no_grad():
        torch.testing.assert_close(m.visual(images), model.visual(images), rtol=0, atol=0)


def test_ivlp_module_prompts_and_explicit_reference(model):
    """IVLP / VPT on CLIP with the module's own prompts: visual(images) == the explicit reference == MaPLe's code."""
    m = copy.deepcopy(model)
    prompts = apply_vision_prompts(m.visual, 3, 2, init_std=0.5)
    images = torch.randn(2, 3, 32, 32)
    out = m.visual(images)
    ref = encode_image_explicit(m.visual, images, prompts)
    with prompts.disabled():  # the client's code runs the original blocks
        client = maple_encode_image(m.visual, images, prompts.tokens[0], [prompts.tokens[1]])
    rel_close(out, ref, "explicit reference")
    rel_close(out, client, "client code")
    params = list(prompts.parameters())
    for g, r in zip(grads(out, params), grads(client, params), strict=True):
        rel_close(g, r, "IVLP prompt grad")


def test_vision_prompts_on_fp16_model(model):
    m16 = copy.deepcopy(model)
    convert_weights(m16)
    prompts = apply_vision_prompts(m16.visual, 3, 2, init_std=0.5)
    images = torch.randn(2, 3, 32, 32).half()
    with torch.no_grad():
        out = m16.visual(images)
        with prompts.disabled():
            ref = maple_encode_image(m16.visual, images, prompts.tokens[0], [prompts.tokens[1]])
    assert out.dtype == torch.float16
    rel_close(out, ref, "fp16 vision features", tol=1e-2)


# ------------------------------------------------------------------------------------------ patch_blocks
def test_patch_blocks_take_prompts_both_families(model):
    from open_clip.transformer import VisionTransformer

    from rpp_kernels.integrations.openai_clip import patch_blocks, unpatch_blocks

    torch.manual_seed(6)
    oc = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32)
    for tower, openai in ((copy.deepcopy(model.visual), True), (copy.deepcopy(model), True), (oc, False)):
        keys = set(tower.state_dict())
        blk = tower.transformer.resblocks[0]
        mha = blk.attn
        n_blocks = patch_blocks(tower)
        assert n_blocks == sum(len(m.resblocks) for m in tower.modules() if hasattr(m, "resblocks"))
        assert set(tower.state_dict()) == keys
        assert blk.attn.in_proj_weight is mha.in_proj_weight and blk.attn.out_proj is mha.out_proj
        text = hasattr(tower, "token_embedding")
        x = torch.randn(77 if text else 5, 2, 64) if openai else torch.randn(2, 5, 64)
        rows = torch.randn(3, 64, requires_grad=True)
        seq = 0 if openai else 1
        batch = x.shape[1 - seq]
        full = torch.cat([rows[:, None].expand(-1, batch, -1) if openai else rows.expand(batch, -1, -1), x], seq)
        if text:  # the causal 77-token mask: prompts first, so the concatenation drops the last 3 tokens
            x = x[:74]
            full = full[:77]
        unpatched = copy.deepcopy(blk)
        unpatch_blocks(unpatched)
        ref = unpatched(full)
        out = blk(x, prompt_q=rows, return_prompt_outputs=True)
        rel_close(out, ref, "all rows")
        rel_close(blk(x, prompt_q=rows), ref.narrow(seq, 3, ref.shape[seq] - 3), "token rows")
        rel_close(torch.autograd.grad(out.sum(), rows)[0], torch.autograd.grad(ref.sum(), rows)[0], "rows grad")
        rel_close(blk(x), unpatched(x), "no prompts: the original block")
        assert unpatch_blocks(tower) == n_blocks and tower.transformer.resblocks[0].attn is mha


@pytest.mark.parametrize("mode", [dict(), dict(deep_prompts=3), dict(unshared_qkv=True, deep_prompts=2)])
def test_encoder_matches_library_reference_on_openai(model, mode):
    """Every prompt kind (RPP's unshared q/k/v included) on OpenAI's tower equals encode_text_naive, which itself
    runs OpenAI's blocks (and equals CoOp's encoder for the shallow context)."""
    from rpp_kernels.text import encode_text_naive

    enc = SharedPrefixTextEncoder(model, N_CTX, **mode)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.prompt_parameters().values():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    params = enc.prompt_parameters()
    out, ref = enc(NAMES), encode_text_naive(model, NAMES, **params)
    rel_close(out, ref, "features")
    for name, g, r in zip(params, grads(out, list(params.values())), grads(ref, list(params.values())), strict=True):
        assert r.abs().max() > 0
        rel_close(g, r, f"grad {name}")
    if not mode:
        with torch.no_grad():
            rel_close(ref, coop_text_features(model, NAMES, enc.ctx), "reference vs CoOp")
