"""OpenAI CLIP (``clip/model.py``: the ``clip`` package, published as ``clip-anytorch``, and the copies vendored by
CoOp, CoCoOp, MaPLe, PromptSRC and POMP), recognised by structure, and prompt-taking residual blocks for both CLIP
families.

What works on OpenAI's classes (no conversion to open_clip, parameters shared, fp16 from ``clip.load`` included):

* text: :class:`rpp_kernels.text.SharedPrefixTextEncoder` ``(clip_model, n_ctx)``, with prompts per call
  (``enc(classnames, ctx=..., deep_prompts=...)``);
* vision: :func:`apply_vision_prompts` ``(clip_model.visual, num_prompts, depth)`` (VPT/MaPLe/IVLP semantics by
  default; prompts per call with ``clip_model.visual(images, prompts=...)``);
* blocks: :func:`patch_blocks` ``(model)`` below, for code that builds its own prompt sequences block by block.

``patch_blocks`` swaps every CLIP ``ResidualAttentionBlock``'s ``attn`` for
:class:`rpp_kernels.attention.PromptAttention` (sharing the ``nn.MultiheadAttention``'s parameters: state dict keys,
``requires_grad`` and optimiser state unchanged) and lets the block's forward take prompt rows::

    patch_blocks(clip_model)
    y = block(x, prompt_q=rows)                               # == block(cat(rows, x))[P:], rows batch-shared
    y = block(x, prompt_q=rows, return_prompt_outputs=True)   # == block(cat(rows, x))   (all P + N rows)
    unpatch_blocks(clip_model)

``rows`` ``[P, W]`` are hidden-state rows shared by the batch (the block applies its ``ln_1`` to them as to ``x``);
their keys/values are projected once, not per sample. ``prompt_k``/``prompt_v`` give separate key/value rows (RPP's
unshared prompts; token rows only). The block's causal mask (OpenAI's ``blk.attn_mask``, open_clip's ``attn_mask``
argument) makes prompt row ``i`` see prompt rows ``<= i`` and every token see all prompt rows.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from rpp_kernels.attention import PromptAttention
from rpp_kernels.integrations._clip import (
    is_open_clip_block,
    is_openai_block,
    is_openai_text_model,
    is_openai_visual,
    layer_norm,
)
from rpp_kernels.integrations.open_clip import (
    VisionPrompts,
    apply_vision_prompts,
    encode_image_explicit,
    remove_vision_prompts,
)

__all__ = [
    "VisionPrompts",
    "apply_vision_prompts",
    "encode_image_explicit",
    "is_openai_text_model",
    "is_openai_visual",
    "patch_blocks",
    "remove_vision_prompts",
    "unpatch_blocks",
]

_BLOCKS_ATTR = "_rpp_blocks_patched"  # holds the original nn.MultiheadAttention


def _block_forward(block: nn.Module, openai: bool):
    original = block.forward

    def forward(self, x, *args, prompt_q=None, prompt_k=None, prompt_v=None, return_prompt_outputs=False, **kwargs):
        if prompt_q is None and prompt_k is None and prompt_v is None:
            if return_prompt_outputs:
                raise ValueError("return_prompt_outputs=True needs prompt rows (prompt_q)")
            return original(x, *args, **kwargs)
        if prompt_q is None:
            raise ValueError("prompt_k/prompt_v need prompt_q (alone, prompt_q serves as q, k and v rows)")
        if return_prompt_outputs and (prompt_k is not None or prompt_v is not None):
            raise ValueError(
                "return_prompt_outputs=True needs prompt rows that are tokens (prompt_q alone): unshared k/v "
                "prompts have no hidden state to add the attention output to"
            )
        if openai:
            if args or kwargs:
                raise TypeError("OpenAI's ResidualAttentionBlock.forward takes x only (and the prompt keywords)")
            mask = self.attn_mask
            if mask is not None:
                n = x.shape[0] + prompt_q.shape[0]
                mask = mask[..., -n:, -n:] if mask.shape[-1] > n else mask
                mask = mask.to(dtype=x.dtype, device=x.device)
        else:
            if args or set(kwargs) - {"attn_mask"}:
                raise TypeError("with prompts, open_clip's block takes x and attn_mask only (no cross-attention)")
            mask = kwargs.get("attn_mask")
            mask = None if mask is None else mask.to(x.dtype)
        h = layer_norm(self.ln_1, x)
        rows = [None if r is None else layer_norm(self.ln_1, r.to(h.dtype)) for r in (prompt_q, prompt_k, prompt_v)]
        a = self.attn(
            h, h, h, need_weights=False, attn_mask=mask, prompt_q=rows[0], prompt_k=rows[1], prompt_v=rows[2],
            return_prompt_outputs=return_prompt_outputs,
        )[0]  # fmt: skip
        if return_prompt_outputs:
            seq_dim = 1 if self.attn.batch_first else 0
            batch = x.shape[1 - seq_dim]
            p = prompt_q.to(x.dtype)
            p = p.expand(batch, -1, -1) if seq_dim == 1 else p[:, None].expand(-1, batch, -1)
            x = torch.cat([p, x], dim=seq_dim)
        ls_1, ls_2 = getattr(self, "ls_1", nn.Identity()), getattr(self, "ls_2", nn.Identity())
        x = x + ls_1(a)
        return x + ls_2(self.mlp(layer_norm(self.ln_2, x)))

    return types.MethodType(forward, block)


def patch_blocks(model: nn.Module) -> int:
    """Patch every CLIP residual block in ``model`` (open_clip's or OpenAI's, anywhere in the module tree) so that
    its forward takes prompt rows; returns the number of blocks patched. See the module docstring."""
    blocks = []
    for name, module in model.named_modules():
        openai = is_openai_block(module)
        if not (openai or is_open_clip_block(module)):
            continue
        if hasattr(module, _BLOCKS_ATTR) or hasattr(module, "_rpp_prompted"):
            raise ValueError(f"patch_blocks: {name or 'model'} is already patched (patch_blocks or vision prompts)")
        blocks.append((module, openai))
    if not blocks:
        raise TypeError(f"patch_blocks: no open_clip or OpenAI CLIP ResidualAttentionBlock in {type(model).__name__}")
    for block, openai in blocks:
        original_attn = block.attn
        block.attn = PromptAttention.from_mha(original_attn)  # shares in_proj_weight/bias and out_proj
        object.__setattr__(block, _BLOCKS_ATTR, original_attn)  # a plain attribute: not a second submodule
        block.forward = _block_forward(block, openai)
    return len(blocks)


def unpatch_blocks(model: nn.Module) -> int:
    """Undo :func:`patch_blocks`: the original ``nn.MultiheadAttention`` modules and forwards come back."""
    count = 0
    for module in model.modules():
        original_attn = module.__dict__.get(_BLOCKS_ATTR)
        if original_attn is None:
            continue
        module.attn = original_attn
        object.__delattr__(module, _BLOCKS_ATTR)
        del module.forward
        count += 1
    return count
