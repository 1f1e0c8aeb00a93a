"""prompt_attention: validation, backend dispatch and autograd wiring.

Triton is imported lazily (inside the backend call), so importing rpp_kernels never imports it: the tests set
``TRITON_INTERPRET=1`` before the first import, and CPU-only users never pay for it.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from rpp_kernels import _dispatch
from rpp_kernels.ops.attention.reference import prompt_attention_torch

MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128  # the Triton kernels pad D to a power of two in [32, 128]


def _triton_check(*, device, dtype, head_dim, **_) -> list[str]:
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return [f"head dim {head_dim} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"]
    return []


BACKENDS = _dispatch.register(
    "attention",
    [
        _dispatch.triton_backend(check=_triton_check),
        _dispatch.torch_backend(),
    ],
)


class PromptAttentionFn(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; saves q, k, v, the prefix, o and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, causal, softmax_scale):
        from rpp_kernels.ops.attention import triton as kernels

        o, lse = kernels.prompt_attention_fwd(q, k, v, prefix_k, prefix_v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        from rpp_kernels.ops.attention import triton as kernels

        if torch.is_grad_enabled():
            # create_graph=True: the kernels' gradients would come back detached and a gradient penalty through them
            # would silently lose its attention terms. (@once_differentiable only raises on .backward(), not on
            # autograd.grad(..., inputs) that skips its error node.)
            raise RuntimeError(
                "prompt_attention: the triton backend does not support double backward (create_graph=True)"
            )

        q, k, v, prefix_k, prefix_v, o, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = kernels.prompt_attention_bwd(
            do, q, k, v, prefix_k, prefix_v, o, lse, ctx.causal, ctx.softmax_scale
        )
        return dq, dk, dv, dpk, dpv, None, None


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(list(t.shape))


def check_inputs(q, k, v, prefix_k, prefix_v, causal) -> None:
    """Raise ValueError/TypeError naming the offending shapes, dtypes or devices."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"prompt_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"prompt_attention: {name} must be [B, H, N, D], got shape {_shape(t)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            f"prompt_attention: batch/heads differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (expected [B, H, N, D])"
        )
    if q.shape[3] != k.shape[3] or k.shape[3] != v.shape[3]:
        raise ValueError(f"prompt_attention: head dims differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"prompt_attention: k and v lengths differ: k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] == 0 and (prefix_k is None or prefix_k.shape[-2] == 0) and q.shape[2] > 0:
        raise ValueError(f"prompt_attention: no keys to attend to: k {_shape(k)} and prefix {_shape(prefix_k)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"prompt_attention: causal=True needs len(q) == len(k): q {_shape(q)}, k {_shape(k)}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(
            f"prompt_attention: pass both prefix_k and prefix_v or neither (got {_shape(prefix_k)}, {_shape(prefix_v)})"
        )
    tensors = [("q", q), ("k", k), ("v", v)]
    if prefix_k is not None:
        batch, heads, _, dim = q.shape
        for name, p in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"prompt_attention: {name} must be a torch.Tensor, got {type(p).__name__}")
            ok = (p.dim() == 3 and p.shape[0] == heads) or (
                p.dim() == 4 and p.shape[0] in (1, batch) and p.shape[1] == heads
            )
            if not ok or p.shape[-1] != dim:
                raise ValueError(
                    f"prompt_attention: {name} must be [H, P, D], [1, H, P, D] or [B, H, P, D] with H={heads}, "
                    f"D={dim}, B={batch}; got {_shape(p)} (q is {_shape(q)})"
                )
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prompt_attention: prefix_k {_shape(prefix_k)} and prefix_v {_shape(prefix_v)} differ")
        tensors += [("prefix_k", prefix_k), ("prefix_v", prefix_v)]
    for name, t in tensors[1:]:
        if t.dtype != q.dtype:
            raise ValueError(
                f"prompt_attention: {name} {_shape(t)} has dtype {t.dtype} but q {_shape(q)} has {q.dtype}"
            )
        if t.device != q.device:
            raise ValueError(
                f"prompt_attention: {name} {_shape(t)} is on {t.device} but q {_shape(q)} is on {q.device}"
            )
    if not q.is_floating_point():
        raise TypeError(f"prompt_attention: expected floating-point tensors, got {q.dtype}")


def prompt_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=False, softmax_scale=None, backend=None):
    check_inputs(q, k, v, prefix_k, prefix_v, causal)
    name = _dispatch.select(
        "attention",
        device=q.device,
        dtype=q.dtype,
        backend=backend,
        head_dim=q.shape[-1],
        n_prefix=0 if prefix_k is None else prefix_k.shape[-2],
    )
    if name == "triton":
        return PromptAttentionFn.apply(q, k, v, prefix_k, prefix_v, causal, softmax_scale)
    if prefix_k is not None and prefix_k.shape[-2] > 0 and torch.is_grad_enabled():
        # SDPA on cat([prefix, k]) would save the per-sample concatenated K/V for backward, which for short token blocks
        # after a long prefix (class suffixes, VPT-deep) is the block's largest activation. Recomputing it in backward
        # keeps only q, k, v and the shared prefix, the same memory model as the flash kernel.
        return torch.utils.checkpoint.checkpoint(
            prompt_attention_torch, q, k, v, prefix_k, prefix_v, causal, softmax_scale, use_reentrant=False
        )
    return prompt_attention_torch(q, k, v, prefix_k, prefix_v, causal, softmax_scale)


# One implementation: cuBLAS for the GEMM and zero-copy head-split views of its output, so it is never slower than
# F.linear + view (a Triton GEMM writing head-split tiles re-read x once per head and lost to cuBLAS by design).
QKV_BACKENDS = _dispatch.register("prompt_qkv", [_dispatch.torch_backend()])


def packed_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v (``[B, H, N, D]``) are the three head-split slots of one ``[B, N, 3, H, D]`` buffer."""
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        return False
    batch, heads, n, dim = q.shape
    embed = heads * dim
    return (
        q.stride() == k.stride() == v.stride() == (n * 3 * embed, dim, 3 * embed, 1)
        and q.dtype == k.dtype == v.dtype
        and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        and k.storage_offset() - q.storage_offset() == embed == v.storage_offset() - k.storage_offset()
    )


class PromptQKVFn(torch.autograd.Function):
    """``F.linear`` then head-split views ``[B, H, N, D]`` of its ``[B, N, 3, H, D]`` output (no copy).

    Backward: the ``[B * N, 3E]`` output gradient is used in place when dq, dk, dv are the slots of one packed buffer
    (what the triton attention backward writes for packed q, k, v), otherwise each is copied once into its slot (no
    stack + permute + contiguous). Only x and the weight are saved (both exist anyway); a frozen weight gets no
    gradient computed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):
        batch, n_tokens, embed = x.shape
        y = torch.nn.functional.linear(x, weight, bias)
        qkv = y.view(batch, n_tokens, 3, num_heads, embed // num_heads).permute(2, 0, 3, 1, 4)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.num_heads = bias is not None, num_heads
        return qkv[0], qkv[1], qkv[2]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        batch, n_tokens, embed = x.shape
        rows = batch * n_tokens
        if dq is not None and dk is not None and dv is not None and packed_slots(dq, dk, dv):
            dy = dq.as_strided((rows, 3 * embed), (3 * embed, 1), dq.storage_offset())
        else:
            packed = x.new_empty(batch, n_tokens, 3, ctx.num_heads, embed // ctx.num_heads)
            for i, g in enumerate((dq, dk, dv)):
                # Outputs unused downstream come back as None; their slice of the packed gradient is zero.
                slot = packed[:, :, i]
                slot.zero_() if g is None else slot.copy_(g.transpose(1, 2))
            dy = packed.view(rows, 3 * embed)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).view(batch, n_tokens, embed)
        if ctx.needs_input_grad[1]:
            dw = dy.t() @ x.reshape(rows, embed)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None


def _project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """``F.linear`` then split heads: ``[P, E] -> [H, P, D]`` (a view, in x's dtype)."""
    return torch.nn.functional.linear(x, weight, bias).unflatten(-1, (num_heads, -1)).transpose(0, 1)


def check_qkv_inputs(x, in_proj_weight, in_proj_bias, num_heads, prompts) -> None:
    """Raise ValueError/TypeError naming the offending shapes, dtypes or devices."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(
            f"prompt_qkv: x must be a [B, N, E] tensor, got {_shape(x) if isinstance(x, torch.Tensor) else x}"
        )
    embed = x.shape[-1]
    if num_heads <= 0 or embed % num_heads:
        raise ValueError(f"prompt_qkv: embed dim {embed} (x {_shape(x)}) is not divisible by num_heads={num_heads}")
    if in_proj_weight.shape != (3 * embed, embed):
        raise ValueError(
            f"prompt_qkv: in_proj_weight must be [3E, E] = [{3 * embed}, {embed}] for x {_shape(x)}, "
            f"got {_shape(in_proj_weight)}"
        )
    if in_proj_bias is not None and in_proj_bias.shape != (3 * embed,):
        raise ValueError(f"prompt_qkv: in_proj_bias must be [{3 * embed}], got {_shape(in_proj_bias)}")
    named = [("in_proj_weight", in_proj_weight), ("in_proj_bias", in_proj_bias)]
    named += [(n, p) for n, p in zip(("prompt_q", "prompt_k", "prompt_v"), prompts, strict=True)]
    given = [p for p in prompts if p is not None]
    if given and (
        len(given) != 3 or any(p.dim() != 2 or p.shape != given[0].shape or p.shape[1] != embed for p in given)
    ):
        raise ValueError(
            "prompt_qkv: prompt_q/k/v must all be [P, E] with the same P and E = "
            f"{embed}; got {', '.join(_shape(p) for p in prompts)}"
        )
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"prompt_qkv: {name} {_shape(t)} has dtype {t.dtype} but x {_shape(x)} has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"prompt_qkv: {name} is on {t.device} but x is on {x.device}")


def prompt_qkv(
    x, in_proj_weight, in_proj_bias, num_heads, prompt_q=None, prompt_k=None, prompt_v=None, *, backend=None
):
    if prompt_q is not None and prompt_k is None and prompt_v is None:
        prompt_k = prompt_v = prompt_q  # the shared-token case: one tensor serves as q, k and v rows
    prompts = (prompt_q, prompt_k, prompt_v)
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would cast the prompt F.linear calls but not the Triton kernel; cast everything once, as F.linear
        # would, so q/k/v and the prefix share a dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, in_proj_weight = x.to(dtype), in_proj_weight.to(dtype)
        in_proj_bias = None if in_proj_bias is None else in_proj_bias.to(dtype)
        prompts = tuple(None if p is None else p.to(dtype) for p in prompts)
    check_qkv_inputs(x, in_proj_weight, in_proj_bias, num_heads, prompts)
    embed = x.shape[-1]
    _dispatch.select("prompt_qkv", device=x.device, dtype=x.dtype, backend=backend, head_dim=embed // num_heads)
    qkv = PromptQKVFn.apply(x, in_proj_weight, in_proj_bias, num_heads)
    if prompt_q is None:
        return qkv, None
    # Batch-invariant rows: projected once per call ([P, E] GEMMs, too small to be worth a kernel), not per sample.
    weights = in_proj_weight.chunk(3)
    biases = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
    prefix = tuple(_project_heads(p, w, b, num_heads) for p, w, b in zip(prompts, weights, biases, strict=True))
    return qkv, prefix
