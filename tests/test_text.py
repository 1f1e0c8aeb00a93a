"""SharedPrefixTextEncoder against the explicit 77-token encoding (encode_text_naive) and open_clip itself.

A tiny open_clip CLIP (text width 64, 3 layers, 4 heads, random weights with random biases and LayerNorm affines)
keeps the suite fast; the vocabulary and the 77-token context are CLIP's, so real tokenization is exercised.
"""

from __future__ import annotations

import random

import pytest
import torch
from open_clip.model import CLIP
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

import rpp_kernels.text as text
from rpp_kernels.text import SharedPrefixTextEncoder, encode_text_naive

TINY_VISION = dict(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
TINY_TEXT = dict(width=64, heads=4, layers=3)

# A fixed spread of ImageNet-1K names: short, long, with punctuation ("jack-o'-lantern", "crane (bird)").
REAL_NAMES = list(IMAGENET_CLASSNAMES[::25]) + [n for n in IMAGENET_CLASSNAMES if any(c in n for c in "'-(")][:10]


def random_names(count: int, seed: int = 0) -> list[str]:
    """Deterministic made-up class names of 1-6 words, some with punctuation and digits."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    names = []
    for _ in range(count):
        words = ["".join(rng.choices(alphabet, k=rng.randint(1, 11))) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            words[-1] += rng.choice(["'s", "-2", " (x)", ".", "!?"])
        names.append(" ".join(words))
    return names


def tiny_clip(seed: int = 0, **text_cfg) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(32, TINY_VISION, {**TINY_TEXT, **text_cfg}).eval()
    with torch.no_grad():
        # open_clip zero-initialises biases and sets LayerNorm to identity: randomise them so that bias handling of
        # the prompt rows and the LayerNorm affine are actually tested.
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_final"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model() -> CLIP:
    return tiny_clip()


def perturb_prompts(enc: SharedPrefixTextEncoder, seed: int = 1) -> None:
    """Move every prompt away from its initial value, so deep/unshared prompts differ from the shallow encoding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.prompt_parameters().values():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))


def naive(model: CLIP, enc: SharedPrefixTextEncoder, names: list[str]) -> torch.Tensor:
    return encode_text_naive(model, names, **enc.prompt_parameters())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """fp32 tolerance relative to the reference's magnitude; the message names the worst element."""
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1.0)
    worst = int(err.argmax())
    assert err.max() <= tol * scale, (
        f"{what}: max error {err.max():.3g} at flat index {worst} (got {actual.flatten()[worst]:.6g}, expected "
        f"{expected.flatten()[worst]:.6g}); tolerance {tol * scale:.3g}"
    )


def check_against_naive(model: CLIP, enc: SharedPrefixTextEncoder, names: list[str], tol: float = 1e-5) -> None:
    """Outputs and the gradient of every prompt parameter equal the explicit computation's."""
    params = enc.prompt_parameters()
    out, ref = enc(names), naive(model, enc, names)
    assert out.shape == ref.shape == (len(names), model.text_projection.shape[1])
    assert_close(out, ref, "output", tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, list(params.values()), grad_out)
    expected = torch.autograd.grad(ref, list(params.values()), grad_out)
    for name, g, e in zip(params, got, expected, strict=True):
        assert e.abs().max() > 0, f"{name} does not reach the naive output"
        assert_close(g, e, f"grad of {name}", tol)


MODES = {
    "shallow": dict(),
    "deep": dict(deep_prompts=3),
    "unshared": dict(unshared_qkv=True),
    "unshared-deep": dict(unshared_qkv=True, deep_prompts=2),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n_ctx", [1, 4, 16])
def test_matches_naive_real_names(model, n_ctx, mode):
    enc = SharedPrefixTextEncoder(model, n_ctx, **MODES[mode])
    perturb_prompts(enc)
    check_against_naive(model, enc, REAL_NAMES)


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_naive_random_names(model, mode):
    enc = SharedPrefixTextEncoder(model, 4, **MODES[mode])
    perturb_prompts(enc)
    check_against_naive(model, enc, random_names(40))


@pytest.mark.parametrize(
    "text_cfg",
    [dict(ls_init_value=0.5), dict(pool_type="eos", eos_id=49407), dict(proj_bias=True)],
    ids=["layer-scale", "eos-pool", "linear-projection"],
)
def test_text_tower_variants(text_cfg):
    m = tiny_clip(seed=3, **text_cfg)
    enc = SharedPrefixTextEncoder(m, 4, unshared_qkv=True, deep_prompts=2)
    perturb_prompts(enc)
    out, ref = enc(REAL_NAMES), naive(m, enc, REAL_NAMES)
    assert_close(out, ref, "output")


def test_naive_is_open_clip_encode_text(model):
    """The reference is CLIP's own encoding when ctx holds the 'X' embeddings it replaces."""
    names = REAL_NAMES + random_names(10)
    x_id = text._tokenizer().encode("X")[0]
    ctx = model.token_embedding.weight[x_id].expand(4, -1)
    tokens = text._tokenizer()(["X X X X " + n + "." for n in names])
    with torch.no_grad():
        assert_close(encode_text_naive(model, names, ctx), model.encode_text(tokens), "naive vs encode_text")


def test_ctx_init_is_the_hand_written_prompt(model):
    enc = SharedPrefixTextEncoder(model, 4, ctx_init="a photo of a")
    tokens = text._tokenizer()(["a photo of a " + n + "." for n in REAL_NAMES])
    with torch.no_grad():
        assert_close(enc(REAL_NAMES), model.encode_text(tokens), "ctx_init vs encode_text")
    with pytest.raises(ValueError, match="tokenizes to 4 tokens but n_ctx=5"):
        SharedPrefixTextEncoder(model, 5, ctx_init="a photo of a")


@pytest.mark.parametrize("mode", ["deep", "unshared", "unshared-deep"])
def test_fresh_deep_prompts_start_from_shallow(model, mode):
    shallow = SharedPrefixTextEncoder(model, 4, ctx_init="a photo of a")
    enc = SharedPrefixTextEncoder(model, 4, ctx_init="a photo of a", **MODES[mode])
    with torch.no_grad():
        assert_close(enc(REAL_NAMES), shallow(REAL_NAMES), "fresh deep/unshared vs shallow")


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunking_equivalence(model, chunk_size, checkpoint):
    names = REAL_NAMES + random_names(20)
    whole = SharedPrefixTextEncoder(model, 4, unshared_qkv=True, deep_prompts=2)
    perturb_prompts(whole)
    chunked = SharedPrefixTextEncoder(
        model, 4, unshared_qkv=True, deep_prompts=2, chunk_size=chunk_size, checkpoint=checkpoint
    )
    chunked.load_state_dict(whole.state_dict())
    out_w, out_c = whole(names), chunked(names)
    assert_close(out_c, out_w, "chunked output")
    grad_out = torch.randn(out_w.shape, generator=torch.Generator().manual_seed(4))
    (out_w * grad_out).sum().backward()
    (out_c * grad_out).sum().backward()
    for name, p in whole.prompt_parameters().items():
        assert_close(chunked.prompt_parameters()[name].grad, p.grad, f"chunked grad of {name}")


def test_prefix_is_shared_not_copied(model, monkeypatch):
    """Suffix attention gets the prefix as one [H, P, D] tensor (batch stride 0), never a per-class copy."""
    calls = []
    real = text.prompt_attention

    def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
        calls.append((q.shape, None if prefix_k is None else prefix_k.shape))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(text, "prompt_attention", spy)
    names = ["goldfish", "great white shark"]  # different suffix lengths: two buckets of one class each
    enc = SharedPrefixTextEncoder(model, 16)
    lengths = [len(s) for s in enc._suffix_tokens(names)]
    assert lengths[0] != lengths[1]
    enc(names)
    suffix_calls = [c for c in calls if c[1] is not None]
    assert len(suffix_calls) == 2 * TINY_TEXT["layers"]
    for q_shape, prefix_shape in suffix_calls:
        assert prefix_shape == (TINY_TEXT["heads"], 17, TINY_TEXT["width"] // TINY_TEXT["heads"])
        assert q_shape[0] == 1 and q_shape[2] <= max(lengths)  # a bucket's suffix rows only, never 77


def test_truncation_matches_open_clip(model):
    """Names that overflow 77 tokens are truncated as open_clip's tokenizer does: EOT kept at position 76."""
    long_name = " ".join(f"word{i}" for i in range(120))
    names = ["goldfish", long_name]
    enc = SharedPrefixTextEncoder(model, 16)
    perturb_prompts(enc)
    suffix = enc._suffix_tokens([long_name])[0]
    assert 1 + 16 + len(suffix) == 77 and suffix[-1] == text._tokenizer().eot_token_id
    check_against_naive(model, enc, names)


def test_order_duplicates_and_cache(model):
    enc = SharedPrefixTextEncoder(model, 4)
    names = ["tench", "goldfish", "great white shark", "tench", "jack-o'-lantern"]
    with torch.no_grad():
        single = torch.cat([enc([n]) for n in names])
        batched = enc(names)
        assert_close(batched, single, "batched vs one by one")
        assert_close(enc(names[::-1]), batched.flip(0), "reversed order")
    assert set(enc._suffix_cache) == set(names)


def test_parameters_and_frozen_tower(model):
    enc = SharedPrefixTextEncoder(model, 4, deep_prompts=3)
    assert list(enc.prompt_parameters()) == ["ctx", "deep_ctx"]
    assert enc.ctx.shape == (4, 64) and enc.deep_ctx.shape == (2, 4, 64)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"ctx", "deep_ctx"}
    enc = SharedPrefixTextEncoder(model, 4, unshared_qkv=True, deep_prompts=2)
    shapes = {n: tuple(p.shape) for n, p in enc.prompt_parameters().items()}
    assert shapes == {"ctx": (4, 64), "prompt_q": (2, 4, 64), "prompt_k": (2, 4, 64), "prompt_v": (2, 4, 64)}
    assert enc.deep_ctx is None


def test_errors(model):
    with pytest.raises(ValueError, match="n_ctx"):
        SharedPrefixTextEncoder(model, 0)
    with pytest.raises(ValueError, match="n_ctx"):
        SharedPrefixTextEncoder(model, 75)
    with pytest.raises(ValueError, match="deep_prompts"):
        SharedPrefixTextEncoder(model, 4, deep_prompts=4)
    with pytest.raises(ValueError, match="unshared_qkv needs deep_prompts < 3"):
        SharedPrefixTextEncoder(model, 4, unshared_qkv=True, deep_prompts=3)
    with pytest.raises(ValueError, match="chunk_size"):
        SharedPrefixTextEncoder(model, 4, chunk_size=0)
    enc = SharedPrefixTextEncoder(model, 4)
    with pytest.raises(TypeError, match="single str"):
        enc("goldfish")
    with pytest.raises(ValueError, match="at least one"):
        enc([])
    with pytest.raises(ValueError, match="text_pool_type"):
        SharedPrefixTextEncoder(tiny_clip(pool_type="last"), 4)
    with pytest.raises(TypeError, match="open_clip.model.CLIP"):
        SharedPrefixTextEncoder(torch.nn.Linear(2, 2), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_gpu(mode, dtype):
    """FlashAttention's rule: our error vs the fp32 reference is at most 2x (3x for gradients) that of the naive path
    run in the same dtype."""
    m32 = tiny_clip(seed=5).cuda()
    enc32 = SharedPrefixTextEncoder(m32, 16, **MODES[mode])
    perturb_prompts(enc32)
    names = REAL_NAMES + random_names(30)
    ref = naive(m32, enc32, names)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(enc32.prompt_parameters().values()))

    m = tiny_clip(seed=5).cuda().to(dtype)
    enc = SharedPrefixTextEncoder(m, 16, **MODES[mode])
    enc.load_state_dict(enc32.state_dict())
    params = list(enc.prompt_parameters().values())
    out, base = enc(names), naive(m, enc, names)
    grads = torch.autograd.grad(out.float().square().sum(), params)
    base_grads = torch.autograd.grad(base.float().square().sum(), params)
    eps = 1e-3 if dtype == torch.float16 else 1e-2
    err, base_err = (out.float() - ref).abs().max(), (base.float() - ref).abs().max()
    assert err <= 2 * base_err + eps * ref.abs().max(), f"output error {err:.3g} vs naive {base_err:.3g}"
    for g, bg, rg in zip(grads, base_grads, ref_grads, strict=True):
        err, base_err = (g.float() - rg).abs().max(), (bg.float() - rg).abs().max()
        assert err <= 3 * base_err + eps * rg.abs().max(), f"grad error {err:.3g} vs naive {base_err:.3g}"


def test_call_time_prompts_open_clip(model):
    """ctx / deep prompts given per call equal an encoder owning them; per-image ctx gives one encoding per image."""
    owner = SharedPrefixTextEncoder(model, 4, deep_prompts=3)
    perturb_prompts(owner)
    plain = SharedPrefixTextEncoder(model, 4, chunk_size=3)
    names = REAL_NAMES[:12]
    with torch.no_grad():
        assert_close(plain(names, ctx=owner.ctx, deep_prompts=owner.deep_ctx), owner(names), "call-time deep prompts")
        per_image = torch.stack([owner.ctx, owner.ctx + 0.3])
        batched = plain(names, ctx=per_image, deep_prompts=owner.deep_ctx)
        assert batched.shape == (2, len(names), 32)
        assert_close(batched[0], owner(names), "image 0")
        assert_close(batched[1], plain(names, ctx=per_image[1], deep_prompts=owner.deep_ctx), "image 1")


def test_prompt_state_dict_holds_only_prompts(model):
    enc = SharedPrefixTextEncoder(model, 4, unshared_qkv=True, deep_prompts=2)
    perturb_prompts(enc)
    state = enc.prompt_state_dict()
    assert set(state) == {"ctx", "prompt_q", "prompt_k", "prompt_v"} and len(enc.state_dict()) > len(state)
    other = SharedPrefixTextEncoder(model, 4, unshared_qkv=True, deep_prompts=2)
    other.load_prompt_state_dict(state)
    with torch.no_grad():
        assert_close(other(REAL_NAMES), enc(REAL_NAMES), "reloaded prompts")
    with pytest.raises(ValueError, match="prompt_q must have shape"):
        other.load_prompt_state_dict({**state, "prompt_q": torch.zeros(1, 4, 64)})


def test_compute_dtype_option(model):
    """dtype=float64 computes the fp32 model's tower in float64 (weights cast on the fly, the model unchanged)."""
    enc = SharedPrefixTextEncoder(model, 4, dtype=torch.float64)
    assert enc.ctx.dtype == torch.float64 and model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float32
    with torch.no_grad():
        out = enc(REAL_NAMES[:5])
        ref = encode_text_naive(model, REAL_NAMES[:5], enc.ctx.float())
    assert out.dtype == torch.float64
    assert_close(out.float(), ref, "float64 vs float32 encoding", tol=1e-4)
