"""rpp_kernels.text: encode many class prompts that share a learnable prefix, computing the prefix once.

A CoOp/POMP class prompt is ``[SOS] ctx_1..ctx_n <class name> . [EOT] <pad...>`` run through CLIP's causal text
transformer. Under the causal mask the prefix rows ``[SOS, ctx_1..ctx_n]`` never see the class name, so their hidden
states (and keys/values) are the same for every class at every layer, and rows after EOT never reach EOT.
:class:`SharedPrefixTextEncoder` therefore runs the prefix once at batch 1, and runs only the class suffixes
(name tokens + ``.`` + EOT) batched over classes, attending to the prefix keys/values through
:func:`rpp_kernels.attention.prompt_attention`. :func:`encode_text_naive` is the explicit 77-token computation that
it equals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, text_global_pool

from rpp_kernels.attention import prompt_attention, prompt_qkv

__all__ = ["SharedPrefixTextEncoder", "encode_text_naive"]

_TOKENIZER: SimpleTokenizer | None = None


def _tokenizer() -> SimpleTokenizer:
    # open_clip.tokenize's tokenizer: loading the BPE vocabulary takes ~0.5 s, so build it once on first use.
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def _prompt_texts(classnames: Sequence[str], n_ctx: int) -> list[str]:
    """The CoOp/POMP prompt strings whose rows 1..n_ctx are replaced by the learned context."""
    return ["X " * n_ctx + name + "." for name in classnames]


def _check_text_tower(clip_model: nn.Module) -> None:
    """Raise a clear error for text towers whose computation differs from the one both encoders implement."""
    if not isinstance(clip_model, CLIP):
        raise TypeError(
            f"SharedPrefixTextEncoder needs an open_clip.model.CLIP (token_embedding, transformer, ln_final, "
            f"text_projection on the model), got {type(clip_model).__name__}"
        )
    if clip_model.attn_mask is None:
        raise ValueError("SharedPrefixTextEncoder needs a causal text tower; this one has no attn_mask")
    eot = _tokenizer().eot_token_id
    pool, eos_id = clip_model.text_pool_type, getattr(clip_model, "text_eos_id", None)
    if pool not in ("argmax", "eos") or (pool == "eos" and eos_id != eot):
        raise ValueError(
            f"SharedPrefixTextEncoder pools the EOT row: needs text_pool_type 'argmax', or 'eos' with eos_id={eot}; "
            f"got text_pool_type={pool!r}, text_eos_id={eos_id}"
        )
    for i, blk in enumerate(clip_model.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            raise TypeError(
                f"resblocks[{i}] is a {type(blk).__name__}; only open_clip's ResidualAttentionBlock is supported"
            )
        if blk.attn.dropout != 0.0 or blk.attn.in_proj_weight is None:
            raise ValueError(f"resblocks[{i}].attn needs dropout 0 and a packed in_proj_weight")


def _project(clip_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``text_projection`` as open_clip applies it: a matrix, an ``nn.Linear`` or nothing."""
    proj = clip_model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, E]`` -> ``[B, H, N, D]``."""
    b, n, e = t.shape
    return t.view(b, n, heads, e // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H * D]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def residual_tail(blk: ResidualAttentionBlock, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of an open_clip ``ResidualAttentionBlock`` once attention gave ``o`` ``[B, H, N, D]`` for the rows of
    ``x`` ``[B, N, W]``: the output projection and attention residual, then the MLP residual."""
    x = x + blk.ls_1(blk.attn.out_proj(_merge_heads(o)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def encode_text_naive(
    clip_model: nn.Module,
    classnames: Sequence[str],
    ctx: torch.Tensor,
    *,
    deep_ctx: torch.Tensor | None = None,
    prompt_q: torch.Tensor | None = None,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit CoOp/POMP encoding, 77 tokens per class: the reference :class:`SharedPrefixTextEncoder` equals.

    ctx: ``[n, W]``; deep_ctx: ``[d - 1, n, W]`` (rows 1..n of the hidden state replaced at layers 1..d-1);
    prompt_q/k/v: ``[d, n, W]`` (rows 1..n get their q, k, v from ``ln_1(prompt_*[l])`` at layers 0..d-1).
    Returns ``[C, embed_dim]``, unnormalised. Equivalent to ``clip_model.encode_text(tokens)`` with the token
    embeddings of rows 1..n replaced by ``ctx``, where ``tokens = open_clip.tokenize(["X " * n + name + "."])``;
    layers without unshared prompts run open_clip's own block.
    """
    n_ctx = ctx.shape[0]
    dtype = clip_model.transformer.get_cast_dtype()
    tokens = _tokenizer()(_prompt_texts(classnames, n_ctx), context_length=clip_model.context_length)
    tokens = tokens.to(clip_model.positional_embedding.device)
    n_cls, p = tokens.shape[0], 1 + n_ctx

    def with_prompt_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :1], rows.to(t.dtype).expand(n_cls, -1, -1), t[:, p:]], dim=1)

    x = with_prompt_rows(clip_model.token_embedding(tokens).to(dtype), ctx)
    x = x + clip_model.positional_embedding.to(dtype)
    batch_first = clip_model.transformer.batch_first
    for layer, blk in enumerate(clip_model.transformer.resblocks):
        if deep_ctx is not None and 1 <= layer <= deep_ctx.shape[0]:
            x = with_prompt_rows(x, deep_ctx[layer - 1])
        if prompt_q is None or layer >= prompt_q.shape[0]:
            y = blk(x if batch_first else x.transpose(0, 1), attn_mask=clip_model.attn_mask)
            x = y if batch_first else y.transpose(0, 1)
            continue
        attn = blk.attn
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        rows = [
            F.linear(blk.ln_1(pr[layer].to(dtype)), w, b)
            for pr, w, b in zip(
                (prompt_q, prompt_k, prompt_v), attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3), strict=True
            )
        ]
        q, k, v = (_split_heads(t, attn.num_heads) for t in with_prompt_rows(qkv, torch.cat(rows, -1)).chunk(3, -1))
        mask = clip_model.attn_mask.to(x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = residual_tail(blk, x, o)
    x = clip_model.ln_final(x)
    eos_id = getattr(clip_model, "text_eos_id", None)
    pooled = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=eos_id)
    return _project(clip_model, pooled)


class SharedPrefixTextEncoder(nn.Module):
    """Encode class prompts ``[SOS] ctx <name> . [EOT]`` with the prefix ``[SOS] ctx`` computed once for all classes.

    ``forward(classnames) -> [C, embed_dim]`` (unnormalised) equals :func:`encode_text_naive` with this module's
    prompts: tokenize ``"X " * n_ctx + name + "."``, replace rows 1..n_ctx of the token embeddings by ``ctx``, add
    ``positional_embedding``, run ``transformer`` with the causal mask, ``ln_final``, take the EOT row, multiply by
    ``text_projection``. The CLIP text tower is frozen (``requires_grad_(False)``); the learnable prompts are:

    - ``ctx`` ``[n_ctx, W]``: the shallow context (layer 0, with positional embeddings), always present.
    - ``deep_ctx`` ``[deep_prompts - 1, n_ctx, W]`` (shared-token deep prompts, ``deep_prompts >= 2`` and
      ``unshared_qkv=False``): rows 1..n_ctx of the hidden state are replaced by ``deep_ctx[l - 1]`` before layer l,
      for l in 1..deep_prompts-1 (no positional embedding, as in VPT-deep/MaPLe). Otherwise None.
    - ``prompt_q``, ``prompt_k``, ``prompt_v`` ``[depth, n_ctx, W]`` with ``depth = max(deep_prompts, 1)``
      (RPP's unshared prompts, ``unshared_qkv=True``): at layers 0..depth-1 the prompt rows' q, k and v are
      ``in_proj(ln_1(prompt_*[l]))`` of that layer's block instead of ``in_proj(ln_1(hidden))``. The prompt rows'
      residual stream is not replaced (it starts from ``ctx`` + positions and adds each layer's attention and MLP
      outputs) and is read by the layers after ``depth``, so ``ctx`` and every ``prompt_*[l]`` reach the output and
      receive gradients (hence ``deep_prompts < layers`` is required here). Otherwise None.

    :meth:`prompt_parameters` returns these by name. New deep/unshared prompts are initialised to the prefix's
    hidden states of the shallow encoder (``deep_ctx[l-1]`` = prompt rows entering layer l, ``prompt_*[l]`` = prompt
    rows entering layer l), so a fresh encoder produces exactly the shallow (CoOp/POMP) encoding. ``ctx`` is
    ``N(0, 0.02)`` or, with ``ctx_init`` (e.g. ``"a photo of a"``, which must tokenize to ``n_ctx`` tokens), its
    token embeddings.

    Class names are tokenized once and cached. A name too long for the context is truncated exactly as open_clip's
    tokenizer truncates (the first ``context_length`` tokens kept, the last one replaced by EOT), so the result still
    equals the naive encoding of the same truncated prompt.

    How: per layer the prefix (``P = 1 + n_ctx`` rows, batch 1, causal within itself) yields keys/values
    ``[H, P, D]``. Suffixes are grouped by exact token length (no padding, EOT is every row's last token) and split
    into chunks of at most ``chunk_size`` classes; each chunk runs the blocks batched, its attention reading the shared
    prefix K/V with batch stride 0 (``prompt_attention(q, k, v, prefix_k, prefix_v, causal=True)``). At the last
    layer only the EOT row's query, attention and MLP are computed.

    Memory model (bytes autograd saves for backward, activations only; width ``W``, element size ``s``): a block keeps
    about ``10 * W * s`` bytes per token it processes (LayerNorm inputs, packed q/k/v ``3W``, attention output, MLP
    hidden ``4W``, ...). Naive: 77 tokens per class, ``77 * 10 * W * s`` bytes per class per layer (ViT-B/16 text,
    fp32, measured: 1.6 MB per class per layer, 19.1 MB per class). Here: ``L`` suffix tokens per class,
    ``L * 10 * W * s`` per class per layer (ImageNet-1K names with n_ctx=16: L = 4.2 on average, measured 74 KB per
    class per layer, 0.89 MB per class), plus the prefix once (``P * 10 * W * s`` per layer, independent of C). Both
    attention backends recompute the suffix attention in backward (``prompt_attention`` saves only q, k, v and the
    prefix); saving the torch backend's concatenated prefix+suffix K/V would add ``2 * (P + L) * W * s`` per token per
    layer, more than doubling the total. With ``checkpoint=True`` each chunk keeps only its token ids until backward,
    which recomputes one chunk at a time: activation memory is then about ``chunk_size * L * 10 * W * s * layers``
    above the prefix, whatever C.
    ``chunk_size=None`` means one chunk per suffix length.
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
    ) -> None:
        super().__init__()
        _check_text_tower(clip_model)
        n_layers = len(clip_model.transformer.resblocks)
        context_length = clip_model.context_length
        if not 1 <= n_ctx <= context_length - 3:
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
        self.n_ctx = n_ctx
        self.deep_prompts = deep_prompts
        self.unshared_qkv = unshared_qkv
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint
        self.context_length = context_length
        self.text_pool_type = clip_model.text_pool_type

        # The frozen text tower, registered so that .to() moves it with the prompts.
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
        self._suffix_cache: dict[str, tuple[int, ...]] = {}
        self._plan_cache: tuple[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None

        dtype = self.transformer.get_cast_dtype()
        device = self.positional_embedding.device
        width = self.positional_embedding.shape[1]
        if ctx_init is None:
            ctx = torch.empty(n_ctx, width, dtype=dtype, device=device).normal_(std=0.02)
        else:
            ids = tok(ctx_init, context_length=context_length)[0]
            n_init = int((ids == self._eot).nonzero()[0, 0]) - 1
            if n_init != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} tokenizes to {n_init} tokens but n_ctx={n_ctx}")
            with torch.no_grad():
                ctx = self.token_embedding(ids[1 : 1 + n_ctx].to(device)).to(dtype)
        self.ctx = nn.Parameter(ctx)
        self.deep_ctx: nn.Parameter | None = None
        self.prompt_q: nn.Parameter | None = None
        self.prompt_k: nn.Parameter | None = None
        self.prompt_v: nn.Parameter | None = None
        if unshared_qkv or deep_prompts >= 2:
            with torch.no_grad():
                rows = torch.stack(self._prefix_states())[:, 1:]  # [layers, n_ctx, W], entering each layer
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

    # ----------------------------------------------------------------------------------------------- tokenization
    def _suffix_tokens(self, classnames: Sequence[str]) -> list[tuple[int, ...]]:
        """Each name's tokens after the prefix, up to and including EOT (tokenized once per name, then cached)."""
        missing = list(dict.fromkeys(n for n in classnames if n not in self._suffix_cache))
        if missing:
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

    # ----------------------------------------------------------------------------------------------- prefix pass
    def _prefix_states(self) -> list[torch.Tensor]:
        """Hidden states ``[P, W]`` of the prefix entering each layer (with this module's prompts)."""
        states: list[torch.Tensor] = []
        self._prefix_pass(states)
        return states

    def _prefix_pass(self, states: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run ``[SOS, ctx]`` once (batch 1, causal) and return each layer's prefix keys/values ``([H, P, D], ...)``."""
        dtype = self.transformer.get_cast_dtype()
        p = 1 + self.n_ctx
        sos = self.token_embedding.weight[self._sot].to(dtype)
        h = torch.cat([sos[None], self.ctx.to(dtype)]) + self.positional_embedding[:p].to(dtype)
        h = h[None]  # [1, P, W]
        blocks = self.transformer.resblocks
        kv = []
        for layer, blk in enumerate(blocks):
            if self.deep_ctx is not None and 1 <= layer <= self.deep_ctx.shape[0]:
                h = torch.cat([h[:, :1], self.deep_ctx[layer - 1].to(dtype)[None]], dim=1)
            if states is not None:
                states.append(h[0])
            attn = blk.attn
            a = blk.ln_1(h)
            if self.prompt_q is not None and layer < self.prompt_q.shape[0]:
                prompts = (blk.ln_1(pr[layer].to(dtype)) for pr in (self.prompt_q, self.prompt_k, self.prompt_v))
                (q, k, v), rows = prompt_qkv(a[:, :1], attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, *prompts)
                q, k, v = (torch.cat([t, r[None]], dim=2) for t, r in zip((q, k, v), rows, strict=True))
            else:
                (q, k, v), _ = prompt_qkv(a, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
            kv.append((k[0], v[0]))
            if layer == len(blocks) - 1 and states is None:
                break  # the last layer's prefix outputs reach nothing: suffixes only read its keys/values
            o = prompt_attention(q, k, v, causal=True)
            h = residual_tail(blk, h, o)
        return kv

    # ----------------------------------------------------------------------------------------------- suffix pass
    def _encode_suffixes(self, ids: torch.Tensor, *prefix_kv: torch.Tensor) -> torch.Tensor:
        """ids ``[c, L]`` (each ending in EOT), prefix ``k, v`` per layer (flattened) -> features ``[c, embed_dim]``."""
        dtype = self.transformer.get_cast_dtype()
        p, length = 1 + self.n_ctx, ids.shape[1]
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding[p : p + length].to(dtype)
        blocks = self.transformer.resblocks
        for layer, blk in enumerate(blocks):
            attn = blk.attn
            (q, k, v), _ = prompt_qkv(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
            last = layer == len(blocks) - 1
            if last:
                # Only the EOT row (every suffix's last token) is pooled; it attends to all keys, so no mask is needed.
                q, x = q[:, :, -1:], x[:, -1:]
            o = prompt_attention(q, k, v, prefix_kv[2 * layer], prefix_kv[2 * layer + 1], causal=not last)
            x = residual_tail(blk, x, o)
        return _project(self, self.ln_final(x[:, -1]))

    def forward(self, classnames: Sequence[str]) -> torch.Tensor:
        """classnames: C strings -> text features ``[C, embed_dim]`` (unnormalised), in the order given."""
        if isinstance(classnames, str):
            raise TypeError("forward expects a sequence of class names, got a single str")
        chunks, inverse = self._plan(classnames)
        if not chunks:
            raise ValueError("forward needs at least one class name")
        device = self.positional_embedding.device
        prefix_kv = [t for pair in self._prefix_pass() for t in pair]
        outs = []
        for _, ids in chunks:
            ids = ids.to(device, non_blocking=True)
            if self.checkpoint and torch.is_grad_enabled():
                # Only ids are kept per chunk; backward recomputes one chunk's activations at a time.
                out = torch.utils.checkpoint.checkpoint(self._encode_suffixes, ids, *prefix_kv, use_reentrant=False)
                outs.append(out)
            else:
                outs.append(self._encode_suffixes(ids, *prefix_kv))
        return torch.cat(outs)[inverse.to(device)]

    def extra_repr(self) -> str:
        return (
            f"n_ctx={self.n_ctx}, deep_prompts={self.deep_prompts}, unshared_qkv={self.unshared_qkv}, "
            f"chunk_size={self.chunk_size}, checkpoint={self.checkpoint}"
        )
