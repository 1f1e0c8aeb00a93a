"""Deep vision prompts for an open_clip ``VisionTransformer``, patched in place (and removable), Liger style.

Explicit deep prompting (VPT-deep, RPP) inserts ``P`` prompt rows after the class token before each prompted block
and throws the prompt rows' outputs away at the next block, which inserts fresh ones. Two consequences drive this
implementation:

* The prompt rows do not depend on the image, so their keys/values are projected once per layer (``[H, P, D]``) and
  read by every sample through :func:`rpp_kernels.attention.prompt_attention` with batch stride 0; the explicit path
  projects them ``B`` times and stores ``B`` copies for backward.
* Nothing reads a prompt row's output, so its query, attention row and MLP are never computed: only the class token
  and the patch tokens go through the block. Prompts are present in blocks ``0 .. depth-1``; later blocks see only
  the image tokens (with ``depth == layers`` this is exactly VPT-deep, whose last prompt outputs are discarded).

Two prompt kinds per prompted block ``l``:

* shared tokens (VPT-deep): one tensor ``tokens[l]: [P, width]``; keys and values come from ``ln_1(tokens[l])``.
* unshared (RPP): separate ``k[l]`` and ``v[l]: [P, width]``; the keys come from ``ln_1(k[l])`` and the values from
  ``ln_1(v[l])``. RPP also has a query prompt per layer, but a query only produces the prompt row's output, which no
  later computation reads here, so it would receive no gradient; it is not created (an unused parameter would also
  make DDP fail).

Usage::

    prompts = apply_vision_prompts(clip_model.visual, num_prompts=4, depth=9, unshared_qkv=True)
    optimizer = torch.optim.AdamW(prompts.parameters())   # the caller owns the prompt module
    ...
    remove_vision_prompts(clip_model.visual)                # original forwards back
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn as nn

from rpp_kernels.attention import prompt_attention, prompt_qkv
from rpp_kernels.text import residual_tail

__all__ = ["VisionPrompts", "apply_vision_prompts", "encode_image_explicit", "remove_vision_prompts"]

_PATCHED_ATTR = "_rpp_prompted"
_PROMPTS_ATTR = "_rpp_vision_prompts"


class VisionPrompts(nn.Module):
    """Learnable deep vision prompts: ``depth`` layers of ``num_prompts`` rows of size ``width``.

    Shared (``unshared_qkv=False``): ``tokens[l]: [P, width]``. Unshared: ``k[l]``, ``v[l]: [P, width]``.
    ``enabled=False`` (see :meth:`disabled`) makes the patched blocks behave exactly like the original ones.
    """

    def __init__(
        self,
        width: int,
        num_prompts: int,
        depth: int,
        *,
        unshared_qkv: bool = True,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"VisionPrompts: num_prompts must be >= 1, got {num_prompts}")
        if depth < 1:
            raise ValueError(f"VisionPrompts: depth must be >= 1, got {depth}")
        self.width, self.num_prompts, self.depth, self.unshared_qkv = width, num_prompts, depth, unshared_qkv
        self.enabled = True

        def make() -> nn.ParameterList:
            rows = [torch.randn(num_prompts, width, device=device, dtype=dtype) * init_std for _ in range(depth)]
            return nn.ParameterList([nn.Parameter(r) for r in rows])

        if unshared_qkv:
            self.k, self.v = make(), make()
        else:
            self.tokens = make()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prompt rows ``([P, width], [P, width])`` of block ``index`` (before ``ln_1``)."""
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

    def extra_repr(self) -> str:
        kind = "unshared k/v (RPP)" if self.unshared_qkv else "shared tokens (VPT-deep)"
        return f"width={self.width}, num_prompts={self.num_prompts}, depth={self.depth}, {kind}"


def _prompted_block_forward(block: nn.Module, prompts: VisionPrompts, index: int):
    """A forward for one ``ResidualAttentionBlock`` that attends to layer ``index``'s prompts (batch-shared K/V)."""
    original = block.forward
    attn: nn.MultiheadAttention = block.attn

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if not prompts.enabled or k_x is not None or v_x is not None or attn_mask is not None:
            return original(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        h = self.ln_1(q_x)
        key_rows, value_rows = prompts.layer(index)
        # Prompt rows in the query slot are projected but never used: their outputs are not computed. Shared tokens
        # are passed once (prompt_qkv then uses them for q, k and v); unshared ones fill the q slot with the key rows.
        rows = (self.ln_1(key_rows.to(h.dtype)),)
        if value_rows is not key_rows:
            rows = (rows[0], rows[0], self.ln_1(value_rows.to(h.dtype)))
        # Under autocast h is in the autocast dtype while the frozen weights stay fp32; prompt_qkv wants one dtype.
        weight = attn.in_proj_weight.to(h.dtype)
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias.to(h.dtype)
        (q, k, v), (_, prefix_k, prefix_v) = prompt_qkv(h, weight, bias, attn.num_heads, *rows)
        return residual_tail(self, q_x, prompt_attention(q, k, v, prefix_k, prefix_v))

    return types.MethodType(forward, block)


def apply_vision_prompts(
    visual: nn.Module,
    num_prompts: int,
    depth: int | None = None,
    *,
    unshared_qkv: bool = True,
    init_std: float = 0.02,
) -> VisionPrompts:
    """Patch the first ``depth`` blocks of an open_clip ``VisionTransformer`` in place to attend to deep prompts.

    visual: ``open_clip.transformer.VisionTransformer`` with default ``ResidualAttentionBlock`` s (``batch_first``).
    Returns the new :class:`VisionPrompts` (parameters on the model's device and dtype); the model does not own it,
    so its ``state_dict`` is unchanged. ``depth=None`` prompts every block. Undo with :func:`remove_vision_prompts`.
    Equivalent explicit computation of prompted block ``l`` (shared tokens; unshared: keys from ``k[l]``, values from
    ``v[l]``)::

        x = torch.cat([x[:, :1], tokens[l].expand(B, P, W), x[:, 1:]], dim=1)
        x = block(x)
        x = torch.cat([x[:, :1], x[:, 1 + P:]], dim=1)
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"apply_vision_prompts: expected open_clip VisionTransformer, got {type(visual).__name__}")
    if getattr(visual, _PROMPTS_ATTR, None) is not None:
        raise ValueError("apply_vision_prompts: this VisionTransformer already has prompts; remove them first")
    blocks = visual.transformer.resblocks
    depth = len(blocks) if depth is None else depth
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"apply_vision_prompts: depth must be in [1, {len(blocks)}] (number of blocks), got {depth}")
    if not visual.transformer.batch_first:
        raise ValueError("apply_vision_prompts: only batch_first transformers are supported (open_clip >= 2.24)")
    for i, block in enumerate(blocks[:depth]):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise TypeError(
                f"apply_vision_prompts: block {i} is {type(block).__name__}; only open_clip's default "
                "ResidualAttentionBlock (nn.MultiheadAttention, no cross-attention) is supported"
            )
        if not block.attn._qkv_same_embed_dim:
            raise TypeError(f"apply_vision_prompts: block {i} has separate q/k/v projection weights (unsupported)")
    param = visual.class_embedding
    prompts = VisionPrompts(
        param.shape[-1],
        num_prompts,
        depth,
        unshared_qkv=unshared_qkv,
        init_std=init_std,
        device=param.device,
        dtype=param.dtype,
    )
    for i, block in enumerate(blocks[:depth]):
        setattr(block, _PATCHED_ATTR, True)
        block.forward = _prompted_block_forward(block, prompts, i)
    # A plain attribute (object.__setattr__), not a submodule: the model's state_dict and parameters stay unchanged.
    object.__setattr__(visual, _PROMPTS_ATTR, prompts)
    return prompts


def remove_vision_prompts(visual: nn.Module) -> None:
    """Undo :func:`apply_vision_prompts`: restore the original block forwards (no-op on an unpatched model)."""
    for block in visual.transformer.resblocks:
        if hasattr(block, _PATCHED_ATTR):
            del block.forward  # drop the instance attribute; the class's forward is visible again
            delattr(block, _PATCHED_ATTR)
    if _PROMPTS_ATTR in visual.__dict__:
        object.__delattr__(visual, _PROMPTS_ATTR)


def encode_image_explicit(visual: nn.Module, images: torch.Tensor, prompts: VisionPrompts) -> torch.Tensor:
    """The reference the patched model equals: prompt rows concatenated after the class token, per sample.

    images: ``[B, 3, H, W]`` -> ``[B, output_dim]`` like ``visual(images)``. Before prompted block ``l`` the ``P``
    prompt rows are inserted after the class token (shared tokens) and the block runs its original forward on the
    longer sequence; the prompt rows are dropped after the block. Unshared prompts cannot be written as extra tokens
    (their keys and values come from different rows), so that block runs ``nn.MultiheadAttention`` with the key and
    value sequences concatenated explicitly. Costs ``B`` copies of every prompt row's projections and activations.
    """
    with prompts.disabled():
        x = visual._embeds(images)
        for i, block in enumerate(visual.transformer.resblocks):
            if i >= prompts.depth:
                x = block(x)
                continue
            batch = x.shape[0]
            key_rows, value_rows = (r.to(x.dtype).expand(batch, -1, -1) for r in prompts.layer(i))
            if not prompts.unshared_qkv:
                x = block(torch.cat([x[:, :1], key_rows, x[:, 1:]], dim=1))
                x = torch.cat([x[:, :1], x[:, 1 + prompts.num_prompts :]], dim=1)
                continue
            h = block.ln_1(x)
            keys = torch.cat([h[:, :1], block.ln_1(key_rows), h[:, 1:]], dim=1)
            values = torch.cat([h[:, :1], block.ln_1(value_rows), h[:, 1:]], dim=1)
            x = x + block.ls_1(block.attn(h, keys, values, need_weights=False)[0])
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        pooled, _ = visual._pool(x)
        return pooled if visual.proj is None else pooled @ visual.proj
