"""``python -m rpp_kernels.info``: versions, the GPU if any, and every backend with why it is (un)available.

``python -m rpp_kernels.info --kernels [--op attention|text|prompt_qkv|kd] [shape options]`` runs the static GPU gate
(``rpp_kernels.tools.static_gate``) at your own shape: every Triton kernel the op launches there, compiled for sm_80 and
sm_90 as that launch specialises it, with registers, spills, shared memory, tensor-core MMA and the grid. No GPU
needed; it exits 1 when a launch would spill, overflow shared memory, exceed a grid limit or miss tensor cores.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

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


# --kernels shape options: flag -> (gate_cases parameter, type)
_SHAPE_FLAGS = {
    "--batch": ("batch", int),
    "--heads": ("heads", int),
    "--tokens": ("n_tokens", int),
    "--prompts": ("n_prompt", int),
    "--prefix": ("n_prefix", int),
    "--head-dim": ("head_dim", int),
    "--classes": ("classes", int),
    "--embed": ("embed", int),
    "--teacher-embed": ("teacher_embed", int),
}


def _kernels_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rpp_kernels.info --kernels",
        description="Static GPU check of the Triton kernels one op launches at your shape (no GPU needed). "
        "Defaults: attention ViT-B/16 (B=128, H=12, N=197, P=16, D=64); text suffix B=1024, H=8, N=8, P=17; "
        "kd B=256, C=21841, E=512, Et=768, feats teacher, k=100.",
    )
    parser.add_argument("--kernels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", default="attention", choices=("attention", "text", "prompt_qkv", "kd"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--arch", default="80,90", help="comma-separated targets: 80, 90 (default both)")
    parser.add_argument("--forward-only", action="store_true", help="attention/text/prompt_qkv: no backward")
    parser.add_argument("--teacher", default=None, choices=("logits", "feats", "topk"), help="kd teacher form")
    parser.add_argument("--k", default=None, help="kd top-k: an int, or 'none' for the full teacher distribution")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    for flag, (_, ty) in _SHAPE_FLAGS.items():
        parser.add_argument(flag, type=ty, default=None)
    return parser


def kernels_main(argv: list[str]) -> int:
    """``--kernels``: the static gate at one shape. Returns the exit status (0 clean, 1 violations, 2 usage)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Interpreted kernels cannot be compiled: run again with Triton imported normally.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "rpp_kernels.info", *argv], env)
    args = _kernels_parser().parse_args(argv)
    err = _dispatch.triton_import_error()
    if err is not None:
        print(f"error: the static check needs triton: {err}", file=sys.stderr)
        return 2
    from rpp_kernels.tools import gate_cases, static_gate

    shape = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in _SHAPE_FLAGS.items()}
    shape = {k: v for k, v in shape.items() if v is not None}
    bad = {k: v for k, v in shape.items() if v < (0 if k in ("n_prompt", "n_prefix") else 1)}
    if bad:
        print(f"error: shape values must be positive (prompts/prefix may be 0), got {bad}", file=sys.stderr)
        return 2
    if args.op == "kd":
        if args.teacher:
            shape["form"] = args.teacher
        if args.k is not None:
            if args.k.lower() == "none":
                shape["k"] = None
            elif args.k.isdigit() and int(args.k) > 0:
                shape["k"] = int(args.k)
            else:
                print(f"error: --k must be a positive int or 'none', got {args.k!r}", file=sys.stderr)
                return 2
    elif args.forward_only:
        shape["backward"] = False
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
        case = gate_cases.custom_case(args.op, args.dtype, **shape)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not set(archs) <= set(static_gate.SHARED_LIMIT):
        print(f"error: --arch must be a comma-separated subset of 80,90, got {args.arch!r}", file=sys.stderr)
        return 2
    report = static_gate.run_gate([case], archs, args.jobs)
    static_gate._dedupe_rows(report)
    for arch in archs:
        print(static_gate.summary(report, arch))
    found = report.violations()
    for v in found:
        print(f"VIOLATION sm_{v['arch']} {v['kernel']}: {v['violation']} ({v['detail']})")
    if not found:
        print(
            f"no violations: {len(report.launches)} launches, no spills, shared memory within limits, grids within "
            "CUDA limits, tensor cores wherever tl.dot runs"
        )
    return int(bool(found))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--kernels" in argv:
        sys.exit(kernels_main(argv))
    if argv:
        print(f"error: unknown arguments {argv}; use --kernels [options] (see --kernels --help)", file=sys.stderr)
        sys.exit(2)
    print(report())


if __name__ == "__main__":
    main()
