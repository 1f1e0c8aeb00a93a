"""Helpers shared by the Triton launchers of every op."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: fp32 inputs get exact fp32 products (TF32 tensor cores keep a 10-bit mantissa
    and would miss the fp32 tolerance); fp16/bf16 use tensor cores with fp32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"


# SMs a launcher sizes its grid for when the tensors are on the CPU (interpreter tests). The static gate
# (rpp_kernels.tools.static_gate) sets an H100's 132, so the grids it records are the ones an H100 would launch.
CPU_SM_COUNT = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``CPU_SM_COUNT`` for CPU tensors): read it to size split grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT
