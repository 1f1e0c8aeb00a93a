"""Builds rpp_kernels._C from csrc/ when possible; a missing toolchain is a warning, never a failed install.

* ``csrc/*.cpp`` always go into the extension (they hold the CPU instances of the ``__host__ __device__`` logic, so the
  same code is tested without a GPU).
* ``csrc/*.cu`` are added when a CUDA toolkit is found (``CUDA_HOME`` or the root of the ``nvcc`` on PATH, wrappers
  resolved) and ``RPP_SKIP_CUDA_BUILD`` is unset; ``RPP_CUDA_ARCHS`` (default ``80;90``) picks the SASS targets, and
  PTX of the highest one is embedded too, so GPUs newer than every target JIT-compile it instead of failing with "no
  kernel image". The list is compiled in as ``rpp_kernels._C.CUDA_ARCHS`` (``"sm_80;sm_90;compute_90"``) for the cuda
  backend's compute-capability check.
* ``RPP_SKIP_CUDA_BUILD=1`` skips the extension entirely.
"""

import glob
import os
import re
import shutil
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """The toolkit root. ``nvcc`` on PATH may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), in
    which case torch's own guess (dirname of the wrapper) is wrong and linking cudart fails; follow the wrapper."""
    if os.environ.get("CUDA_HOME"):
        root = os.environ["CUDA_HOME"]
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
        warnings.warn(f"CUDA_HOME={root} has no bin/nvcc: building rpp_kernels._C without CUDA kernels.", stacklevel=2)
        return None
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                candidates += re.findall(r"(/\S+)/bin/nvcc", head.decode(errors="replace"))
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return root
    return None


def cuda_targets(spec: str) -> tuple[list[int], list[str]]:
    """``RPP_CUDA_ARCHS`` (``"80;90"``, commas allowed) -> (sorted archs, nvcc ``-gencode`` flags): SASS for each arch
    plus PTX of the highest, which the driver JIT-compiles on GPUs newer than every listed arch."""
    items = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]
    if not items or not all(a.isdigit() for a in items):
        raise SystemExit(f"RPP_CUDA_ARCHS must list compute capabilities like '80;90', got {spec!r}")
    archs = sorted({int(a) for a in items})
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return archs, flags


def extension_kwargs() -> dict:
    if os.environ.get("RPP_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        warnings.warn(
            "RPP_SKIP_CUDA_BUILD is set: rpp_kernels._C is not built; the triton/torch backends remain.", stacklevel=2
        )
        return {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp and not cu:
        return {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    else:
        os.environ.pop("CUDA_HOME", None)  # an invalid value would break even the CPU-only build
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn(
            "torch is not importable at build time: rpp_kernels._C is not built (install torch first and "
            "use pip's --no-build-isolation).",
            stacklevel=2,
        )
        return {}
    cxx = ["-O3", "-std=c++20"]  # the torch 2.14 headers refuse anything older than C++20
    if cuda_home and cu:
        archs, gencode = cuda_targets(os.environ.get("RPP_CUDA_ARCHS", "80;90"))
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *gencode]
        # The targets reach bindings.cpp as integer macros (a quoted string would have to survive ninja's shell), for
        # the C++ compiler only: nvcc splits -D values at commas.
        archs_cxx = [f"-DRPP_CUDA_SASS={','.join(map(str, archs))}", f"-DRPP_CUDA_PTX={archs[-1]}"]
        ext = CUDAExtension(
            "rpp_kernels._C",
            cpp + cu,
            define_macros=[("RPP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + archs_cxx, "nvcc": nvcc},
        )
    else:
        if cu:
            warnings.warn(
                "no CUDA toolkit found (set CUDA_HOME): rpp_kernels._C is built with its CPU code only.", stacklevel=2
            )
        ext = CppExtension("rpp_kernels._C", cpp, extra_compile_args={"cxx": cxx})

    class TolerantBuild(BuildExtension):
        """A failed extension build leaves the pure-Python package usable (triton/torch backends)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not fail the install
                warnings.warn(f"rpp_kernels._C failed to build and is skipped: {exc}", stacklevel=2)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": TolerantBuild.with_options(use_ninja=True)}}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import cuda_targets
    setup(**extension_kwargs())
