"""Helpers shared by the Triton launchers of every op."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype, fp32: str = "ieee") -> str:
    """``tl.dot``'s ``input_precision``: fp16/bf16 use tensor cores with fp32 accumulation; fp32 inputs get ``fp32``.

    ``"ieee"`` (the default) gives exact fp32 products on FMA units; ``"tf32x3"`` splits each operand into TF32 high
    and low halves and sums three tensor-core products, which keeps fp32-level error (the dropped low x low term is
    ~2^-22 relative) at tensor-core speed. Plain ``"tf32"`` keeps a 10-bit mantissa and would miss the fp32
    tolerance, so it is never chosen for fp32.
    """
    if fp32 not in ("ieee", "tf32x3"):
        raise ValueError(f"dot_precision: fp32 must be 'ieee' or 'tf32x3', got {fp32!r}")
    return fp32 if dtype == torch.float32 else "tf32"


# SMs a launcher sizes its grid for when the tensors are on the CPU (interpreter tests). The static gate
# (rpp_kernels.tools.static_gate) sets an H100's 132, so the grids it records are the ones an H100 would launch.
CPU_SM_COUNT = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``CPU_SM_COUNT`` for CPU tensors): read it to size split grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT
