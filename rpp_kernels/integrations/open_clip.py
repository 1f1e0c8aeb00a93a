"""Deep vision prompts for a CLIP ``VisionTransformer`` (open_clip's or OpenAI's), patched in place, Liger style.

Works on open_clip's ``open_clip.transformer.VisionTransformer`` and on OpenAI's ``clip.model.VisionTransformer``
(the ``clip`` package and the copies vendored by CoOp, MaPLe, PromptSRC, POMP ..., recognised by structure).

Semantics (the explicit computation, :func:`encode_image_explicit`). Prompt rows ``tokens[l]`` ``[P, width]`` are
inserted after the class token before block ``l`` for ``l < depth``, replacing the previous block's prompt rows:

* layer 0's rows go through the tower's ``ln_pre`` first (``ln_pre=True``, the default for shared tokens): MaPLe,
  IVLP and PromptSRC concatenate the prompts to the patch embeddings before ``ln_pre``;
* after the last prompted block (``depth - 1``) the prompt rows are **carried** through the remaining blocks as
  ordinary tokens (``carry=True``, the default for shared tokens: VPT-deep, MaPLe, IVLP), or **dropped** (``carry=
  False``, every prompted block's prompt outputs thrown away: with ``depth == layers`` and class-token pooling both are
  the same). ``depth=1`` with ``carry=True`` is VPT-shallow / IVLP-shallow.

What is computed. Prompt rows whose outputs the next block replaces (every prompted block but a carrying last one) do
not depend on the image, so their keys/values are projected once per layer (``[H, P, D]``) and read by every sample
through :func:`rpp_kernels.attention.prompt_attention` with batch stride 0; their queries, attention rows and MLP are
never computed. The explicit path projects them ``B`` times and stores ``B`` copies for backward. A carrying last
block inserts the rows as real tokens (their outputs are needed from there on).

Two prompt kinds per prompted block ``l``:

* shared tokens (VPT, MaPLe; ``unshared_qkv=False``, the default): one tensor ``tokens[l]: [P, width]``; keys and
  values come from ``ln_1(tokens[l])``.
* unshared (RPP, ``unshared_qkv=True``): separate ``k[l]`` and ``v[l]: [P, width]``; the keys come from
  ``ln_1(k[l])`` and the values from ``ln_1(v[l])``. There is no prompt token to carry (``carry`` is False) and, by
  default, no ``ln_pre``. RPP also has a query prompt per layer, but a query only produces the prompt row's output,
  which nothing reads here, so it is not created (an unused parameter would also make DDP fail).

Prompts per call (computed prompts: MaPLe's ``proj(ctx)`` coupling, projected prompts): the patched ``visual``
accepts ``visual(images, prompts=rows)`` with ``rows`` ``[depth, P, width]`` or a list of ``depth`` tensors
``[P, width]`` (shared tokens only); without ``prompts=`` the module's own are used.

Usage::

    prompts = apply_vision_prompts(clip_model.visual, num_prompts=2, depth=9)     # MaPLe / IVLP / VPT-deep
    optimizer = torch.optim.AdamW(prompts.parameters())   # the caller owns the prompt module
    features = clip_model.visual(images)                   # or visual(images, prompts=[shared_ctx, *deep_vision])
    remove_vision_prompts(clip_model.visual)                # original forwards back
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from rpp_kernels.attention import prompt_attention, prompt_qkv
from rpp_kernels.integrations._clip import is_open_clip_block, is_openai_visual, layer_norm, residual_tail

__all__ = ["VisionPrompts", "apply_vision_prompts", "encode_image_explicit", "remove_vision_prompts"]

_PATCHED_ATTR = "_rpp_prompted"
_PROMPTS_ATTR = "_rpp_vision_prompts"


class VisionPrompts(nn.Module):
    """Learnable deep vision prompts: ``depth`` layers of ``num_prompts`` rows of size ``width``.

    Shared (``unshared_qkv=False``): ``tokens[l]: [P, width]``. Unshared: ``k[l]``, ``v[l]: [P, width]``.
    ``carry`` and ``ln_pre`` record the semantics (see the module docstring). ``enabled=False`` (see
    :meth:`disabled`) makes the patched blocks behave exactly like the original ones.
    """

    def __init__(
        self,
        width: int,
        num_prompts: int,
        depth: int,
        *,
        unshared_qkv: bool = False,
        carry: bool | None = None,
        ln_pre: bool | None = None,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"VisionPrompts: num_prompts must be >= 1, got {num_prompts}")
        if depth < 1:
            raise ValueError(f"VisionPrompts: depth must be >= 1, got {depth}")
        if unshared_qkv and carry:
            raise ValueError(
                "VisionPrompts: carry=True needs shared prompt tokens; unshared k/v prompts (unshared_qkv=True) have "
                "no token row to carry into the next blocks"
            )
        self.width, self.num_prompts, self.depth, self.unshared_qkv = width, num_prompts, depth, unshared_qkv
        self.carry = not unshared_qkv if carry is None else carry
        self.ln_pre = not unshared_qkv if ln_pre is None else ln_pre
        self.enabled = True
        self._given: torch.Tensor | None = None  # prompts passed to this call (visual(images, prompts=...))

        def make() -> nn.ParameterList:
            rows = [torch.randn(num_prompts, width, device=device, dtype=dtype) * init_std for _ in range(depth)]
            return nn.ParameterList([nn.Parameter(r) for r in rows])

        if unshared_qkv:
            self.k, self.v = make(), make()
        else:
            self.tokens = make()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prompt rows ``([P, width], [P, width])`` of block ``index`` (before any LayerNorm)."""
        if self._given is not None:
            return self._given[index], self._given[index]
        if self.unshared_qkv:
            return self.k[index], self.v[index]
        return self.tokens[index], self.tokens[index]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the patched model as the original one (e.g. zero-shot with hand-written prompts) inside the block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def given(self, rows: torch.Tensor | Sequence[torch.Tensor] | None) -> Iterator[None]:
        """Use ``rows`` (``[depth, P, width]`` or ``depth`` tensors ``[P, width]``) instead of the parameters."""
        if rows is None:
            yield
            return
        if self.unshared_qkv:
            raise ValueError("prompts per call need shared prompt tokens (these prompts have unshared_qkv=True)")
        if isinstance(rows, (list, tuple)):
            if not all(isinstance(r, torch.Tensor) for r in rows):
                raise TypeError("prompts as a list must hold tensors [P, width]")
            shapes = {tuple(r.shape) for r in rows}
            if len(rows) != self.depth or shapes != {(self.num_prompts, self.width)}:
                raise ValueError(
                    f"prompts must be {self.depth} tensors [P, width] = [{self.num_prompts}, {self.width}], got "
                    f"{len(rows)} of shapes {sorted(shapes)}"
                )
            rows = torch.stack(list(rows))
        if not isinstance(rows, torch.Tensor):
            raise TypeError(
                f"prompts must be a tensor [depth, P, width] or a list of tensors, got {type(rows).__name__}"
            )
        if tuple(rows.shape) != (self.depth, self.num_prompts, self.width):
            raise ValueError(
                f"prompts must be [depth, P, width] = [{self.depth}, {self.num_prompts}, {self.width}], got "
                f"{list(rows.shape)}"
            )
        # Through __dict__: a Parameter passed here must not be registered as one of this module's parameters.
        previous, self.__dict__["_given"] = self._given, rows
        try:
            yield
        finally:
            self.__dict__["_given"] = previous

    def extra_repr(self) -> str:
        kind = "unshared k/v (RPP)" if self.unshared_qkv else "shared tokens (VPT/MaPLe)"
        return (
            f"width={self.width}, num_prompts={self.num_prompts}, depth={self.depth}, {kind}, carry={self.carry}, "
            f"ln_pre={self.ln_pre}"
        )


def _layer_rows(visual: nn.Module, prompts: VisionPrompts, index: int, dtype: torch.dtype):
    """Block ``index``'s key and value rows in ``dtype``, layer 0's through ``ln_pre`` when the prompts say so."""
    key_rows, value_rows = prompts.layer(index)
    same = value_rows is key_rows
    key_rows = key_rows.to(dtype)
    value_rows = key_rows if same else value_rows.to(dtype)
    if index == 0 and prompts.ln_pre:
        key_rows = layer_norm(visual.ln_pre, key_rows)
        value_rows = key_rows if same else layer_norm(visual.ln_pre, value_rows)
    return key_rows, value_rows


def _insert_rows(x: torch.Tensor, rows: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Insert ``rows`` ``[P, W]`` after the class token of every sample of ``x`` (sequence along ``seq_dim``)."""
    batch = x.shape[1 - seq_dim]
    rows = rows.expand(batch, -1, -1) if seq_dim == 1 else rows[:, None].expand(-1, batch, -1)
    return torch.cat([x.narrow(seq_dim, 0, 1), rows, x.narrow(seq_dim, 1, x.shape[seq_dim] - 1)], dim=seq_dim)


def _prompted_block_forward(block: nn.Module, visual: nn.Module, prompts: VisionPrompts, index: int, openai: bool):
    """A forward for one residual block that attends to layer ``index``'s prompts (batch-shared K/V), or, as the
    last prompted block with ``carry``, inserts them as tokens that the next blocks carry."""
    original = block.forward
    attn: nn.MultiheadAttention = block.attn
    carries = prompts.carry and index == prompts.depth - 1
    seq_dim = 0 if openai else 1

    def shared_kv(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.transpose(0, 1) if openai else x  # [B, N, W] (a view for OpenAI's [N, B, W])
        h = layer_norm(self.ln_1, xb)
        key_rows, value_rows = _layer_rows(visual, prompts, index, h.dtype)
        # Prompt rows in the query slot are projected but never used: their outputs are not computed. Shared tokens
        # are passed once (prompt_qkv then uses them for q, k and v); unshared ones fill the q slot with the key rows.
        rows = (layer_norm(self.ln_1, key_rows),)
        if value_rows is not key_rows:
            rows = (rows[0], rows[0], layer_norm(self.ln_1, value_rows))
        # Under autocast (or OpenAI's fp16 weights) h's dtype may differ from the weights'; prompt_qkv wants one dtype.
        weight = attn.in_proj_weight.to(h.dtype)
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias.to(h.dtype)
        (q, k, v), (_, prefix_k, prefix_v) = prompt_qkv(h, weight, bias, attn.num_heads, *rows)
        out = residual_tail(self, xb, prompt_attention(q, k, v, prefix_k, prefix_v))
        return out.transpose(0, 1) if openai else out

    def insert_and_run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        key_rows, _ = _layer_rows(visual, prompts, index, x.dtype)
        return original(_insert_rows(x, key_rows, seq_dim), *args, **kwargs)

    if openai:

        def forward(self, x):
            if not prompts.enabled:
                return original(x)
            return insert_and_run(x) if carries else shared_kv(self, x)

    else:

        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            if not prompts.enabled or k_x is not None or v_x is not None or attn_mask is not None:
                return original(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
            return insert_and_run(q_x) if carries else shared_kv(self, q_x)

    return types.MethodType(forward, block)


def _prompted_visual_forward(visual: nn.Module, module: VisionPrompts):
    """``visual(images, prompts=None)``: the original forward, with the call's prompts when given."""
    original = visual.forward

    def forward(self, x, *args, prompts: torch.Tensor | Sequence[torch.Tensor] | None = None, **kwargs):
        if prompts is not None and getattr(self.transformer, "grad_checkpointing", False):
            raise ValueError(
                "prompts per call cannot be combined with gradient checkpointing (the recomputation in backward "
                "would not see them); disable set_grad_checkpointing or use the prompt module's parameters"
            )
        with module.given(prompts):
            return original(x, *args, **kwargs)

    return types.MethodType(forward, visual)


def _check_visual(visual: nn.Module) -> bool:
    """Validate the tower; returns True for OpenAI's VisionTransformer, False for open_clip's."""
    from open_clip.transformer import VisionTransformer

    for i, block in enumerate(getattr(getattr(visual, "transformer", None), "resblocks", ())):
        if "_rpp_blocks_patched" in block.__dict__:
            raise ValueError(f"apply_vision_prompts: block {i} is patched by patch_blocks; unpatch_blocks first")
    if isinstance(visual, VisionTransformer):
        if not visual.transformer.batch_first:
            raise ValueError("apply_vision_prompts: only batch_first transformers are supported (open_clip >= 2.24)")
        for i, block in enumerate(visual.transformer.resblocks):
            if not is_open_clip_block(block):
                raise TypeError(
                    f"apply_vision_prompts: block {i} is {type(block).__name__}; only open_clip's default "
                    "ResidualAttentionBlock (nn.MultiheadAttention, no cross-attention) is supported"
                )
        openai = False
    elif is_openai_visual(visual):
        openai = True
    else:
        raise TypeError(
            "apply_vision_prompts: expected open_clip VisionTransformer or OpenAI's clip.model.VisionTransformer "
            f"(conv1, class_embedding, ln_pre, transformer.resblocks, ln_post, proj), got {type(visual).__name__}"
        )
    for i, block in enumerate(visual.transformer.resblocks):
        if not block.attn._qkv_same_embed_dim:
            raise TypeError(f"apply_vision_prompts: block {i} has separate q/k/v projection weights (unsupported)")
    return openai


def apply_vision_prompts(
    visual: nn.Module,
    num_prompts: int,
    depth: int | None = None,
    *,
    unshared_qkv: bool = False,
    carry: bool | None = None,
    ln_pre: bool | None = None,
    init_std: float = 0.02,
) -> VisionPrompts:
    """Patch a CLIP ``VisionTransformer`` (open_clip's or OpenAI's) in place to attend to deep prompts.

    Prompts in blocks ``0 .. depth-1`` (``depth=None``: every block). ``carry`` (default: True for shared tokens,
    False for unshared): the last prompted block's prompt outputs continue through the remaining blocks (VPT-deep,
    MaPLe, IVLP) instead of being dropped (the behaviour before carry existed; pass ``carry=False``). ``ln_pre``
    (default: True for shared tokens, False for unshared): layer 0's prompts go through the tower's ``ln_pre``, as in
    MaPLe/IVLP/PromptSRC. See the module docstring for the exact semantics and :func:`encode_image_explicit` for the
    explicit computation. Returns the new :class:`VisionPrompts` (parameters on the model's device and dtype); the
    model does not own it, so its ``state_dict`` is unchanged. ``visual(images, prompts=rows)`` then also takes
    prompts per call. Undo with :func:`remove_vision_prompts`.
    """
    openai = _check_visual(visual)
    if getattr(visual, _PROMPTS_ATTR, None) is not None:
        raise ValueError("apply_vision_prompts: this VisionTransformer already has prompts; remove them first")
    blocks = visual.transformer.resblocks
    depth = len(blocks) if depth is None else depth
    if not isinstance(depth, int) or not 1 <= depth <= len(blocks):
        raise ValueError(f"apply_vision_prompts: depth must be in [1, {len(blocks)}] (number of blocks), got {depth}")
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"VisionPrompts: num_prompts must be >= 1, got {num_prompts!r}")
    param = visual.class_embedding
    prompts = VisionPrompts(
        param.shape[-1],
        num_prompts,
        depth,
        unshared_qkv=unshared_qkv,
        carry=carry,
        ln_pre=ln_pre,
        init_std=init_std,
        device=param.device,
        dtype=param.dtype,
    )
    for i, block in enumerate(blocks[:depth]):
        setattr(block, _PATCHED_ATTR, True)
        block.forward = _prompted_block_forward(block, visual, prompts, i, openai)
    visual.forward = _prompted_visual_forward(visual, prompts)
    # A plain attribute (object.__setattr__), not a submodule: the model's state_dict and parameters stay unchanged.
    object.__setattr__(visual, _PROMPTS_ATTR, prompts)
    return prompts


def remove_vision_prompts(visual: nn.Module) -> None:
    """Undo :func:`apply_vision_prompts`: restore the original forwards (no-op on an unpatched model)."""
    for block in visual.transformer.resblocks:
        if hasattr(block, _PATCHED_ATTR):
            del block.forward  # drop the instance attribute; the class's forward is visible again
            delattr(block, _PATCHED_ATTR)
    if _PROMPTS_ATTR in visual.__dict__:
        object.__delattr__(visual, _PROMPTS_ATTR)
        visual.__dict__.pop("forward", None)


def _embeds(visual: nn.Module, images: torch.Tensor, openai: bool) -> torch.Tensor:
    """Tokens entering block 0, ``[B, N, W]`` (after ``ln_pre``)."""
    if not openai:
        return visual._embeds(images)
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def encode_image_explicit(
    visual: nn.Module, images: torch.Tensor, prompts: VisionPrompts, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference the patched model equals: prompt rows concatenated after the class token, per sample.

    images: ``[B, 3, H, W]`` -> ``[B, output_dim]`` like ``visual(images)`` (``rows``: prompts of this call, as
    ``visual(images, prompts=rows)``). Before prompted block ``l`` the ``P`` prompt rows (layer 0's through ``ln_pre``
    when ``prompts.ln_pre``) are inserted after the class token, replacing the previous block's, and the block runs its
    original forward on the longer sequence; after the last prompted block the rows are carried on (``prompts.carry``)
    or dropped (then they are dropped after every block). Unshared prompts cannot be written as extra tokens (their
    keys and values come from different rows), so that block runs ``nn.MultiheadAttention`` with the key and value
    sequences concatenated explicitly. Costs ``B`` copies of every prompt row's projections and activations.
    """
    openai = _check_visual(visual)
    n_prompts = prompts.num_prompts

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x.transpose(0, 1)).transpose(0, 1) if openai else block(x)

    with prompts.disabled(), prompts.given(rows):
        x = _embeds(visual, images, openai)
        has_rows = False
        for i, block in enumerate(visual.transformer.resblocks):
            if i >= prompts.depth:
                x = run(block, x)
                continue
            if has_rows:
                x = torch.cat([x[:, :1], x[:, 1 + n_prompts :]], dim=1)
            key_rows, value_rows = _layer_rows(visual, prompts, i, x.dtype)
            if not prompts.unshared_qkv:
                x = run(block, _insert_rows(x, key_rows, 1))
                has_rows = prompts.carry
                if not has_rows:
                    x = torch.cat([x[:, :1], x[:, 1 + n_prompts :]], dim=1)
                continue
            batch = x.shape[0]
            h = layer_norm(block.ln_1, x)
            keys = torch.cat([h[:, :1], layer_norm(block.ln_1, key_rows).expand(batch, -1, -1), h[:, 1:]], dim=1)
            values = torch.cat([h[:, :1], layer_norm(block.ln_1, value_rows).expand(batch, -1, -1), h[:, 1:]], dim=1)
            if block.attn.batch_first:
                a = block.attn(h, keys, values, need_weights=False)[0]
            else:
                a = block.attn(h.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), need_weights=False)[0]
                a = a.transpose(0, 1)
            ls_1, ls_2 = getattr(block, "ls_1", nn.Identity()), getattr(block, "ls_2", nn.Identity())
            x = x + ls_1(a)
            x = x + ls_2(block.mlp(layer_norm(block.ln_2, x)))
        if openai:
            pooled = visual.ln_post(x[:, 0, :])
            return pooled if visual.proj is None else pooled @ visual.proj
        pooled, _ = visual._pool(x)
        return pooled if visual.proj is None else pooled @ visual.proj
