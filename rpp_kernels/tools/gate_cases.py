"""The shapes the static GPU gate compiles: each case runs one public op (forward, and backward where training needs
it) exactly as the package calls it, on CPU tensors, while ``static_gate.capture`` records the Triton launches.

Values never matter (nothing executes), so inputs are ``torch.empty`` wherever nothing validates them, and zeros or
valid indices where the op checks them (KD). Each case is small in host memory: untouched ``empty`` pages cost nothing.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One call of a public op at one shape; ``label`` names it in reports and in the known-violations file."""

    label: str
    op: str  # "attention" (prompt_qkv + prompt_attention), "prompt_qkv", "kd"
    params: dict
    setup: Callable[[], Callable[[], None]] = field(compare=False, repr=False)  # builds inputs, returns the step
    group: str = "core"  # "core": CI default; "extra": only with --all

    def run(self) -> None:
        self.setup()()


def _vision_block(batch: int, heads: int, n_tokens: int, n_prompt: int, head_dim: int, dtype, backward: bool):
    """A deep-prompt vision block's attention: ``PromptAttention`` (qkv projection + prefix attention + out_proj) with
    prompts ``[P, E]``; backward to the prompts and to ``x`` (earlier layers' prompts need it), weights frozen."""
    from rpp_kernels.attention import PromptAttention

    embed = heads * head_dim
    module = PromptAttention(embed, heads, batch_first=True, dtype=dtype).requires_grad_(False)
    x = torch.empty(batch, n_tokens, embed, dtype=dtype, requires_grad=backward)
    prompts = torch.zeros(n_prompt, embed, dtype=dtype, requires_grad=backward)

    def step():
        with torch.set_grad_enabled(backward):
            out, _ = module(x, x, x, prompt_q=prompts)
            if backward:
                torch.autograd.grad(out, (x, prompts), torch.empty_like(out))

    return step


def _text_suffix(batch: int, heads: int, n_tokens: int, n_prefix: int, head_dim: int, dtype, backward: bool):
    """The shared-prefix text encoder's per-class pass: ``prompt_qkv`` of the class suffixes, then causal attention
    over the shared prefix K/V (SOS + learned context, ``[H, P, D]``) and the suffix (``rpp_kernels.text``)."""
    from rpp_kernels.attention import prompt_attention, prompt_qkv

    embed = heads * head_dim
    weight = torch.empty(3 * embed, embed, dtype=dtype)
    bias = torch.empty(3 * embed, dtype=dtype)
    x = torch.empty(batch, n_tokens, embed, dtype=dtype, requires_grad=backward)
    prefix = [torch.empty(heads, n_prefix, head_dim, dtype=dtype, requires_grad=backward) for _ in range(2)]

    def step():
        with torch.set_grad_enabled(backward):
            (q, k, v), _ = prompt_qkv(x, weight, bias, heads)
            o = prompt_attention(q, k, v, *prefix, causal=True)
            if backward:
                torch.autograd.grad(o, (x, *prefix), torch.empty_like(o))

    return step


def _qkv(batch: int, heads: int, n_tokens: int, head_dim: int, dtype, backward: bool):
    from rpp_kernels.attention import prompt_qkv

    embed = heads * head_dim
    weight = torch.empty(3 * embed, embed, dtype=dtype, requires_grad=backward)
    bias = torch.empty(3 * embed, dtype=dtype, requires_grad=backward)
    x = torch.empty(batch, n_tokens, embed, dtype=dtype, requires_grad=backward)

    def step():
        with torch.set_grad_enabled(backward):
            (q, k, v), _ = prompt_qkv(x, weight, bias, heads)
            if backward:
                torch.autograd.grad((q, k, v), (x, weight, bias), [torch.empty_like(t) for t in (q, k, v)])

    return step


def _kd(batch: int, classes: int, embed: int, teacher_embed: int, form: str, k: int | None, dtype):
    """``topk_kd_loss`` forward + backward to the student features and the class embeddings (both learned)."""
    from rpp_kernels.kd import topk_kd_loss

    feats = torch.zeros(batch, embed, dtype=dtype, requires_grad=True)
    class_embeds = torch.zeros(classes, embed, dtype=dtype, requires_grad=True)
    if form == "logits":
        teacher = torch.zeros(batch, classes, dtype=dtype)
    elif form == "feats":
        teacher = (torch.zeros(batch, teacher_embed, dtype=dtype), torch.zeros(classes, teacher_embed, dtype=dtype))
    else:  # a precomputed top-100 (the teacher cache): distinct indices per row, probabilities >= 0
        teacher = (torch.arange(100).expand(batch, 100).contiguous(), torch.full((batch, 100), 0.01, dtype=dtype))

    def step():
        loss = topk_kd_loss(feats, class_embeds, teacher, k=k, temperature=2.0, logit_scale=100.0)
        torch.autograd.grad(loss, (feats, class_embeds))

    return step


VIT_B16 = dict(batch=128, heads=12, n_tokens=197, head_dim=64)
VIT_L14 = dict(batch=64, heads=16, n_tokens=257, head_dim=64)
TEXT = dict(batch=1024, heads=8, n_tokens=8, n_prefix=17, head_dim=64)
HEAD_DIMS = (32, 64, 72, 80, 96, 112, 128)
KD = dict(batch=256, classes=21841)


def _bind(fn, params: dict):
    return functools.partial(fn, **{**params, "dtype": DTYPES[params["dtype"]]})


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def cases() -> list[Case]:
    """Every case of the gate: ``core`` cases are the issue's shapes; ``extra`` adds the head-dim sweep in fp16."""
    out: list[Case] = []

    def add(label, op, params, fn, group="core"):
        out.append(Case(label, op, params, fn, group))

    for (model, shape), n_prompt, dt in itertools.product(
        (("vit-b16", VIT_B16), ("vit-l14", VIT_L14)), (1, 16, 50), DTYPES
    ):
        p = dict(shape, n_prompt=n_prompt, dtype=dt, backward=True)
        add(
            f"attention {model} P={n_prompt} {dt}",
            "attention",
            p,
            _bind(_vision_block, p),
        )
    for head_dim, dt in itertools.product(HEAD_DIMS, DTYPES):
        if head_dim == 64:
            continue  # the vit-b16 cases above
        p = dict(VIT_B16, head_dim=head_dim, n_prompt=16, dtype=dt, backward=True)
        add(
            f"attention vit-b16 P=16 D={head_dim} {dt}",
            "attention",
            p,
            _bind(_vision_block, p),
            "core" if dt != "fp16" else "extra",
        )
    for dt in DTYPES:
        p = dict(TEXT, dtype=dt, backward=True)
        add(
            f"attention text-suffix {dt}",
            "attention",
            p,
            _bind(_text_suffix, p),
        )
    # Zero-shot evaluation over ImageNet-21K's class names in one call (--classes-per-step all): forward only.
    p = dict(TEXT, batch=21841, dtype="bf16", backward=False)
    add(
        "attention text-suffix-21k-eval bf16",
        "attention",
        p,
        _bind(_text_suffix, p),
    )
    for dt in DTYPES:
        p = dict(VIT_B16, dtype=dt, backward=True)
        add(f"prompt_qkv vit-b16 {dt}", "prompt_qkv", p, _bind(_qkv, p))
    for (embed, teacher_embed), form, k in itertools.product(
        ((512, 768), (1024, 1024)), ("logits", "feats", "topk"), (100, None)
    ):
        if form == "topk" and k is None:
            continue  # a precomputed top-100 with k=None is the k=100 case
        for dt in ("bf16", "fp32") if (embed, form, k) == (512, "feats", 100) else ("bf16",):
            p = dict(KD, embed=embed, teacher_embed=teacher_embed, form=form, k=k, dtype=dt)
            label = f"kd E={embed} Et={teacher_embed} {form} k={k} {dt}"
            add(label, "kd", p, _bind(_kd, p))
    return out


def custom_case(op: str, dtype: str, **shape) -> Case:
    """A case at a user's own shape (``python -m rpp_kernels.info --kernels``); unset values take the defaults."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {list(DTYPES)}")
    dt = DTYPES[dtype]
    defaults = {
        "attention": (dict(VIT_B16, n_prompt=16, backward=True), _vision_block, "attention"),
        "text": (dict(TEXT, backward=True), _text_suffix, "attention"),
        "prompt_qkv": (dict(VIT_B16, backward=True), _qkv, "prompt_qkv"),
        "kd": (dict(KD, embed=512, teacher_embed=768, form="feats", k=100), _kd, "kd"),
    }
    if op not in defaults:
        raise ValueError(f"unknown op {op!r}; choose from {list(defaults)}")
    params, fn, kind = defaults[op]
    unknown = set(shape) - set(params)
    if unknown:
        raise ValueError(f"op {op!r} takes no {sorted(unknown)}; its shape parameters are {sorted(params)}")
    params = params | shape
    if op == "kd" and params["form"] not in ("logits", "feats", "topk"):
        raise ValueError(f"kd teacher form must be logits, feats or topk, got {params['form']!r}")
    label = f"{op} {_fmt(params)} {dtype}"
    return Case(label, kind, params | {"dtype": dtype}, functools.partial(fn, **params, dtype=dt))
