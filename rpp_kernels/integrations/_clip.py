"""CLIP residual blocks of both families, seen through one interface.

Two families of CLIP towers are in use:

* open_clip's (``open_clip.transformer.ResidualAttentionBlock``): ``batch_first`` transformers, the causal mask on
  the model (``attn_mask``, passed to each block), layer scale (``ls_1``/``ls_2``), GELU.
* OpenAI's ``clip/model.py`` (the ``clip`` package, published as ``clip-anytorch``, and the identical copies vendored
  by CoOp, CoCoOp, MaPLe, PromptSRC, POMP ...): ``[N, B, E]`` transformers, the mask stored on each block
  (``blk.attn_mask``), a LayerNorm that computes in fp32 and casts back, QuickGELU, fp16 weights after ``clip.load``.

OpenAI's classes are recognised by structure, not by import path (every repository has its own copy of the module).
The helpers below compute a block from its parts (``ln_1``, ``attn``, ``ln_2``, ``mlp``) in batch-first layout and in
a chosen dtype: with the block's own dtype they call the block's modules, so the result equals the block's forward;
with another dtype the weights are cast on the fly (``Tensor.to`` of the same dtype is free and keeps autograd).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "is_openai_block",
    "is_openai_text_model",
    "is_openai_visual",
    "is_open_clip_block",
    "layer_norm",
    "linear",
    "mlp",
    "residual_tail",
]

_BLOCK_PARTS = ("attn", "ln_1", "ln_2", "mlp")


def _has_parts(blk: nn.Module) -> bool:
    return all(hasattr(blk, n) for n in _BLOCK_PARTS) and isinstance(blk.attn, nn.MultiheadAttention)


def is_open_clip_block(blk: nn.Module) -> bool:
    """open_clip's default self-attention block (not its cross-attention variant, not a custom block)."""
    from open_clip.transformer import ResidualAttentionBlock

    return type(blk) is ResidualAttentionBlock and not hasattr(blk, "ln_1_kv")


def is_openai_block(blk: nn.Module) -> bool:
    """OpenAI's ``ResidualAttentionBlock`` by structure: ``attn`` (``nn.MultiheadAttention``), ``ln_1``, ``ln_2``,
    ``mlp`` (``c_fc``, activation, ``c_proj``), an ``attn_mask`` attribute, and the forward ``forward(x)``."""
    if is_open_clip_block(blk) or not _has_parts(blk) or not hasattr(blk, "attn_mask"):
        return False
    mlp_ok = isinstance(blk.mlp, nn.Sequential) and hasattr(blk.mlp, "c_fc") and hasattr(blk.mlp, "c_proj")
    return mlp_ok and not blk.attn.batch_first


def is_openai_text_model(model: nn.Module) -> bool:
    """OpenAI's ``CLIP`` text tower by structure: ``token_embedding``, ``positional_embedding``, ``transformer``
    with ``resblocks`` of OpenAI blocks, ``ln_final`` and ``text_projection`` on the model."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, n) for n in needed) or not hasattr(model.transformer, "resblocks"):
        return False
    return len(model.transformer.resblocks) > 0 and all(is_openai_block(b) for b in model.transformer.resblocks)


def is_openai_visual(visual: nn.Module) -> bool:
    """OpenAI's ``VisionTransformer`` by structure: ``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks`` of OpenAI blocks, ``ln_post`` and ``proj``."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    if not all(hasattr(visual, n) for n in needed) or not hasattr(visual.transformer, "resblocks"):
        return False
    return len(visual.transformer.resblocks) > 0 and all(is_openai_block(b) for b in visual.transformer.resblocks)


def _upcasting(norm: nn.Module) -> bool:
    """Whether the LayerNorm computes in fp32 whatever the input dtype (OpenAI's, open_clip's LayerNormFp32)."""
    from open_clip.transformer import LayerNorm as OpenClipLayerNorm

    return type(norm) is not nn.LayerNorm and type(norm) is not OpenClipLayerNorm


def layer_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, also when ``x`` is in another dtype than the norm's weights (then computed as the norm does:
    in fp32 for the upcasting LayerNorms, else in x's dtype with the affine cast to it)."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dtype == x.dtype or (_upcasting(norm) and weight.dtype == torch.float32):
        return norm(x)
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"cannot run {type(norm).__name__} in {x.dtype} (its weights are {weight.dtype})")
    dtype = torch.float32 if _upcasting(norm) else x.dtype
    bias = None if norm.bias is None else norm.bias.to(dtype)
    return F.layer_norm(x.to(dtype), norm.normalized_shape, weight.to(dtype), bias, norm.eps).to(x.dtype)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the weights cast to x's dtype when they differ."""
    if layer.weight.dtype == x.dtype:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's MLP (``nn.Sequential`` of Linear / activation / LayerNorm) in x's dtype."""
    if not isinstance(module, nn.Sequential):
        return module(x)
    for layer in module:
        if isinstance(layer, nn.Linear):
            x = linear(layer, x)
        elif isinstance(layer, nn.LayerNorm):
            x = layer_norm(layer, x)
        else:
            x = layer(x)
    return x


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H * D]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def residual_tail(blk: nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a CLIP residual block (either family) once attention gave ``o`` ``[B, H, N, D]`` for the rows of
    ``x`` ``[B, N, W]``: output projection and attention residual (layer scale where the block has it), then the MLP
    residual. Computed in x's dtype."""
    ls_1, ls_2 = getattr(blk, "ls_1", None), getattr(blk, "ls_2", None)
    a = linear(blk.attn.out_proj, _merge_heads(o))
    x = x + (a if ls_1 is None else ls_1(a))
    m = mlp(blk.mlp, layer_norm(blk.ln_2, x))
    return x + (m if ls_2 is None else ls_2(m))
