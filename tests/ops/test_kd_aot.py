"""Ahead-of-time compile of the Triton KD kernel configs for sm_80 and sm_90 (no GPU needed): each builds and its
shared memory fits the architecture (sm_80: 166912 bytes, sm_90: 232448 bytes per block).

The compile runs in a subprocess without TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields interpreted
functions, which cannot be compiled). ``python tests/ops/test_kd_aot.py 90 [full]`` prints the table. Compiling every
config takes minutes on 2 cores, so that sweep is marked slow; the default test compiles the largest configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

SMEM_LIMIT = {80: 166912, 90: 232448}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(fn, ptr_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        elif name in ("scale", "inv_t"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _configs(full: bool):
    """(name, kernel, pointer types, constexprs, num_warps) for the tile configs the launchers pick, with the flags that
    use the most on-chip memory (teacher feats, every statistic, a class mask). ``full=True``: every k and feature-dim
    bucket in every dtype; ``full=False``: the largest configs of each kernel in bf16 and fp32."""
    import torch

    from rpp_kernels.ops._triton import dot_precision
    from rpp_kernels.ops.kd import TRITON_MAX_DIM
    from rpp_kernels.ops.kd import triton as kt
    from rpp_kernels.ops.kd.common import FEATS

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if full:
        dtypes["fp16"] = torch.float16
    for dt, torch_dtype in dtypes.items():
        elem = PTR[dt]
        ptrs = dict(
            sf_ptr=elem,
            ce_ptr=elem,
            t_ptr=elem,
            tf_ptr=elem,
            tce_ptr=elem,
            mask_ptr="*u8",
            lse_u_ptr="*fp32",
            lse_1_ptr="*fp32",
            lse_w_ptr="*fp32",
            ewd_ptr="*fp32",
            keys_ptr="*i64",
            coef_ptr="*fp32",
            dx_ptr="*fp32",
            dw_ptr="*fp32",
            idx_ptr="*i64",
            out_ptr="*fp32",
        )
        precision = dot_precision(torch_dtype)
        for k in (None, 1, 16, 32, 64, 100, 128) if full else (None, 128):
            cfg = kt._fwd_config(SimpleNamespace(k=k), topk=k is not None)
            warps = cfg.pop("num_warps")
            flags = dict(
                NEED_S=True, LSE_U=True, LSE_1=True, TEACHER=2, FULL=k is None, HAS_MASK=True, PRECISION=precision
            )
            yield f"fwd-k{k}-{dt}", kt._kd_fwd_kernel, ptrs, {**cfg, **flags}, warps
        top = TRITON_MAX_DIM[torch_dtype]
        dims = [(16, 16), (64, 64), (top // 2, top), (top, top // 2), (top, top)] if full else [(top, top)]
        for e, et in dims:
            p = SimpleNamespace(
                student_feats=torch.empty(1, e, dtype=torch_dtype, device="meta"),
                form=FEATS,
                teacher_feats=torch.empty(1, et, device="meta"),
                full_teacher=True,
            )
            cfg = kt._bwd_config(p)
            warps = cfg.pop("num_warps")
            flags = dict(LSE_U=True, LSE_1=True, FULL=True, TEACHER=2, HAS_MASK=True, PRECISION=precision)
            for name, fn in (("dx", kt._kd_bwd_dx_kernel), ("dw", kt._kd_bwd_dw_kernel)):
                yield f"bwd-{name}-E{e}-Et{et}-{dt}", fn, ptrs, {**cfg, **flags}, warps
        for j in (1, 101) if full else (101,):
            block_j = min(64, kt._pow2(j, 16))
            yield f"gather-J{j}-{dt}", kt._kd_gather_kernel, ptrs, dict(BLOCK_J=block_j, BLOCK_E=64), 4
            yield (
                f"sparse-J{j}-{dt}",
                kt._kd_bwd_sparse_kernel,
                ptrs,
                dict(BLOCK_J=block_j, BLOCK_E=64, DX=True, DW=True),
                4,
            )


# The default test compiles the configs that stress shared memory or compile time most (about 30 s per arch on 2 cores).
DEFAULT = ("fwd-k128-bf16", "bwd-dx-E256-Et256-fp32", "bwd-dw-E1024-Et1024-bf16")


def compile_all(arch: int, full: bool) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, ptrs, constexprs, warps in _configs(full):
        if not full and name not in DEFAULT:
            continue
        src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        rows.append({"name": name, "shared": compiled.metadata.shared})
    return rows


def _check(arch: int, full: bool, expected: int) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, __file__, str(arch)] + (["full"] if full else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == expected
    too_big = [r for r in rows if r["shared"] > SMEM_LIMIT[arch]]
    assert not too_big, f"sm_{arch}: shared memory over {SMEM_LIMIT[arch]} bytes: {too_big}"


@pytest.mark.parametrize("arch", [80, 90])
def test_kd_largest_configs_compile_and_fit_shared_memory(arch):
    _check(arch, full=False, expected=len(DEFAULT))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kd_every_config_compiles_and_fits_shared_memory(arch):
    _check(arch, full=True, expected=3 * (7 + 10 + 4))


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]), full="full" in sys.argv[2:])))
