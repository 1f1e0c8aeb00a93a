"""rpp_kernels.text: encode many class prompts that share a learnable prefix, computing the prefix once.

A CoOp/POMP class prompt is ``[SOS] ctx_1..ctx_n <class name> . [EOT] <pad...>`` run through CLIP's causal text
transformer. Under the causal mask the prefix rows ``[SOS, ctx_1..ctx_n]`` never see the class name, so their hidden
states (and keys/values) are the same for every class at every layer, and rows after EOT never reach EOT.
:class:`SharedPrefixTextEncoder` therefore runs the prefix once, and runs only the class suffixes (name tokens + ``.``
+ EOT) batched over classes, attending to the prefix keys/values through :func:`rpp_kernels.attention.prompt_attention`.
:func:`encode_text_naive` is the explicit 77-token computation that it equals.

Both CLIP families are served, sharing the model's parameters: open_clip's ``open_clip.model.CLIP`` and OpenAI's
``clip.model.CLIP`` (the ``clip`` package, and the copies vendored by CoOp, CoCoOp, MaPLe, PromptSRC and POMP,
recognised by structure), fp16 models from ``clip.load`` included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool

from rpp_kernels.attention import _is_causal_mask, prompt_attention, prompt_qkv
from rpp_kernels.integrations._clip import is_open_clip_block, is_openai_text_model, layer_norm, residual_tail

__all__ = ["SharedPrefixTextEncoder", "encode_text_naive", "residual_tail"]

_TOKENIZER: SimpleTokenizer | None = None


def _tokenizer() -> SimpleTokenizer:
    # open_clip.tokenize's tokenizer (the BPE vocabulary of OpenAI's clip.tokenize, same ids, same cleaning): loading
    # the vocabulary takes ~0.5 s, so build it once on first use.
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def _prompt_texts(classnames: Sequence[str], n_ctx: int) -> list[str]:
    """The CoOp/POMP prompt strings whose rows 1..n_ctx are replaced by the learned context."""
    return ["X " * n_ctx + name + "." for name in classnames]


def _text_family(clip_model: nn.Module) -> str:
    """``'open_clip'`` or ``'openai'``; raise a clear error for text towers both encoders cannot compute exactly."""
    if isinstance(clip_model, CLIP):
        family = "open_clip"
        blocks = clip_model.transformer.resblocks
        for i, blk in enumerate(blocks):
            if not is_open_clip_block(blk):
                raise TypeError(
                    f"resblocks[{i}] is a {type(blk).__name__}; only open_clip's ResidualAttentionBlock is supported"
                )
        masks = [clip_model.attn_mask]
        eot = _tokenizer().eot_token_id
        pool, eos_id = clip_model.text_pool_type, getattr(clip_model, "text_eos_id", None)
        if pool not in ("argmax", "eos") or (pool == "eos" and eos_id != eot):
            raise ValueError(
                f"SharedPrefixTextEncoder pools the EOT row: needs text_pool_type 'argmax', or 'eos' with "
                f"eos_id={eot}; got text_pool_type={pool!r}, text_eos_id={eos_id}"
            )
    elif is_openai_text_model(clip_model):
        family = "openai"
        blocks = clip_model.transformer.resblocks
        masks = [blk.attn_mask for blk in blocks]
    else:
        raise TypeError(
            "SharedPrefixTextEncoder needs an open_clip.model.CLIP or OpenAI's clip.model.CLIP (token_embedding, "
            "positional_embedding, transformer.resblocks, ln_final and text_projection on the model), got "
            f"{type(clip_model).__name__}"
        )
    for i, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or not _is_causal_mask(mask):
            where = "the model's attn_mask" if family == "open_clip" else f"resblocks[{i}].attn_mask"
            raise ValueError(f"SharedPrefixTextEncoder needs a causal text tower; {where} is not the causal mask")
    for i, blk in enumerate(blocks):
        if blk.attn.dropout != 0.0 or blk.attn.in_proj_weight is None:
            raise ValueError(f"resblocks[{i}].attn needs dropout 0 and a packed in_proj_weight")
    return family


def _model_dtype(clip_model: nn.Module, family: str) -> torch.dtype:
    """The dtype the client computes the text tower in: open_clip's cast dtype, OpenAI's ``clip_model.dtype``
    (CoOp's ``self.dtype``), else the dtype of the first block's weights."""
    if family == "open_clip":
        return clip_model.transformer.get_cast_dtype()
    dtype = getattr(clip_model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else clip_model.transformer.resblocks[0].attn.in_proj_weight.dtype


def _project(text_projection, x: torch.Tensor) -> torch.Tensor:
    """``text_projection`` as CLIP applies it: a matrix, an ``nn.Linear`` or nothing."""
    if text_projection is None:
        return x
    if isinstance(text_projection, nn.Linear):
        bias = None if text_projection.bias is None else text_projection.bias.to(x.dtype)
        return nn.functional.linear(x, text_projection.weight.to(x.dtype), bias)
    return x @ text_projection.to(x.dtype)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, E]`` -> ``[B, H, N, D]``."""
    b, n, e = t.shape
    return t.view(b, n, heads, e // heads).transpose(1, 2)


def _in_proj(attn: nn.MultiheadAttention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias.to(dtype)
    return attn.in_proj_weight.to(dtype), bias


def encode_text_naive(
    clip_model: nn.Module,
    classnames: Sequence[str],
    ctx: torch.Tensor,
    *,
    deep_ctx: torch.Tensor | None = None,
    prompt_q: torch.Tensor | None = None,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The explicit CoOp/POMP encoding, 77 tokens per class: the reference :class:`SharedPrefixTextEncoder` equals.

    ctx: ``[n, W]``; deep_ctx: ``[d - 1, n, W]`` (rows 1..n of the hidden state replaced at layers 1..d-1);
    prompt_q/k/v: ``[d, n, W]`` (rows 1..n get their q, k, v from ``ln_1(prompt_*[l])`` at layers 0..d-1).
    Returns ``[C, embed_dim]``, unnormalised, computed in ``dtype`` (default: the model's). Equivalent to
    ``clip_model.encode_text(tokens)`` with the token embeddings of rows 1..n replaced by ``ctx``, where
    ``tokens = tokenize(["X " * n + name + "."])``; layers without unshared prompts run the model's own block
    (open_clip's or OpenAI's, in its own layout).
    """
    family = _text_family(clip_model)
    model_dtype = _model_dtype(clip_model, family)
    dtype = model_dtype if dtype is None else dtype
    n_ctx = ctx.shape[0]
    context_length = clip_model.positional_embedding.shape[0]
    tokens = _tokenizer()(_prompt_texts(classnames, n_ctx), context_length=context_length)
    tokens = tokens.to(clip_model.positional_embedding.device)
    n_cls, p = tokens.shape[0], 1 + n_ctx

    def with_prompt_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :1], rows.to(t.dtype).expand(n_cls, -1, -1), t[:, p:]], dim=1)

    x = with_prompt_rows(clip_model.token_embedding(tokens).to(dtype), ctx)
    x = x + clip_model.positional_embedding.to(dtype)
    for layer, blk in enumerate(clip_model.transformer.resblocks):
        if deep_ctx is not None and 1 <= layer <= deep_ctx.shape[0]:
            x = with_prompt_rows(x, deep_ctx[layer - 1])
        if (prompt_q is None or layer >= prompt_q.shape[0]) and dtype == model_dtype:
            if family == "openai":
                x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)
            elif clip_model.transformer.batch_first:
                x = blk(x, attn_mask=clip_model.attn_mask)
            else:
                x = blk(x.transpose(0, 1), attn_mask=clip_model.attn_mask).transpose(0, 1)
            continue
        attn = blk.attn
        weight, bias = _in_proj(attn, dtype)
        qkv = nn.functional.linear(layer_norm(blk.ln_1, x), weight, bias)
        if prompt_q is not None and layer < prompt_q.shape[0]:
            biases = (None,) * 3 if bias is None else bias.chunk(3)
            rows = [
                nn.functional.linear(layer_norm(blk.ln_1, pr[layer].to(dtype)), w, b)
                for pr, w, b in zip((prompt_q, prompt_k, prompt_v), weight.chunk(3), biases, strict=True)
            ]
            qkv = with_prompt_rows(qkv, torch.cat(rows, -1))
        q, k, v = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, -1))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = residual_tail(blk, x, o)
    x = layer_norm(clip_model.ln_final, x)
    if family == "openai":
        pooled = x[torch.arange(n_cls, device=x.device), tokens.argmax(dim=-1)]
    else:
        eos_id = getattr(clip_model, "text_eos_id", None)
        pooled = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=eos_id)
    return _project(clip_model.text_projection, pooled)


class SharedPrefixTextEncoder(nn.Module):
    """Encode class prompts ``[SOS] ctx <name> . [EOT]`` with the prefix ``[SOS] ctx`` computed once for all classes.

    ``clip_model``: open_clip's ``open_clip.model.CLIP`` or OpenAI's ``clip.model.CLIP`` (the ``clip`` package and
    the copies vendored by CoOp-family repositories, recognised by structure). The module shares the model's text
    tower (no copy, no dtype change; its parameters are frozen in place with ``requires_grad_(False)``) and computes
    in ``dtype``: by default the model's (open_clip's cast dtype; OpenAI's ``clip_model.dtype``, fp16 after
    ``clip.load`` on GPU, as CoOp computes), or the one given (weights are then cast on the fly).

    ``forward(classnames, ctx=None, deep_prompts=None) -> [C, embed_dim]`` (unnormalised) equals
    :func:`encode_text_naive`: tokenize ``"X " * n_ctx + name + "."``, replace rows 1..n_ctx of the token embeddings
    by ``ctx``, add ``positional_embedding``, run ``transformer`` with the causal mask, ``ln_final``, take the EOT row,
    multiply by ``text_projection``. The learnable prompts (this module's parameters, the defaults of each call):

    - ``ctx`` ``[n_ctx, W]``: the shallow context (layer 0, with positional embeddings), always present.
    - ``deep_ctx`` ``[deep_prompts - 1, n_ctx, W]`` (shared-token deep prompts, ``deep_prompts >= 2`` and
      ``unshared_qkv=False``; MaPLe's ``compound_prompts_text``): rows 1..n_ctx of the hidden state are replaced by
      ``deep_ctx[l - 1]`` before layer l, for l in 1..deep_prompts-1 (no positional embedding, as in
      VPT-deep/MaPLe); later layers carry the rows on. Otherwise None.
    - ``prompt_q``, ``prompt_k``, ``prompt_v`` ``[depth, n_ctx, W]`` with ``depth = max(deep_prompts, 1)``
      (RPP's unshared prompts, ``unshared_qkv=True``): at layers 0..depth-1 the prompt rows' q, k and v are
      ``in_proj(ln_1(prompt_*[l]))`` of that layer's block instead of ``in_proj(ln_1(hidden))``. The prompt rows'
      residual stream is not replaced (it starts from ``ctx`` + positions and adds each layer's attention and MLP
      outputs) and is read by the layers after ``depth``, so ``ctx`` and every ``prompt_*[l]`` reach the output and
      receive gradients (hence ``deep_prompts < layers`` is required here). Otherwise None.

    Prompts per call (the module's own are the defaults): ``ctx`` ``[n_ctx, W]``, or per image ``[B, n_ctx, W]``
    (CoCoOp's ``ctx + meta_net(image)``: the result is ``[B, C, embed_dim]``, every image's prefix and class
    suffixes computed in one batched pass, not a loop); ``deep_prompts`` ``[d - 1, n_ctx, W]`` or a list of
    ``d - 1`` tensors ``[n_ctx, W]`` (MaPLe's learner-owned ``compound_prompts_text``) or per image
    ``[B, d - 1, n_ctx, W]``, replacing ``deep_ctx`` (not with ``unshared_qkv``). A 3-D ``ctx`` is always read as
    per-image (CoOp's class-specific context, ``[C, n_ctx, W]``, has no prefix shared by the classes and is not
    supported; nor are class-token positions other than ``"end"``: ``class_token_position`` and
    ``class_specific_ctx`` only exist to refuse those settings with a clear error).

    :meth:`prompt_parameters` returns the prompts by name, :meth:`prompt_state_dict` /
    :meth:`load_prompt_state_dict` save and load only them (``state_dict()`` also holds the shared tower). New
    deep/unshared prompts are initialised to the prefix's hidden states of the shallow encoder (``deep_ctx[l-1]`` =
    prompt rows entering layer l, ``prompt_*[l]`` = prompt rows entering layer l), so a fresh encoder produces exactly
    the shallow (CoOp/POMP) encoding. ``ctx`` is ``N(0, 0.02)`` or, with ``ctx_init`` (e.g. ``"a photo of a"``,
    which must tokenize to ``n_ctx`` tokens), its token embeddings.

    Class names are tokenized once and cached. A name too long for the context is truncated exactly as open_clip's
    tokenizer truncates (the first ``context_length`` tokens kept, the last one replaced by EOT), so the result still
    equals the naive encoding of the same truncated prompt (OpenAI's ``clip.tokenize`` raises there instead).

    How: per layer the prefix (``P = 1 + n_ctx`` rows, causal within itself) yields keys/values ``[H, P, D]`` (one
    set per image with per-image prompts). Suffixes are grouped by exact token length (no padding, EOT is every row's
    last token) and split into chunks of at most ``chunk_size`` classes; each chunk runs the blocks batched, its
    attention reading the shared prefix K/V with batch stride 0 (``prompt_attention(q, k, v, prefix_k, prefix_v,
    causal=True)``). At the last layer only the EOT row's query, attention and MLP are computed.

    Memory model (bytes autograd saves for backward, activations only; width ``W``, element size ``s``): a block keeps
    about ``10 * W * s`` bytes per token it processes (LayerNorm inputs, packed q/k/v ``3W``, attention output, MLP
    hidden ``4W``, ...). Naive: 77 tokens per class, ``77 * 10 * W * s`` bytes per class per layer (ViT-B/16 text,
    fp32, measured: 1.6 MB per class per layer, 19.1 MB per class). Here: ``L`` suffix tokens per class,
    ``L * 10 * W * s`` per class per layer (ImageNet-1K names with n_ctx=16: L = 4.2 on average, measured 74 KB per
    class per layer, 0.89 MB per class), plus the prefix once (``P * 10 * W * s`` per layer, independent of C). Both
    attention backends recompute the suffix attention in backward (``prompt_attention`` saves only q, k, v and the
    prefix); saving the torch backend's concatenated prefix+suffix K/V would add ``2 * (P + L) * W * s`` per token per
    layer, more than doubling the total. With per-image prompts everything per class is per (image, class), plus a
    per-(image, class) copy of the prefix K/V (``2 * P * W * s`` per layer). With ``checkpoint=True`` each chunk
    keeps only its token ids until backward, which recomputes one chunk at a time: activation memory is then about
    ``chunk_size * L * 10 * W * s * layers`` above the prefix, whatever C. ``chunk_size=None`` means one chunk per
    suffix length.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        n_ctx: int,
        *,
        ctx_init: str | None = None,
        deep_prompts: int = 0,
        unshared_qkv: bool = False,
        chunk_size: int | None = None,
        checkpoint: bool = False,
        dtype: torch.dtype | None = None,
        class_token_position: str = "end",
        class_specific_ctx: bool = False,
    ) -> None:
        super().__init__()
        family = _text_family(clip_model)
        if class_token_position != "end":
            raise ValueError(
                f"SharedPrefixTextEncoder: class_token_position={class_token_position!r} is not supported (only "
                "'end'): with the class name before (part of) the context no prefix is shared by all classes, so "
                "there is nothing to compute once; use the client's own text encoder for this setting"
            )
        if class_specific_ctx:
            raise ValueError(
                "SharedPrefixTextEncoder: class_specific_ctx=True (CoOp's CSC) is not supported: every class has its "
                "own context, so no prefix is shared by the classes; use the client's own text encoder for CSC"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"SharedPrefixTextEncoder: dtype must be a floating-point torch.dtype, got {dtype!r}")
        n_layers = len(clip_model.transformer.resblocks)
        context_length = clip_model.positional_embedding.shape[0]
        if not isinstance(n_ctx, int) or not 1 <= n_ctx <= context_length - 3:
            raise ValueError(f"n_ctx must be in [1, {context_length - 3}] (SOS, name and EOT need room), got {n_ctx}")
        if not 0 <= deep_prompts <= n_layers:
            raise ValueError(f"deep_prompts must be in [0, {n_layers}] (the text tower has {n_layers} layers)")
        if unshared_qkv and deep_prompts == n_layers:
            # Every layer would then take the prompt rows' k/v from prompt_k/v, so their hidden state (ctx, and what
            # prompt_q adds to it) would never be read: parameters without effect, and a DDP error on unused ones.
            raise ValueError(
                f"unshared_qkv needs deep_prompts < {n_layers} (the number of layers): with unshared prompts at every "
                "layer, ctx and prompt_q would not affect the output"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        self.family = family
        self.n_ctx = n_ctx
        self.deep_prompts = deep_prompts
        self.unshared_qkv = unshared_qkv
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint
        self.context_length = context_length
        self.dtype = _model_dtype(clip_model, family) if dtype is None else dtype
        self.text_pool_type = getattr(clip_model, "text_pool_type", "argmax")

        # The frozen text tower, registered (shared, not copied) so that .to() moves it with the prompts.
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        for p in self.parameters():  # only the tower's so far: the prompts are created below
            p.requires_grad_(False)

        tok = _tokenizer()
        self._sot, self._eot = tok.sot_token_id, tok.eot_token_id
        self._x_id = tok.encode("X")[0]
        if self.token_embedding.weight.shape[0] <= max(self._sot, self._eot):
            raise ValueError(
                f"SharedPrefixTextEncoder uses CLIP's BPE vocabulary (49408 tokens); the model's token_embedding has "
                f"{self.token_embedding.weight.shape[0]} rows"
            )
        self._suffix_cache: dict[str, tuple[int, ...]] = {}
        self._plan_cache: tuple[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None

        device = self.positional_embedding.device
        width = self.positional_embedding.shape[1]
        if ctx_init is None:
            ctx = torch.empty(n_ctx, width, dtype=self.dtype, device=device).normal_(std=0.02)
        else:
            ids = tok(ctx_init, context_length=context_length)[0]
            n_init = int((ids == self._eot).nonzero()[0, 0]) - 1
            if n_init != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} tokenizes to {n_init} tokens but n_ctx={n_ctx}")
            with torch.no_grad():
                ctx = self.token_embedding(ids[1 : 1 + n_ctx].to(device)).to(self.dtype)
        self.ctx = nn.Parameter(ctx)
        self.deep_ctx: nn.Parameter | None = None
        self.prompt_q: nn.Parameter | None = None
        self.prompt_k: nn.Parameter | None = None
        self.prompt_v: nn.Parameter | None = None
        if unshared_qkv or deep_prompts >= 2:
            with torch.no_grad():
                rows = torch.stack(self._prefix_states())[:, 0, 1:]  # [layers, n_ctx, W], entering each layer
            if unshared_qkv:
                depth = max(deep_prompts, 1)
                self.prompt_q, self.prompt_k, self.prompt_v = (nn.Parameter(rows[:depth].clone()) for _ in range(3))
            else:
                self.deep_ctx = nn.Parameter(rows[1:deep_prompts].clone())

    @staticmethod
    def prompt_names() -> tuple[str, ...]:
        """Attribute names of every learnable prompt (those that are None for this configuration included)."""
        return ("ctx", "deep_ctx", "prompt_q", "prompt_k", "prompt_v")

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable prompts present in this configuration, by attribute name (what a checkpoint should hold)."""
        return {n: p for n in self.prompt_names() if (p := getattr(self, n, None)) is not None}

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the prompts (detached), by name: a checkpoint of the size of CoOp's prompt learner, not the tower."""
        return {n: p.detach() for n, p in self.prompt_parameters().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy prompts saved by :meth:`prompt_state_dict` in place; names and shapes must match this configuration."""
        own = self.prompt_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"load_prompt_state_dict: keys do not match this encoder (deep_prompts={self.deep_prompts}, "
                f"unshared_qkv={self.unshared_qkv}): missing {missing}, unexpected {unexpected}"
            )
        for name, param in own.items():
            value = state[name]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"load_prompt_state_dict: {name} must have shape {list(param.shape)}, got {got}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])

    # ----------------------------------------------------------------------------------------------- tokenization
    def _suffix_tokens(self, classnames: Sequence[str]) -> list[tuple[int, ...]]:
        """Each name's tokens after the prefix, up to and including EOT (tokenized once per name, then cached)."""
        missing = list(dict.fromkeys(n for n in classnames if n not in self._suffix_cache))
        if missing:
            for name in missing:
                if not isinstance(name, str):
                    raise TypeError(f"class names must be str, got {type(name).__name__}: {name!r}")
            p = 1 + self.n_ctx
            tokens = _tokenizer()(_prompt_texts(missing, self.n_ctx), context_length=self.context_length)
            for name, row in zip(missing, tokens, strict=True):
                if row[0] != self._sot or not bool((row[1:p] == self._x_id).all()):
                    raise ValueError(f"prompt for class {name!r} does not tokenize to [SOS] + {self.n_ctx} 'X' tokens")
                eot = int((row == self._eot).nonzero()[0, 0])
                self._suffix_cache[name] = tuple(row[p : eot + 1].tolist())
        return [self._suffix_cache[n] for n in classnames]

    def _plan(self, classnames: Sequence[str]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Chunks ``(class indices [c], suffix ids [c, L])`` grouped by length, and the permutation back to input order.

        The plan of the last class list is kept: a fixed class set (full-class softmax, evaluation) re-plans nothing.
        """
        key = tuple(classnames)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1], self._plan_cache[2]
        by_length: dict[int, list[int]] = {}
        suffixes = self._suffix_tokens(key)
        for i, s in enumerate(suffixes):
            by_length.setdefault(len(s), []).append(i)
        chunks = []
        for length in sorted(by_length):
            idx = by_length[length]
            step = self.chunk_size or len(idx)
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                chunks.append((torch.tensor(part), torch.tensor([suffixes[i] for i in part]).view(len(part), length)))
        order = torch.cat([idx for idx, _ in chunks]) if chunks else torch.empty(0, dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        self._plan_cache = (key, chunks, inverse)
        return chunks, inverse

    # ----------------------------------------------------------------------------------------------- call-time prompts
    def _call_prompts(
        self, ctx: torch.Tensor | None, deep_prompts
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """Validate the call's prompts: ``(ctx [b, n, W], deep [b', d-1, n, W] or None, images, per_image)``."""
        width = self.positional_embedding.shape[1]
        row_shape = (self.n_ctx, width)
        if ctx is None:
            ctx = self.ctx
        if not isinstance(ctx, torch.Tensor):
            raise TypeError(f"ctx must be a tensor [n_ctx, W] or [B, n_ctx, W], got {type(ctx).__name__}")
        if ctx.dim() not in (2, 3) or tuple(ctx.shape[-2:]) != row_shape:
            raise ValueError(
                f"ctx must be [n_ctx, W] = {list(row_shape)} or per image [B, {self.n_ctx}, {width}], got "
                f"{list(ctx.shape)}"
            )
        per_image = ctx.dim() == 3
        ctx = ctx if per_image else ctx[None]
        if deep_prompts is None:
            deep = None if self.deep_ctx is None else self.deep_ctx[None]
        else:
            if self.unshared_qkv:
                raise ValueError(
                    "deep_prompts (shared-token deep prompts) cannot be passed to an encoder built with "
                    "unshared_qkv=True (its prompt_q/k/v are the deep prompts)"
                )
            if isinstance(deep_prompts, (list, tuple)):
                if not deep_prompts or not all(isinstance(t, torch.Tensor) for t in deep_prompts):
                    raise TypeError("deep_prompts as a list must hold one or more tensors [n_ctx, W]")
                shapes = {tuple(t.shape) for t in deep_prompts}
                if shapes != {row_shape}:
                    raise ValueError(f"deep_prompts entries must all be [n_ctx, W] = {list(row_shape)}, got {shapes}")
                deep_prompts = torch.stack(list(deep_prompts))
            if not isinstance(deep_prompts, torch.Tensor):
                raise TypeError(
                    f"deep_prompts must be a tensor or a list of tensors, got {type(deep_prompts).__name__}"
                )
            n_layers = len(self.transformer.resblocks)
            if (
                deep_prompts.dim() not in (3, 4)
                or tuple(deep_prompts.shape[-2:]) != row_shape
                or not 1 <= deep_prompts.shape[-3] <= n_layers - 1
            ):
                raise ValueError(
                    f"deep_prompts must be [d - 1, n_ctx, W] (layers 1..d-1, d - 1 in [1, {n_layers - 1}]) or per "
                    f"image [B, d - 1, n_ctx, W], with n_ctx, W = {list(row_shape)}; got {list(deep_prompts.shape)}"
                )
            per_image = per_image or deep_prompts.dim() == 4
            deep = deep_prompts if deep_prompts.dim() == 4 else deep_prompts[None]
        images = max(ctx.shape[0], 1 if deep is None else deep.shape[0])
        for name, t in (("ctx", ctx), ("deep_prompts", deep)):
            if t is not None and t.shape[0] not in (1, images):
                raise ValueError(
                    f"per-image ctx and deep_prompts must have the same batch size; {name} has {t.shape[0]}, "
                    f"expected {images}"
                )
        if images < 1:
            raise ValueError(f"per-image prompts need at least one image, got ctx {list(ctx.shape)}")
        return ctx, deep, images, per_image

    # ----------------------------------------------------------------------------------------------- prefix pass
    def _prefix_states(self) -> list[torch.Tensor]:
        """Hidden states ``[1, P, W]`` of the prefix entering each layer (with this module's prompts)."""
        states: list[torch.Tensor] = []
        deep = None if self.deep_ctx is None else self.deep_ctx[None]
        self._prefix_pass(self.ctx[None], deep, 1, states)
        return states

    def _prefix_pass(
        self, ctx: torch.Tensor, deep: torch.Tensor | None, images: int, states: list[torch.Tensor] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run ``[SOS, ctx]`` once per image (causal) and return each layer's prefix keys/values ``[b, H, P, D]``.

        ctx: ``[1 or b, n_ctx, W]``; deep: ``[1 or b, d - 1, n_ctx, W]`` or None; b = images.
        """
        dtype = self.dtype
        p = 1 + self.n_ctx
        width = ctx.shape[-1]
        sos = self.token_embedding.weight[self._sot].to(dtype)
        h = torch.cat([sos.expand(ctx.shape[0], 1, width), ctx.to(dtype)], dim=1)
        h = (h + self.positional_embedding[:p].to(dtype)).expand(images, p, width)
        blocks = self.transformer.resblocks
        kv = []
        for layer, blk in enumerate(blocks):
            if deep is not None and 1 <= layer <= deep.shape[1]:
                h = torch.cat([h[:, :1], deep[:, layer - 1].to(dtype).expand(images, -1, -1)], dim=1)
            if states is not None:
                states.append(h)
            attn = blk.attn
            weight, bias = _in_proj(attn, dtype)
            a = layer_norm(blk.ln_1, h)
            if self.prompt_q is not None and layer < self.prompt_q.shape[0]:
                prompts = (
                    layer_norm(blk.ln_1, pr[layer].to(dtype)) for pr in (self.prompt_q, self.prompt_k, self.prompt_v)
                )
                (q, k, v), rows = prompt_qkv(a[:, :1], weight, bias, attn.num_heads, *prompts)
                q, k, v = (
                    torch.cat([t, r[None].expand(images, -1, -1, -1)], 2) for t, r in zip((q, k, v), rows, strict=True)
                )
            else:
                (q, k, v), _ = prompt_qkv(a, weight, bias, attn.num_heads)
            kv.append((k, v))
            if layer == len(blocks) - 1 and states is None:
                break  # the last layer's prefix outputs reach nothing: suffixes only read its keys/values
            o = prompt_attention(q, k, v, causal=True)
            h = residual_tail(blk, h, o)
        return kv

    # ----------------------------------------------------------------------------------------------- suffix pass
    def _encode_suffixes(self, ids: torch.Tensor, images: int, *prefix_kv: torch.Tensor) -> torch.Tensor:
        """ids ``[c, L]`` (each ending in EOT), prefix ``k, v`` per layer (flattened; ``[H, P, D]`` shared, or
        ``[images, H, P, D]`` per image) -> features ``[images * c, embed_dim]`` (image-major)."""
        dtype = self.dtype
        p, (n_cls, length) = 1 + self.n_ctx, ids.shape
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding[p : p + length].to(dtype)
        if images > 1:
            x = x.expand(images, n_cls, length, x.shape[-1]).reshape(images * n_cls, length, x.shape[-1])
        blocks = self.transformer.resblocks
        for layer, blk in enumerate(blocks):
            attn = blk.attn
            weight, bias = _in_proj(attn, dtype)
            (q, k, v), _ = prompt_qkv(layer_norm(blk.ln_1, x), weight, bias, attn.num_heads)
            pk, pv = prefix_kv[2 * layer], prefix_kv[2 * layer + 1]
            if images > 1:
                # Every (image, class) sequence reads its image's prefix: [b, H, P, D] -> [b * c, H, P, D].
                pk, pv = (t[:, None].expand(-1, n_cls, -1, -1, -1).flatten(0, 1) for t in (pk, pv))
            last = layer == len(blocks) - 1
            if last:
                # Only the EOT row (every suffix's last token) is pooled; it attends to all keys, so no mask is needed.
                q, x = q[:, :, -1:], x[:, -1:]
            o = prompt_attention(q, k, v, pk, pv, causal=not last)
            x = residual_tail(blk, x, o)
        return _project(self.text_projection, layer_norm(self.ln_final, x[:, -1]))

    def forward(
        self,
        classnames: Sequence[str],
        ctx: torch.Tensor | None = None,
        deep_prompts: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """classnames: C strings -> text features ``[C, embed_dim]`` (unnormalised), in the order given; with
        per-image ``ctx`` ``[B, n_ctx, W]`` (or per-image ``deep_prompts``) ``[B, C, embed_dim]``."""
        if isinstance(classnames, str):
            raise TypeError("forward expects a sequence of class names, got a single str")
        ctx, deep, images, per_image = self._call_prompts(ctx, deep_prompts)
        chunks, inverse = self._plan(classnames)
        if not chunks:
            raise ValueError("forward needs at least one class name")
        device = self.positional_embedding.device
        kv = self._prefix_pass(ctx, deep, images)
        prefix_kv = [t if images > 1 else t[0] for pair in kv for t in pair]
        outs = []
        for _, ids in chunks:
            ids = ids.to(device, non_blocking=True)
            if self.checkpoint and torch.is_grad_enabled():
                # Only ids are kept per chunk; backward recomputes one chunk's activations at a time.
                out = torch.utils.checkpoint.checkpoint(
                    self._encode_suffixes, ids, images, *prefix_kv, use_reentrant=False
                )
            else:
                out = self._encode_suffixes(ids, images, *prefix_kv)
            outs.append(out.view(images, ids.shape[0], -1))
        features = torch.cat(outs, dim=1)[:, inverse.to(device)]
        return features if per_image else features[0]

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, n_ctx={self.n_ctx}, deep_prompts={self.deep_prompts}, "
            f"unshared_qkv={self.unshared_qkv}, dtype={self.dtype}, chunk_size={self.chunk_size}, "
            f"checkpoint={self.checkpoint}"
        )
