"""rpp_kernels.attention: prompt-aware attention with a batch-shared prefix K/V, and drop-in modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from rpp_kernels.ops.attention import prompt_attention as _prompt_attention
from rpp_kernels.ops.attention import prompt_qkv as _prompt_qkv

__all__ = ["prompt_attention", "prompt_qkv", "PromptAttention"]


def prompt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over a prefix of keys/values shared across the batch followed by per-sample keys/values.

    q, k, v: ``[B, H, N, D]``; prefix_k, prefix_v: ``[H, P, D]``, ``[1, H, P, D]`` (read with batch stride 0, never
    copied per sample) or ``[B, H, P, D]``. Returns ``[B, H, N, D]``. Equivalent PyTorch::

        pk, pv = prefix_k.expand(B, H, P, D), prefix_v.expand(B, H, P, D)
        F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=M,
                                       scale=softmax_scale)

    where, with ``causal=True``, query ``i`` sees all ``P`` prefix keys and the per-sample keys ``j <= i``.
    Gradients of ``prefix_k``/``prefix_v`` come back in the prefix's own shape (summed over the batch when broadcast).
    Backends: ``triton`` (CUDA, sm_80+, fp16/bf16/fp32, head dim 32..128), then ``torch`` (SDPA on the concatenation).
    """
    return _prompt_attention(q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale, backend=backend)


def prompt_qkv(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    num_heads: int,
    prompt_q: torch.Tensor | None = None,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Head-split Q/K/V of ``x`` and, once per call (not per sample), of the prompt rows.

    x: ``[B, N, E]``; in_proj_weight: ``[3E, E]`` (q, k, v rows as in ``nn.MultiheadAttention``); in_proj_bias:
    ``[3E]`` or None; prompt_q/k/v: ``[P, E]`` each, already LayerNormed (pass only ``prompt_q`` when one prompt
    tensor serves as q, k and v rows). Returns ``((q, k, v), prefix)`` with q, k, v ``[B, H, N, D]`` and prefix
    ``(prefix_q, prefix_k, prefix_v)`` each ``[H, P, D]``, or None without prompts. Equivalent PyTorch::

        q, k, v = F.linear(x, in_proj_weight, in_proj_bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        prefix_q = F.linear(prompt_q, w_q, b_q).view(P, H, D).transpose(0, 1)  # likewise k, v

    q, k, v are head-split views of one ``F.linear`` (cuBLAS) output, never copied; the backward takes the packed
    gradient the triton attention backward writes for them as-is. Gradients flow to x, the weights (unless frozen),
    the bias and the prompts.
    """
    return _prompt_qkv(x, in_proj_weight, in_proj_bias, num_heads, prompt_q, prompt_k, prompt_v, backend=backend)


def _causal_bool_mask(n: int, device: torch.device) -> torch.Tensor:
    """nn.MultiheadAttention's boolean causal mask: True above the diagonal = not allowed."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether a 2-D bool/float mask is exactly the standard causal one (open_clip: -inf above the diagonal, 0 else)."""
    n = mask.shape[-1]
    if mask.dim() != 2 or mask.shape[0] != n:
        return False
    upper = _causal_bool_mask(n, mask.device)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    # One comparison (one host sync) against the float causal mask; -0.0 counts as 0, NaN as unequal.
    return torch.equal(mask, torch.zeros_like(mask).masked_fill_(upper, float("-inf")))


class PromptAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` (self-attention) with batch-shared prompt rows and fused kernels.

    Constructor, parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``batch_first`` and the tuple
    return match ``nn.MultiheadAttention``, so state dicts load both ways; ``PromptAttention.from_mha(mha)`` wraps
    one, sharing its parameters (``copy=True`` copies them). ``[N, B, E]`` inputs (``batch_first=False``, OpenAI
    CLIP's layout) are read in place on the fast path, without a transposed copy.
    Unsupported options raise ``ValueError``: ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` other than
    ``embed_dim``, and cross-attention (``key``/``value`` must be ``query``).

    Forward extras (keyword-only): ``prompt_q``, ``prompt_k``, ``prompt_v`` (``[P, E]``, the already-normalized prompt
    rows; passing only ``prompt_q`` uses it for all three) and ``return_prompt_outputs``. Semantics: the result is
    ``nn.MultiheadAttention`` applied to the sequence ``cat(prompt rows, x)`` (prompt rows first), where the prompt
    rows take their query/key/value inputs from ``prompt_q/k/v``. By default only the token rows are returned
    (``[B, N, E]``, or ``[N, B, E]`` when not ``batch_first``); with ``return_prompt_outputs=True`` the output holds
    all ``P + N`` rows, prompt rows first, i.e. exactly the concatenated module's output. With a causal mask, prompt
    row ``i`` sees prompt rows ``<= i`` only and every token sees all prompt rows (the concatenation's causal mask).

    Fast path (``prompt_qkv`` + ``prompt_attention``, Triton on GPU): no ``key_padding_mask``, ``need_weights=False``
    (the default here; ``nn.MultiheadAttention`` defaults to True), no dropout in training, and ``attn_mask`` either
    None or the standard causal mask (``[N, N]`` or ``[P+N, P+N]``, bool or float ``-inf`` above the diagonal, as
    open_clip's text tower passes; ``is_causal=True`` alone also means causal). Everything else runs the torch path,
    ``F.multi_head_attention_forward`` on the explicit concatenation, which returns the attention weights when
    ``need_weights=True`` (token rows only unless ``return_prompt_outputs``). With prompts, a non-causal ``attn_mask``
    must cover the concatenated sequence (``[P+N, P+N]`` or ``[B*H, P+N, P+N]``) and ``key_padding_mask`` is ``[B, N]``
    (prompt rows are never padding).
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if add_bias_kv:
            raise ValueError("PromptAttention: add_bias_kv=True is not supported (the learned bias_k/bias_v rows)")
        if add_zero_attn:
            raise ValueError("PromptAttention: add_zero_attn=True is not supported")
        if kdim not in (None, embed_dim) or vdim not in (None, embed_dim):
            raise ValueError(f"PromptAttention: kdim/vdim must equal embed_dim={embed_dim}, got {kdim}/{vdim}")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"PromptAttention: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._mask_cache: tuple | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same initialisation as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @classmethod
    def from_mha(
        cls, mha: nn.MultiheadAttention, share_parameters: bool = True, *, copy: bool = False
    ) -> PromptAttention:
        """A ``PromptAttention`` with ``mha``'s configuration, parameters and train/eval mode.

        By default (``share_parameters=True``) it reuses ``mha``'s parameter objects (``in_proj_weight``,
        ``in_proj_bias`` and the ``out_proj`` module itself): nothing is copied, and ``requires_grad``, device, dtype,
        later ``.to()`` moves of either module and optimiser state all follow the original. ``copy=True`` (or
        ``share_parameters=False``) makes independent copies instead, each keeping its source's ``requires_grad``
        (a frozen ``mha`` gives frozen copies).
        """
        if not mha._qkv_same_embed_dim:
            raise ValueError("PromptAttention.from_mha: kdim/vdim != embed_dim is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("PromptAttention.from_mha: add_bias_kv / add_zero_attn are not supported")
        share = share_parameters and not copy
        weight = mha.in_proj_weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device="meta" if share else weight.device,  # shared: no storage allocated for parameters replaced below
            dtype=weight.dtype,
        )
        if share:
            module.in_proj_weight = mha.in_proj_weight
            module.in_proj_bias = mha.in_proj_bias
            module.out_proj = mha.out_proj
        else:
            module.load_state_dict(mha.state_dict())
            own, source = dict(module.named_parameters()), dict(mha.named_parameters())
            for name, p in own.items():
                p.requires_grad_(source[name].requires_grad)
        return module.train(mha.training)

    def _mask_is_causal(self, attn_mask: torch.Tensor) -> bool:
        # Checking reads the mask (a host sync on GPU), so the answer is cached for the same tensor object at the same
        # version. Not keyed on data_ptr: a view (mask.t()) or a new mask in freed memory can share the pointer.
        # Inference tensors have no version counter, so they are checked on every call.
        if attn_mask.is_inference():
            return _is_causal_mask(attn_mask)
        cache = self._mask_cache
        if cache is None or cache[0] is not attn_mask or cache[1] != attn_mask._version:
            cache = self._mask_cache = (attn_mask, attn_mask._version, _is_causal_mask(attn_mask))
        return cache[2]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        prompt_q: torch.Tensor | None = None,
        prompt_k: torch.Tensor | None = None,
        prompt_v: torch.Tensor | None = None,
        return_prompt_outputs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query = key = value: ``[B, N, E]`` (batch_first), ``[N, B, E]`` or unbatched ``[N, E]``.

        Returns ``(output, weights)``: output as the input layout with ``N`` token rows, or ``P + N`` rows (prompt
        rows first) with ``return_prompt_outputs=True``; weights None unless ``need_weights=True``.
        """
        if not (key is query or (key.shape == query.shape and torch.equal(key, query))) or not (
            value is query or (value.shape == query.shape and torch.equal(value, query))
        ):
            raise ValueError(
                "PromptAttention is self-attention only: key and value must be query "
                f"(got query {list(query.shape)}, key {list(key.shape)}, value {list(value.shape)})"
            )
        if (
            (key is not query or value is not query)
            and torch.is_grad_enabled()
            and (key.requires_grad or value.requires_grad)
        ):
            # Only query is read: a key/value that merely equals it would get no gradient and query would get theirs.
            raise ValueError(
                "PromptAttention is self-attention only: key/value equal query but are other tensors that require "
                "grad, so their gradients would go to query; pass the same tensor as query, key and value"
            )
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"PromptAttention: query must be [B, N, E], [N, B, E] or [N, E] with E={self.embed_dim}, "
                f"got {list(query.shape)}"
            )
        unbatched = query.dim() == 2
        seq_first = not unbatched and not self.batch_first
        x = query.unsqueeze(0) if unbatched else (query.transpose(0, 1) if seq_first else query)  # [B, N, E] view
        if unbatched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if prompt_q is None and (prompt_k is not None or prompt_v is not None):
            given = "prompt_k" if prompt_k is not None else "prompt_v"
            raise ValueError(f"PromptAttention: {given} without prompt_q; pass prompt_q (alone it is q, k and v rows)")
        if prompt_q is not None and prompt_k is None and prompt_v is None:
            prompt_k = prompt_v = prompt_q
        prompts = None if prompt_q is None else (prompt_q, prompt_k, prompt_v)
        n_tokens, n_prompt = x.shape[1], 0 if prompts is None else prompt_q.shape[0]

        causal = is_causal and attn_mask is None
        square = ((n_tokens, n_tokens), (n_prompt + n_tokens,) * 2)
        if attn_mask is not None and attn_mask.shape in square and self._mask_is_causal(attn_mask):
            causal, attn_mask = True, None
        dropout_active = self.training and self.dropout > 0
        if key_padding_mask is None and attn_mask is None and not need_weights and not dropout_active:
            out = self._fast_forward(query if seq_first else x, prompts, causal, return_prompt_outputs, seq_first)
            return (out.squeeze(0) if unbatched else out), None
        else:
            out, weights = self._torch_forward(
                x, prompts, key_padding_mask, need_weights, attn_mask, average_attn_weights, causal,
                return_prompt_outputs,
            )  # fmt: skip
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _fast_forward(self, x, prompts, causal, return_prompt_outputs, seq_first=False):
        """x: ``[B, N, E]``, or ``[N, B, E]`` with ``seq_first`` (read in place: no transposed copy of the input)."""
        heads = self.num_heads
        prompt_args = () if prompts is None else prompts
        # The projection is row-wise, so an [N, B, E] input is projected as a "batch" of N rows of B tokens; the
        # head-split results are then permuted (views) to [B, H, N, D].
        (q, k, v), prefix = prompt_qkv(x, self.in_proj_weight, self.in_proj_bias, heads, *prompt_args)
        if seq_first:
            q, k, v = (t.permute(2, 1, 0, 3) for t in (q, k, v))
        batch, _, n_tokens, _ = q.shape
        embed = self.embed_dim

        def merge(o: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] -> the input layout, heads merged
            n = o.shape[2]
            return (
                o.permute(2, 0, 1, 3).reshape(n, batch, embed)
                if seq_first
                else o.transpose(1, 2).reshape(batch, n, embed)
            )

        pk, pv = (None, None) if prefix is None else prefix[1:]
        out = merge(prompt_attention(q, k, v, pk, pv, causal=causal))
        if return_prompt_outputs and prefix is not None:
            pq = prefix[0]
            if causal:
                # Prompt row i sees prompt rows <= i and no token (they come after it): batch-invariant, done once.
                prompt_out = prompt_attention(pq[None], pk[None], pv[None], causal=True).expand(batch, -1, -1, -1)
            else:
                # Prompt rows attend over prompt rows + this sample's tokens; the [H, P, D] query is read at stride 0.
                prompt_out = prompt_attention(pq.expand(batch, -1, -1, -1), k, v, pk, pv)
            out = torch.cat([merge(prompt_out), out], 0 if seq_first else 1)
        return self.out_proj(out)

    def _torch_forward(
        self, x, prompts, key_padding_mask, need_weights, attn_mask, average_attn_weights, causal, return_prompt_outputs
    ):
        """``F.multi_head_attention_forward`` on the explicit concatenation: masks, dropout and weights, any device."""
        batch, n_tokens, _ = x.shape
        n_prompt = 0 if prompts is None else prompts[0].shape[0]
        seq = n_prompt + n_tokens
        xs = x.transpose(0, 1)  # [N, B, E]
        if prompts is None:
            q_in = k_in = v_in = xs
        else:
            q_in, k_in, v_in = (torch.cat([p[:, None].expand(-1, batch, -1), xs], 0) for p in prompts)
            if key_padding_mask is not None:
                if key_padding_mask.shape != (batch, n_tokens):
                    raise ValueError(
                        f"PromptAttention: with {n_prompt} prompt rows key_padding_mask must be [B, N] = "
                        f"[{batch}, {n_tokens}] (the tokens only; prompt rows are never padding), got "
                        f"{list(key_padding_mask.shape)}"
                    )
                pad = torch.zeros(batch, n_prompt, dtype=key_padding_mask.dtype, device=key_padding_mask.device)
                key_padding_mask = torch.cat([pad, key_padding_mask], 1)
            if attn_mask is not None and attn_mask.shape[-2:] != (seq, seq):
                raise ValueError(
                    f"PromptAttention: with {n_prompt} prompt rows attn_mask must cover the concatenated sequence "
                    f"([{seq}, {seq}] or [B*H, {seq}, {seq}]) or be the standard causal mask; got "
                    f"{list(attn_mask.shape)}"
                )
        if causal:
            attn_mask = _causal_bool_mask(seq, x.device)
        out, weights = F.multi_head_attention_forward(
            q_in, k_in, v_in, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            None, None, False, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights,
        )  # fmt: skip
        out = out.transpose(0, 1)
        if not return_prompt_outputs:
            out = out[:, n_prompt:]
            weights = None if weights is None else weights[..., n_prompt:, :]
        return out, weights
