"""Helpers shared by the Triton launchers of every op."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: fp32 inputs get exact fp32 products (TF32 tensor cores keep a 10-bit mantissa
    and would miss the fp32 tolerance); fp16/bf16 use tensor cores with fp32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"
