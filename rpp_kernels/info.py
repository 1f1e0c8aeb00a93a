"""``python -m rpp_kernels.info``: versions, the GPU if any, and every backend with why it is (un)available."""

from __future__ import annotations

import importlib
import platform

import torch

from rpp_kernels import _dispatch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return f"not available ({type(exc).__name__}: {exc})"


def report() -> str:
    import rpp_kernels  # registers every op's backends

    lines = [
        f"rpp_kernels {rpp_kernels.__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda})",
    ]
    lines += [f"{m} {_version(m)}" for m in ("triton", "open_clip", "timm", "xformers", "numpy")]
    lines.append(f"TRITON_INTERPRET: {'on' if _dispatch.triton_interpret() else 'off'}")
    ext = _dispatch.cuda_extension_error()
    if ext is None:
        lines.append(
            f"rpp_kernels._C: built ({'with' if _dispatch.cuda_extension_has_gpu_kernels() else 'without'} "
            "CUDA kernels)"
        )
    else:
        lines.append(f"rpp_kernels._C: {ext}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cc[0]}{cc[1]})")
        devices.append(torch.device("cuda", 0))
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    for device in devices:
        lines.append(f"backends on {device.type}:")
        for op, name, reasons in _dispatch.describe(device):
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {op:<10} {name:<7} {status}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
