"""Plain-PyTorch references for prompt attention and the prompt-aware Q/K/V projection.

These define the semantics the kernels are tested against; they upcast to fp32 (fp64 stays fp64, for the tests'
gold values) and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """``[H, P, D] | [1, H, P, D] | [B, H, P, D]`` -> a ``[B, H, P, D]`` view (no copy for a broadcast prefix)."""
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0)
    return prefix.expand(batch, -1, -1, -1)


def prefix_causal_mask(n_q: int, n_k: int, n_prefix: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[n_q, P + n_k]`` mask (True = attend): every query sees all prefix keys and tokens ``j <= i``."""
    tokens = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(n_q, n_prefix, dtype=torch.bool, device=device), tokens], dim=1)


def prompt_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``cat([prefix_k, k])`` / ``cat([prefix_v, v])`` along the sequence, in fp32.

    q, k, v: ``[B, H, N, D]``; prefix_k, prefix_v: ``[H, P, D]``, ``[1, H, P, D]`` or ``[B, H, P, D]``.
    Returns ``[B, H, N, D]`` in ``q.dtype``. Equivalent PyTorch::

        pk, pv = prefix_k.expand(B, H, P, D), prefix_v.expand(B, H, P, D)
        F.scaled_dot_product_attention(q, cat([pk, k], 2), cat([pv, v], 2), attn_mask=M, scale=softmax_scale)

    with ``M[i, j] = j < P or j - P <= i`` when ``causal`` (prefix keys always visible), no mask otherwise.
    """
    batch, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    keys, values = k.to(acc), v.to(acc)
    n_prefix = 0
    if prefix_k is not None:
        n_prefix = prefix_k.shape[-2]
        keys = torch.cat([expand_prefix(prefix_k.to(acc), batch), keys], dim=2)
        values = torch.cat([expand_prefix(prefix_v.to(acc), batch), values], dim=2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~prefix_causal_mask(n_q, n_k, n_prefix, q.device), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(q.dtype)


def prompt_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The ``torch`` backend: same contract as :func:`prompt_attention_ref`, in the input dtype, through SDPA.

    Autograd of the broadcast ``expand`` reduces the prefix gradient over the batch.
    """
    batch, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    if prefix_k is None or prefix_k.shape[-2] == 0:
        # SDPA's is_causal is top-left aligned: query i sees keys j <= i, the prefix-free case of the contract.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    keys = torch.cat([expand_prefix(prefix_k, batch), k], dim=2)
    values = torch.cat([expand_prefix(prefix_v, batch), v], dim=2)
    # q is often a head-split view of a fused [B, N, 3E] projection; SDPA saves q for backward, which would keep the
    # whole buffer alive next to the concatenated K/V copies. A compact q (no-op when already contiguous) frees it.
    q = q.contiguous()
    mask = None
    if causal and n_q != n_k:
        mask = prefix_causal_mask(n_q, n_k, prefix_k.shape[-2], q.device)
    elif causal:
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo, which imports triton (see the package doc).
        from torch.nn.attention.bias import causal_lower_right

        # With n_q == n_k, "all prefix keys + tokens j <= i" is the bottom-right-aligned causal mask of the
        # [n_q, P + n_k] scores; as a CausalBias SDPA keeps its fused kernels instead of the masked math path.
        mask = causal_lower_right(n_q, prefix_k.shape[-2] + n_k)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=softmax_scale)


def prompt_qkv_ref(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    num_heads: int,
    prompt_q: torch.Tensor | None = None,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
):
    """Head-split Q/K/V of ``x`` and, once (not per sample), of the prompt rows.

    x: ``[B, N, E]``; in_proj_weight: ``[3E, E]`` (rows: q, k, v as in ``nn.MultiheadAttention``);
    in_proj_bias: ``[3E]``; prompt_q/k/v: ``[P, E]`` each (already LayerNormed). Returns ``(q, k, v)`` each
    ``[B, H, N, D]`` and ``(prefix_q, prefix_k, prefix_v)`` each ``[H, P, D]`` (or None without prompts).
    Equivalent PyTorch::

        q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1)       # then split heads
        prefix_q = F.linear(prompt_q, w_q, b_q).view(P, H, D).transpose(0, 1)  # likewise k, v
    """
    batch, n, embed = x.shape
    head_dim = embed // num_heads
    acc = torch.promote_types(x.dtype, torch.float32)
    w = in_proj_weight.to(acc)
    b = None if in_proj_bias is None else in_proj_bias.to(acc)
    qkv = F.linear(x.to(acc), w, b).view(batch, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = (t.to(x.dtype) for t in qkv.unbind(0))
    if prompt_q is None:
        return (q, k, v), None
    prefix = []
    for i, p in enumerate((prompt_q, prompt_k, prompt_v)):
        wi = w[i * embed : (i + 1) * embed]
        bi = None if b is None else b[i * embed : (i + 1) * embed]
        prefix.append(F.linear(p.to(acc), wi, bi).view(p.shape[0], num_heads, head_dim).transpose(0, 1).to(x.dtype))
    return (q, k, v), tuple(prefix)
