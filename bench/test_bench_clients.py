"""Our modules inside prompt-learning clients vs the clients' own computation, side by side in one run, fwd+bwd.

Text (OpenAI ``clip.model.CLIP`` with the ViT-B/16 text tower: width 512, 12 layers, 8 heads, 77 tokens; random
weights; ImageNet-1K class names):

- ``coop``: CoOp (n_ctx 16): ``PromptLearner.forward`` + ``TextEncoder`` (77 tokens per class) vs
  ``SharedPrefixTextEncoder(clip_model, 16)(names, ctx=ctx)``.
- ``cocoop``: CoCoOp (n_ctx 4, B images): ``ctx + meta_net(image features)`` and one text encoding per image in a
  Python loop vs one batched call ``enc(names, ctx=ctx + meta_net(f)[:, None])``.
- ``maple_text``: MaPLe's text side (n_ctx 2, prompt depth 9: 8 deep text prompts) vs ``enc(names, ctx=...,
  deep_prompts=[...])``.

Vision (batch ``B``, 224 x 224 images):

- ``maple_vision``: OpenAI ViT-B/16 ``VisionTransformer`` with MaPLe's prompts (2 rows, depth 9, projected from the
  text prompts) vs ``apply_vision_prompts(visual, 2, 9)`` + ``visual(images, prompts=[...])``.
- ``vpt_deep``: timm ``vit_base_patch16_224`` with VPT-deep (50 prompts), VPT's ``incorporate_prompt`` +
  ``forward_deep_prompt`` vs ``add_prompts(model, 50, 'deep')``.

Per case: median/p20/p80 time of one fwd+bwd step for both, their ratio, and the bytes autograd saves for backward
(activations only: parameters excluded). CPU: fp32 and 1 thread (``torch.set_num_threads(1)``). Written to
``bench/results/<device>/clients.json``; ``RPP_BENCH_FULL=1`` adds C = 1000 for the clients' text encoders (ours
runs C = 1000 always).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from benchutil import bench_device, imagenet_classnames, record, saved_bytes, synchronize, time_quantiles

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources
    clip = pytest.importorskip("clip")
    from clip.model import CLIP, VisionTransformer

from rpp_kernels.integrations.open_clip import apply_vision_prompts
from rpp_kernels.integrations.timm import add_prompts
from rpp_kernels.text import SharedPrefixTextEncoder

FULL = os.environ.get("RPP_BENCH_FULL") == "1"
DEVICE = bench_device()
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
_full = pytest.mark.skipif(not FULL, reason="long on CPU: set RPP_BENCH_FULL=1")
pytestmark = pytest.mark.usefixtures("one_thread")  # bench/conftest.py: every case runs on 1 thread


@pytest.fixture(scope="module")
def clip_model() -> CLIP:
    torch.manual_seed(0)
    # The ViT-B/16 text tower; a token vision tower (the text benchmarks never run it).
    model = CLIP(512, 32, 1, 64, 16, 77, 49408, 512, 8, 12).eval().requires_grad_(False)
    return model.to(DEVICE, DTYPE)


# ------------------------------------------------------------------------------------------ client code
def coop_text_features(clip_model, prefix, suffix, tokenized, ctx, deep=None):
    """CoOp's PromptLearner.forward ('end') + TextEncoder; with ``deep`` MaPLe's text blocks (rows 1..n_ctx replaced
    at layers 1..len(deep))."""
    dtype = clip_model.dtype
    n_cls = prefix.shape[0]
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1).type(dtype), suffix], dim=1)
    x = (prompts + clip_model.positional_embedding.type(dtype)).permute(1, 0, 2)
    if deep is None:
        x = clip_model.transformer(x)
    else:
        for counter, blk in enumerate(clip_model.transformer.resblocks):
            if counter >= 1 and counter - 1 < len(deep):
                n_ctx = deep[counter - 1].shape[0]
                rows = deep[counter - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).type(dtype)
                x = torch.cat([x[:1], rows, x[1 + n_ctx :]], dim=0)
            x = blk(x)
    x = clip_model.ln_final(x.permute(1, 0, 2)).type(dtype)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip_model.text_projection


def coop_buffers(clip_model, classnames, n_ctx):
    """CoOp's PromptLearner.__init__: token prefix/suffix buffers (computed once, outside the timed step)."""
    prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames]
    tokenized = torch.cat([clip.tokenize(p) for p in prompts]).to(DEVICE)
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokenized).type(clip_model.dtype)
    return embedding[:, :1], embedding[:, 1 + n_ctx :], tokenized


def maple_encode_image(visual, image, shared_ctx, deep):
    """MaPLe's VisionTransformer_MaPLe.forward (prompts appended before ln_pre, replaced at layers 1..len(deep))."""
    x = visual.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([visual.class_embedding.to(x.dtype) + zeros, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1).type(x.dtype)], dim=1)).permute(1, 0, 2)
    n_ctx = shared_ctx.shape[0]
    for counter, blk in enumerate(visual.transformer.resblocks):
        if counter >= 1 and counter - 1 < len(deep):
            rows = deep[counter - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).type(x.dtype)
            x = torch.cat([x[: x.shape[0] - n_ctx], rows], dim=0)
        x = blk(x)
    return visual.ln_post(x.permute(1, 0, 2)[:, 0, :]) @ visual.proj


def vpt_logits(model, x, prompts):
    """VPT's incorporate_prompt + forward_deep_prompt on timm's modules (no dropout, no projection)."""
    batch, num_tokens = x.shape[0], prompts.shape[1]
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    hidden = torch.cat((x[:, :1], prompts[0].expand(batch, -1, -1), x[:, 1:]), dim=1)
    for i, blk in enumerate(model.blocks):
        if i > 0:
            hidden = torch.cat((hidden[:, :1], prompts[i].expand(batch, -1, -1), hidden[:, 1 + num_tokens :]), dim=1)
        hidden = blk(hidden)
    return model.forward_head(model.norm(hidden))


# ------------------------------------------------------------------------------------------ harness
def _side_by_side(name: str, steps: dict, forwards: dict, exclude: list, slow_client: bool, extra: dict) -> dict:
    times, saved = {}, {}
    for provider, step in steps.items():
        slow = provider == "client" and slow_client
        times[provider] = time_quantiles(step, DEVICE, warmup=0 if slow else 1, rep=2 if slow else 5)
        saved[provider] = saved_bytes(forwards[provider], exclude=exclude, keep=provider != "client" or not slow)
    entry = {
        "case": name,
        "mode": "fwd+bwd",
        "dtype": str(DTYPE).replace("torch.", ""),
        **extra,
        "time": times,
        "saved_bytes": saved,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        # a 1-thread benchmark on a machine whose other cores are busy too: times are indicative, bytes exact
        "measured_under_load": os.getloadavg()[0] > 1.5,
    }
    if "client" in times:
        entry["vs_client"] = {
            "speedup": times["client"]["median_ms"] / times["ours"]["median_ms"],
            "saved_bytes_ratio": saved["ours"] / saved["client"],
        }
    record("clients", entry)
    return entry


def _text_case(clip_model, client: str, n_classes: int, with_client: bool = True) -> dict:
    torch.manual_seed(1)
    names = imagenet_classnames(n_classes)
    n_ctx = {"coop": 16, "cocoop": 4, "maple_text": 2}[client]
    ctx = nn.Parameter(torch.randn(n_ctx, 512, device=DEVICE, dtype=DTYPE) * 0.02)
    params = [ctx]
    enc = SharedPrefixTextEncoder(clip_model, n_ctx)
    prefix, suffix, tokenized = coop_buffers(clip_model, names, n_ctx)
    extra = {"client": client, "n_classes": n_classes, "n_ctx": n_ctx}
    if client == "cocoop":
        batch = 2
        meta_net = nn.Sequential(nn.Linear(512, 32), nn.ReLU(inplace=True), nn.Linear(32, 512)).to(DEVICE, DTYPE)
        params += list(meta_net.parameters())
        image_features = F.normalize(torch.randn(batch, 512, device=DEVICE, dtype=DTYPE), dim=-1)
        extra["images"] = batch

        def client_fwd():
            shifted = ctx.unsqueeze(0) + meta_net(image_features).unsqueeze(1)
            logits = []
            for ctx_i, imf_i in zip(shifted, image_features, strict=True):
                text = F.normalize(coop_text_features(clip_model, prefix, suffix, tokenized, ctx_i), dim=-1)
                logits.append(imf_i @ text.t())
            return torch.stack(logits)

        def ours_fwd():
            text = F.normalize(enc(names, ctx=ctx + meta_net(image_features)[:, None]), dim=-1)
            return torch.einsum("bd,bcd->bc", image_features, text)

    else:
        deep = None
        if client == "maple_text":
            deep = [nn.Parameter(torch.randn(n_ctx, 512, device=DEVICE, dtype=DTYPE) * 0.02) for _ in range(8)]
            params += deep
            extra["deep_layers"] = 9

        def client_fwd():
            return coop_text_features(clip_model, prefix, suffix, tokenized, ctx, deep)

        def ours_fwd():
            return enc(names, ctx=ctx, deep_prompts=deep)

    forwards = {"ours": ours_fwd, "client": client_fwd} if with_client else {"ours": ours_fwd}
    with torch.no_grad():
        out = ours_fwd()
    grad_out = torch.randn_like(out)

    def make_step(fwd):
        def step():
            for p in params:
                p.grad = None
            fwd().backward(grad_out)
            synchronize(DEVICE)

        return step

    steps = {k: make_step(f) for k, f in forwards.items()}
    exclude = list(clip_model.parameters()) + params
    return _side_by_side(f"{client}-C{n_classes}", steps, forwards, exclude, slow_client=True, extra=extra)


TEXT_CASES = [
    ("coop", 100, True),
    ("cocoop", 100, True),
    ("maple_text", 100, True),
    ("coop", 1000, False),
    pytest.param("coop", 1000, True, marks=_full),
]


@pytest.mark.parametrize(("client", "n_classes", "with_client"), TEXT_CASES)
def test_text_clients(benchmark, clip_model, client, n_classes, with_client):
    if not with_client and FULL:
        pytest.skip("the full run measures this case with the client")
    entry = benchmark.pedantic(lambda: _text_case(clip_model, client, n_classes, with_client), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "note"})


def test_maple_vision(benchmark):
    torch.manual_seed(2)
    visual = VisionTransformer(224, 16, 768, 12, 12, 512).eval().requires_grad_(False).to(DEVICE, DTYPE)
    images = torch.randn(2, 3, 224, 224, device=DEVICE, dtype=DTYPE)
    n_ctx, depth = 2, 9
    ctx = nn.Parameter(torch.randn(n_ctx, 512, device=DEVICE, dtype=DTYPE) * 0.02)
    deep_text = [nn.Parameter(torch.randn(n_ctx, 512, device=DEVICE, dtype=DTYPE) * 0.02) for _ in range(depth - 1)]
    projs = nn.ModuleList([nn.Linear(512, 768) for _ in range(depth)]).to(DEVICE, DTYPE)
    params = [ctx, *deep_text, *projs.parameters()]
    ref = copy.deepcopy(visual)  # the client's own, unpatched tower (same weights)
    prompts = apply_vision_prompts(visual, n_ctx, depth)

    def vision_rows():  # MaPLe's learner: the vision prompts are projections of the text prompts
        return [proj(t) for proj, t in zip(projs, [ctx, *deep_text], strict=True)]

    def client_fwd():
        rows = vision_rows()
        return maple_encode_image(ref, images, rows[0], rows[1:])

    def ours_fwd():
        return visual(images, prompts=vision_rows())

    assert prompts.carry and prompts.ln_pre
    grad_out = torch.randn(2, 512, device=DEVICE, dtype=DTYPE)

    def make_step(fwd):
        def step():
            for p in params:
                p.grad = None
            fwd().backward(grad_out)
            synchronize(DEVICE)

        return step

    forwards = {"ours": ours_fwd, "client": client_fwd}
    steps = {k: make_step(f) for k, f in forwards.items()}
    exclude = list(visual.parameters()) + list(ref.parameters()) + params
    extra = {"client": "maple_vision", "images": 2, "num_prompts": n_ctx, "depth": depth, "model": "ViT-B/16"}
    entry = benchmark.pedantic(
        lambda: _side_by_side("maple_vision-B2", steps, forwards, exclude, False, extra), rounds=1, iterations=1
    )
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "note"})


def test_vpt_deep_vision(benchmark):
    import timm

    torch.manual_seed(3)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100).eval()
    model = add_prompts(model.requires_grad_(False), 50, "deep").to(DEVICE, DTYPE)
    images = torch.randn(2, 3, 224, 224, device=DEVICE, dtype=DTYPE)

    def client_fwd():
        return vpt_logits(model, images, model.prompt_tokens)

    def ours_fwd():
        return model(images)

    grad_out = torch.randn(2, 100, device=DEVICE, dtype=DTYPE)

    def make_step(fwd):
        def step():
            model.prompt_tokens.grad = None
            fwd().backward(grad_out)
            synchronize(DEVICE)

        return step

    forwards = {"ours": ours_fwd, "client": client_fwd}
    steps = {k: make_step(f) for k, f in forwards.items()}
    exclude = list(model.parameters())
    extra = {"client": "vpt_deep", "images": 2, "num_prompts": 50, "depth": 12, "model": "vit_base_patch16_224"}
    entry = benchmark.pedantic(
        lambda: _side_by_side("vpt_deep-B2", steps, forwards, exclude, False, extra), rounds=1, iterations=1
    )
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "note"})
