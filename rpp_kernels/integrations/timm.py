"""Visual prompts (VPT / SPT) on timm ``VisionTransformer`` models, patched in place and undoable.

Token layout. timm's sequence after the positional embedding is ``[prefix | patches]`` where the prefix is the CLS token
followed by any register tokens (``model.num_prefix_tokens`` rows). Prompts go right after the prefix::

    [CLS, registers..., prompt_0 .. prompt_{P-1}, patch_0 .. patch_{N-1}]

They are inserted into the input of block 0 (after ``pos_embed`` and ``norm_pre``; no positional embedding on prompts),
so the prompts of layer ``i`` live in the space of block ``i``'s input tokens, which is where
:func:`rpp.spt.init_prompts` takes its prototypes from. ``model.num_prefix_tokens`` is left unchanged: prompt rows count
as non-prefix rows, so ``global_pool='avg'`` averages patches *and* prompts, as SPT's MAE head does.

Modes.
- ``shallow``: ``prompt_tokens`` is ``[1, P, dim]``; the prompts are inserted once and flow through the unmodified
  blocks like any other token.
- ``deep``: ``prompt_tokens`` is ``[depth, P, dim]``; block ``i`` sees ``prompt_tokens[i]`` as its prompt rows (VPT-deep
  replaces the prompt rows before every block). Those rows are the same for every sample, so their LayerNorm and Q/K/V
  projection run once per block (:func:`rpp_kernels.attention.prompt_qkv`) and the image tokens attend to them as a
  batch-shared prefix (:func:`rpp_kernels.attention.prompt_attention`). The residual stream holds only the image tokens;
  the prompt rows' outputs are computed only at the last block and only when the head reads them (every ``global_pool``
  except ``'token'``), because every other block's prompt outputs are thrown away by the next replacement.
  ``forward_features`` therefore returns ``[B, prefix + P + N, dim]`` when the head reads prompts and
  ``[B, prefix + N, dim]`` with ``global_pool='token'``; the logits equal explicit-concat VPT in both cases.
  Deep mode re-implements timm's ``Block``/``Attention`` forward: qkv with or without bias, ``q_norm``/``k_norm``
  (applied to the prompt rows too), ``attn.scale``, scale norm, ``proj``, layer scale, drop path and
  ``grad_checkpointing`` are honoured; timm's ``fused_attn`` flag is moot (attention always goes through
  ``prompt_attention``); custom blocks, gated attention, ``attn_head_dim != dim / heads`` and attention dropout are
  refused with a ValueError/TypeError (shallow mode runs any block).

VPT's options. ``project=d`` learns prompts of width ``d`` and maps them with one ``nn.Linear(d, dim)``
(``model.prompt_proj``, shared by all layers; VPT's ``PROMPT.PROJECT``); ``dropout=p`` applies ``model.prompt_dropout``
to the (projected) prompts of every layer, per sample as VPT does (``dropout(proj(prompts).expand(B, -1, -1))``, VPT's
``PROMPT.DROPOUT``): while it is active (training, ``p > 0``) deep mode reads per-sample prompt keys/values
``[B, H, P, D]`` instead of the batch-shared ``[H, P, D]``.

Only ``forward_features`` (hence ``forward``) runs with prompts. ``forward_intermediates`` (and so
``get_intermediate_layers``) would silently return unprompted features, so a prompted model raises a clear error there
instead; ``attn_mask`` / ``is_causal`` are refused by the prompted ``forward_features``.

:func:`vpt_forward_features` is the explicit-concat VPT reference (concatenate the prompts, run the unmodified timm
blocks) that the tests and benchmarks compare against. :func:`load_backbone_weights` loads timm, MAE and MoCo v3
checkpoints from local files.
"""

from __future__ import annotations

import math
import os
import types

import torch
import torch.nn as nn
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from rpp_kernels.attention import prompt_attention, prompt_qkv

__all__ = ["add_prompts", "remove_prompts", "vpt_forward_features", "read_backbone_checkpoint", "load_backbone_weights"]

_MODES = ("deep", "shallow")


_NEEDED = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")
# Attributes of prompt implementations that already live in the model (VPT's PromptedVisionTransformer, ours).
_PROMPT_ATTRS = ("prompt_tokens", "prompt_embeddings", "deep_prompt_embeddings", "prompt_proj", "prompt_dropout")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")


def _check_promptable(model: VisionTransformer) -> None:
    """Refuse models whose forward add_prompts does not know, that lack a piece it needs, or that carry prompts."""
    cls = type(model)
    if cls.forward_features is not VisionTransformer.forward_features:
        raise TypeError(
            f"add_prompts: {cls.__name__} overrides forward_features (e.g. an MAE or VPT backbone); add_prompts "
            "replaces timm's VisionTransformer.forward_features and would silently drop what the override does"
        )
    missing = [n for n in _NEEDED if not isinstance(getattr(model, n, None), (nn.Module, types.MethodType))]
    if missing:
        raise TypeError(
            f"add_prompts: {cls.__name__} lacks {', '.join(missing)} (deleted or replaced), which the prompted "
            "forward_features needs; use a plain timm VisionTransformer"
        )
    carried = [n for n in _PROMPT_ATTRS if hasattr(model, n)]
    if carried:
        raise ValueError(
            f"add_prompts: model already has prompts ({', '.join('model.' + n for n in carried)}); "
            + (
                "call remove_prompts(model) first"
                if "prompt_tokens" in carried
                else "it is prompted by other code: add_prompts would add a second set"
            )
        )


def _check_deep_blocks(model: VisionTransformer) -> None:
    """Deep mode re-implements timm's ``Block``/``Attention`` forward; refuse anything that forward would not match."""
    dim = model.embed_dim
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward:
            raise TypeError(
                f"deep prompts support timm's Block; blocks[{i}] is {type(blk).__name__} (use mode='shallow')"
            )
        attn = blk.attn
        if type(attn).forward is not Attention.forward:
            raise TypeError(
                f"deep prompts support timm's Attention; blocks[{i}].attn is {type(attn).__name__} (use mode='shallow')"
            )
        if getattr(attn, "gate", None) is not None:
            raise ValueError(f"deep prompts do not support gated attention (blocks[{i}].attn.gate); use mode='shallow'")
        if attn.num_heads * attn.head_dim != dim:
            raise ValueError(
                f"deep prompts need num_heads * head_dim == embed_dim; blocks[{i}].attn has "
                f"{attn.num_heads} x {attn.head_dim} != {dim}"
            )
        if attn.attn_drop.p > 0:
            raise ValueError(
                f"deep prompts do not support attention dropout (blocks[{i}].attn.attn_drop.p={attn.attn_drop.p}); "
                "build the model with attn_drop_rate=0"
            )


def _vpt_uniform_init(model: VisionTransformer, shape: tuple[int, ...]) -> torch.Tensor:
    """VPT's initialisation: uniform(-v, v) with v = sqrt(6 / (3 * patch_area + dim)) (Xavier over the patch conv)."""
    ph, pw = model.patch_embed.patch_size
    bound = math.sqrt(6.0 / (3 * ph * pw + model.embed_dim))
    return torch.empty(shape).uniform_(-bound, bound)


def add_prompts(
    model: VisionTransformer,
    num_prompts: int,
    mode: str = "deep",
    init: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    project: int | None = None,
) -> VisionTransformer:
    """Add learnable visual prompts to a timm ``VisionTransformer`` in place; returns the same model.

    ``model.prompt_tokens`` becomes an ``nn.Parameter`` of shape ``[depth, P, width]`` (``mode='deep'``) or
    ``[1, P, width]`` (``mode='shallow'``), with ``width = project or dim``, initialised from ``init`` (a tensor of
    that shape) or, with ``init=None``, with VPT's uniform initialisation. ``project=d`` adds ``model.prompt_proj``
    (``nn.Linear(d, dim)``, VPT's initialisation); ``dropout=p`` adds ``model.prompt_dropout`` (``nn.Dropout(p)``),
    as VPT's ``PROMPT.PROJECT`` / ``PROMPT.DROPOUT``. ``model.forward_features`` (and so ``model(x)``) then runs
    with prompts; see the module docstring for the layout. Undo with :func:`remove_prompts`. Refused with a clear
    error: models overriding ``forward_features``, models missing a piece of it (``norm`` ...), models that already
    carry prompts. Equivalent PyTorch (see :func:`vpt_forward_features`)::

        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for i, blk in enumerate(model.blocks):  # shallow: insert prompts once, before block 0
            rows = prompt_dropout(prompt_proj(prompt_tokens[i]).expand(B, P, dim))
            x = cat([x[:, :n_prefix], rows, x[:, n_prefix + (P if i else 0):]], 1)
            x = blk(x)
        logits = model.forward_head(model.norm(x))
    """
    _check_model(model)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if project is not None and (not isinstance(project, int) or project < 1):
        raise ValueError(
            f"project must be a positive int (the prompt width before projection) or None, got {project!r}"
        )
    _check_promptable(model)
    if mode == "deep":
        _check_deep_blocks(model)
    width = model.embed_dim if project is None else project
    shape = (len(model.blocks) if mode == "deep" else 1, num_prompts, width)
    if init is None:
        init = _vpt_uniform_init(model, shape)
    elif not isinstance(init, torch.Tensor) or tuple(init.shape) != shape:
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init must be a tensor of shape {shape} for mode={mode!r}, got {got}")
    ref = model.patch_embed.proj.weight
    model.prompt_tokens = nn.Parameter(init.detach().to(device=ref.device, dtype=ref.dtype).clone())
    if project is not None:
        model.prompt_proj = nn.Linear(project, model.embed_dim, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_normal_(model.prompt_proj.weight, a=0, mode="fan_out")  # VPT's initialisation
    if dropout > 0:
        model.prompt_dropout = nn.Dropout(dropout)
    model.prompt_mode = mode
    forward = _forward_features_deep if mode == "deep" else _forward_features_shallow
    model.forward_features = types.MethodType(forward, model)
    model.forward_intermediates = types.MethodType(_forward_intermediates_refused, model)
    return model


def remove_prompts(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`add_prompts`: drop ``prompt_tokens`` and restore timm's own ``forward_features``."""
    if not hasattr(model, "prompt_tokens"):
        raise ValueError("model has no prompts to remove (no model.prompt_tokens)")
    del model.prompt_tokens
    del model.prompt_mode
    for name in ("prompt_proj", "prompt_dropout"):
        if hasattr(model, name):
            delattr(model, name)
    del model.forward_features  # the instance attributes; the class methods show through again
    del model.forward_intermediates
    return model


def _forward_intermediates_refused(self: VisionTransformer, *args, **kwargs):
    raise NotImplementedError(
        f"forward_intermediates / get_intermediate_layers do not run the {self.prompt_mode} prompts added by "
        "rpp_kernels.integrations.timm.add_prompts (they would return unprompted features); use forward_features, "
        "or remove_prompts(model) for the backbone's own intermediates"
    )


def _embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_features`` up to the first block: ``[B, n_prefix + N, dim]``."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _insert(x: torch.Tensor, rows: torch.Tensor, at: int, dim: int) -> torch.Tensor:
    """``x`` with ``rows`` inserted before position ``at`` along ``dim``."""
    return torch.cat([x.narrow(dim, 0, at), rows, x.narrow(dim, at, x.shape[dim] - at)], dim=dim)


def _check_no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("prompted forward_features does not support attn_mask / is_causal")


def _prompt_rows(model: VisionTransformer, layer: int, batch: int, per_sample: bool = False) -> torch.Tensor:
    """Layer ``layer``'s prompt rows after the projection and dropout: ``[P, dim]`` while no dropout is active, else
    ``[B, P, dim]`` (VPT draws the dropout mask per sample); ``per_sample`` always gives ``[B, P, dim]``."""
    rows = model.prompt_tokens[layer]
    proj = getattr(model, "prompt_proj", None)
    if proj is not None:
        rows = proj(rows)
    drop = getattr(model, "prompt_dropout", None)
    if drop is not None and drop.training and drop.p > 0:
        return drop(rows.expand(batch, -1, -1))
    return rows.expand(batch, -1, -1) if per_sample else rows


def _forward_features_shallow(self: VisionTransformer, x: torch.Tensor, attn_mask=None, is_causal=False):
    _check_no_mask(attn_mask, is_causal)
    x = _embed(self, x)
    x = _insert(x, _prompt_rows(self, 0, x.shape[0], per_sample=True), self.num_prefix_tokens, dim=1)
    if self.grad_checkpointing and torch.is_grad_enabled():
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False)
    else:
        x = self.blocks(x)
    return self.norm(x)


def _forward_features_deep(self: VisionTransformer, x: torch.Tensor, attn_mask=None, is_causal=False):
    _check_no_mask(attn_mask, is_causal)
    x = _embed(self, x)
    last = len(self.blocks) - 1
    head_reads_prompts = self.global_pool != "token"
    for i, blk in enumerate(self.blocks):
        args = (blk, x, _prompt_rows(self, i, x.shape[0]), self.num_prefix_tokens, head_reads_prompts and i == last)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_deep_block, *args, use_reentrant=False)
        else:
            x = _deep_block(*args)
    return self.norm(x)


def _attn_out(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` after the softmax: merge heads, (scale) norm, output projection. o: ``[B, H, N, D]``."""
    batch, _, n, _ = o.shape
    o = o.transpose(1, 2).reshape(batch, n, attn.attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(o)))


def _deep_block(blk: Block, x: torch.Tensor, prompts: torch.Tensor, n_prefix: int, keep_prompts: bool) -> torch.Tensor:
    """One timm ``Block`` over ``[prefix | prompts | patches]`` with the prompt rows held as a batch-shared prefix.

    x: ``[B, T, dim]`` (prefix + patch rows, no prompts); prompts: ``[P, dim]`` (batch-shared) or ``[B, P, dim]``
    (per sample, under prompt dropout). Returns ``[B, T, dim]``, or with ``keep_prompts`` the full ``[B, T + P, dim]``
    sequence including the prompt rows' outputs.
    """
    attn = blk.attn
    batch = x.shape[0]
    prompts_n = blk.norm1(prompts)  # [P, dim]: once for the whole batch (unless per sample)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if prompts.dim() == 2:
        (q, k, v), (pq, pk, pv) = prompt_qkv(
            blk.norm1(x), weight, bias, attn.num_heads, prompts_n, prompts_n, prompts_n
        )
    else:
        (q, k, v), _ = prompt_qkv(blk.norm1(x), weight, bias, attn.num_heads)
        packed = torch.nn.functional.linear(prompts_n, weight, bias)  # [B, P, 3 * dim]
        pq, pk, pv = packed.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, P, D]
    q, k, pk = attn.q_norm(q), attn.k_norm(k), attn.k_norm(pk)
    if keep_prompts:
        # Last block and the head reads the prompt rows: they also query (per sample, since keys include the image).
        pq = attn.q_norm(pq)
        q = _insert(q, pq.expand(batch, -1, -1, -1) if pq.dim() == 3 else pq, n_prefix, dim=2)
        x = _insert(x, prompts.expand(batch, -1, -1), n_prefix, dim=1)
    o = prompt_attention(q, k, v, pk, pv, softmax_scale=attn.scale)
    x = x + blk.drop_path1(blk.ls1(_attn_out(attn, o)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def vpt_forward_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Explicit-concat VPT reference: concatenate the prompts into the sequence, run the unmodified blocks.

    images: ``[B, 3, H, W]``; returns ``[B, n_prefix + P + N, dim]`` (after ``model.norm``). Feed it to
    ``model.forward_head`` for logits. Needs :func:`add_prompts` to have been called (for ``prompt_tokens``); the
    prompts of layer ``i`` are ``prompt_dropout(prompt_proj(prompt_tokens[i]).expand(B, -1, -1))`` as in VPT.
    """
    n_prefix, n_prompts = model.num_prefix_tokens, model.prompt_tokens.shape[1]
    x = _embed(model, images)
    for i, blk in enumerate(model.blocks):
        if i == 0 or model.prompt_mode == "deep":
            rest = x[:, n_prefix + (n_prompts if i else 0) :]
            x = torch.cat([x[:, :n_prefix], _prompt_rows(model, i, x.shape[0], per_sample=True), rest], dim=1)
        x = blk(x)
    return model.norm(x)


def _to_timm_names(obj) -> tuple[dict[str, torch.Tensor], str]:
    """Map a loaded MAE / MoCo v3 / timm checkpoint to a timm ViT state dict; returns (state dict, detected format).

    MAE's scripts save ``{"model": state_dict, ...}``; MoCo v3 saves ``{"state_dict": ...}`` with DDP's ``module.``
    prefix (and ``module.base_encoder.`` in pre-training checkpoints); timm checkpoints are bare state dicts. Both
    MAE and MoCo v3 already use timm's parameter names below those prefixes.
    """
    fmt = "timm"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, fmt = obj["model"], "mae"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, fmt = obj["state_dict"], "mocov3"
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"expected a state dict (or one under 'model' / 'state_dict'), got {type(obj).__name__}")
    state = dict(obj)
    for prefix in ("module.base_encoder.", "module."):
        if any(k.startswith(prefix) for k in state):
            # MoCo v3: keep the (base) encoder; the momentum encoder and predictor are pre-training only.
            state, fmt = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, "mocov3"
            break
    # Classification / projection heads and MAE's decoder are not part of the backbone: a new head is trained.
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "decoder", "mask_token"))}
    return state, fmt


def read_backbone_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a timm, MAE or MoCo v3 ViT checkpoint from a local file: (state dict in timm's names, detected format).

    Accepts a bare state dict or one under ``model`` (MAE) / ``state_dict`` (MoCo v3); MoCo v3's ``module.`` and
    ``module.base_encoder.`` prefixes are stripped; heads and MAE's decoder are dropped. The format is ``'timm'``,
    ``'mae'`` or ``'mocov3'``. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unreadable one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: expected a checkpoint file at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error with the same fix
        raise ValueError(f"could not read checkpoint {path!r}: {type(e).__name__}: {e}") from e
    return _to_timm_names(obj)


def _first(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "") if keys else "none"


def load_backbone_weights(
    model: VisionTransformer, checkpoint: str | os.PathLike | tuple[dict[str, torch.Tensor], str]
) -> str:
    """Load backbone weights into ``model`` (before :func:`add_prompts`); returns the checkpoint's format.

    ``checkpoint``: a local file path (read with :func:`read_backbone_checkpoint`) or what that function returned.
    ``pos_embed`` is resampled to the model's grid. With ``global_pool='avg'`` timm has no ``norm`` before pooling
    (``fc_norm`` after it instead, freshly initialised), so the checkpoint's ``norm`` is dropped, as MAE fine-tuning
    does. SPT instead keeps the pretrained norm after pooling: ``rpp.spt`` loads it into ``fc_norm``. Raises
    ``ValueError`` naming the keys when the checkpoint does not fit the model.
    """
    _check_model(model)
    state, fmt = checkpoint if isinstance(checkpoint, tuple) else read_backbone_checkpoint(checkpoint)
    state = dict(state)
    if isinstance(model.norm, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if "pos_embed" in state and model.pos_embed is not None and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=model.patch_embed.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
        )
    own = model.state_dict()
    wrong_shape = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm.", "prompt_tokens"))]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        raise ValueError(
            f"{fmt} checkpoint does not fit {type(model).__name__}(embed_dim={model.embed_dim}, "
            f"depth={len(model.blocks)}): shape mismatch: {_first(wrong_shape, 3)}; missing: {_first(missing)}; "
            f"unexpected: {_first(unexpected)}"
        )
    model.load_state_dict(state, strict=False)
    return fmt
