"""The static GPU gate: compile every Triton kernel exactly as a real launch would specialise it, for sm_80 and sm_90,
and read the machine code -- without a GPU.

1. **Capture.** Each case of ``gate_cases`` runs a public op on CPU tensors while ``JITFunction.run`` is replaced by a
   recorder, so nothing executes; outputs stay uninitialised (``torch.empty``), which is fine because only shapes
   flow on. For every launch it records the kernel, the grid, ``num_warps``/``num_stages`` and each argument's
   specialisation computed by Triton's own ``native_specialize_impl`` with the CUDA backend -- the function a real
   launch calls: pointers 16-byte aligned get ``tt.divisibility=16``, integers divisible by 16 likewise, integers
   equal to 1 become constants. Large matmuls of the torch glue (``out_proj``, cuBLAS backward GEMMs) are skipped by a
   dispatch mode that returns uninitialised outputs of the right shape, so real shapes stay cheap on a CPU.
2. **Compile.** Each distinct specialisation is compiled once per target (``ASTSource`` + ``triton.compile`` for
   ``GPUTarget("cuda", 80|90, 32)``) in a process pool, with Triton's ``ptxas -v`` log captured: registers, spill
   stores/loads; ``metadata.shared`` for shared memory; ``tt.dot`` count in TTIR, dots lowered to FMA in TTGIR,
   ``mma.sync`` / ``wgmma.mma_async`` / ``cp.async`` in PTX.
3. **Check.** A launch violates the gate on any spill, shared memory over the target's opt-in limit, a grid dimension
   over CUDA's limits, a ``tl.dot`` without tensor-core MMA, or a failed compile.

Run ``python -m rpp_kernels.tools.static_gate --help`` (or ``python -m rpp_kernels.info --kernels`` for one shape).
The process must import Triton without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled); ``main`` re-runs
itself without it when it is set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ARCHS = (80, 90)
# Opt-in shared memory per block (bytes): sm_80 163 KiB, sm_90 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
GRID_LIMIT = (2**31 - 1, 65535, 65535)
# Per-SM resources of the targets, for occupancy (CTAs resident per SM).
SM_REGS, SM_SHARED, SM_MAX_WARPS, SM_MAX_CTAS = 65536, {80: 167936, 90: 233472}, {80: 64, 90: 64}, 32
H100_SMS = 132
VIOLATIONS = ("spill", "smem", "grid", "no-mma", "compile-error")
SCHEMA = 1


# ---------------------------------------------------------------------------------------------------------- capture
@dataclass
class Launch:
    """One intercepted launch. ``key`` identifies its compiled specialisation (shared by identical launches)."""

    case: str
    kernel: str  # "module:qualname"
    grid: tuple[int, int, int]
    signature: dict[str, str]  # argument -> Triton type, "constexpr" for constants
    constexprs: dict[str, object]  # declared constexprs and arguments specialised to constants (== 1, None)
    divisible: list[str]  # arguments with tt.divisibility=16 (16-byte aligned pointers, integers % 16 == 0)
    options: dict[str, object]  # num_warps, num_stages, ...
    tensors: dict[str, dict]  # pointer argument -> {shape, dtype, bytes, ptr} (a stand-in repeats another's ptr)
    scalars: dict[str, object]  # non-constexpr int/float arguments
    specialised: list[str] = field(default_factory=list)  # arguments the launch turned into constants (== 1, None)
    unspecialised: list[str] = field(default_factory=list)  # do_not_specialize arguments (plain i32/i64 whatever value)
    key: str = ""

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1]

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _spec_key(kernel: str, source: str, signature: dict, constexprs: dict, divisible: list, options: dict) -> str:
    blob = json.dumps([kernel, source, signature, constexprs, sorted(divisible), options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _record(fn, args: tuple, kwargs: dict, grid, case: str) -> Launch:
    """What ``JITFunction.run`` would compile and launch for these arguments, on a CUDA target."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    options = {k: _jsonable(v) for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constexprs, divisible, tensors, scalars, specialised = {}, {}, [], {}, {}, []
    for param in fn.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = _jsonable(value)
            continue
        ty, attr = native_specialize_impl(
            CUDABackend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if param.annotation_type:  # an annotated argument keeps its annotated type (as in JITFunction's binder)
            ty = param.annotation_type
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = _jsonable(value)
            specialised.append(param.name)
        if attr == "D":
            divisible.append(param.name)
        if isinstance(value, torch.Tensor):
            tensors[param.name] = {
                "shape": list(value.shape),
                "dtype": str(value.dtype).replace("torch.", ""),
                "bytes": value.numel() * value.element_size(),
                "ptr": value.data_ptr(),
            }
        elif isinstance(value, (int, float)) and ty != "constexpr":
            scalars[param.name] = value
    if callable(grid):
        grid = grid(dict(bound.arguments))
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    kernel = f"{fn.module}:{fn.fn.__qualname__}"
    unspecialised = [p.name for p in fn.params if p.do_not_specialize]
    launch = Launch(
        case, kernel, grid, signature, constexprs, divisible, options, tensors, scalars, specialised, unspecialised
    )
    # fn.cache_key hashes the kernel's source and that of every JIT function it calls: an edited kernel is a new key.
    launch.key = _spec_key(kernel, fn.cache_key, signature, constexprs, divisible, options)
    return launch


# The glue ops whose CPU cost grows with the shape but whose values the gate never needs.
_SKIPPED_OPS = ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "linear")


class _SkipMatmuls(TorchDispatchMode):
    """Returns uninitialised outputs (right shape, strides and dtype) for matmuls: real shapes, no CPU GEMMs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _SKIPPED_OPS:
            if "out" in kwargs:  # out= variants: the output keeps its (uninitialised) memory, resized as the op would
                out = kwargs["out"]
                rest = {k: v for k, v in kwargs.items() if k != "out"}
                meta = func.overloadpacket.default(*_to_meta(args), **_to_meta(rest))
                return out.resize_(meta.shape) if out.shape != meta.shape else out
            meta = func(*_to_meta(args), **_to_meta(kwargs))
            return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
        return func(*args, **kwargs)


def _to_meta(tree):
    return torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def capture(case: str = "") -> Iterator[list[Launch]]:
    """Record every Triton launch in the block (nothing executes); the Triton backends are forced on CPU tensors.

    Launchers that size grids by the SM count see an H100's 132 (``rpp_kernels.ops._triton.CPU_SM_COUNT``).
    """
    from triton.runtime.jit import JITFunction

    from rpp_kernels import _dispatch
    from rpp_kernels.ops import _triton

    if _dispatch.triton_interpret():
        raise RuntimeError("static_gate.capture needs Triton imported without TRITON_INTERPRET (kernels must compile)")
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_record(self, args, kwargs, grid, case))

    saved = (JITFunction.run, _dispatch.triton_interpret, getattr(_triton, "CPU_SM_COUNT", None))
    env = os.environ.get(_dispatch.BACKEND_ENV)
    JITFunction.run = run
    # The Triton backends accept CPU tensors only under the interpreter; here they only record, so let them through.
    _dispatch.triton_interpret = lambda: True
    _triton.CPU_SM_COUNT = H100_SMS
    os.environ[_dispatch.BACKEND_ENV] = "triton"
    try:
        with _SkipMatmuls():
            yield launches
    finally:
        JITFunction.run, _dispatch.triton_interpret = saved[0], saved[1]
        if saved[2] is not None:
            _triton.CPU_SM_COUNT = saved[2]
        if env is None:
            os.environ.pop(_dispatch.BACKEND_ENV, None)
        else:
            os.environ[_dispatch.BACKEND_ENV] = env


def capture_case(case) -> tuple[list[Launch], str | None]:
    """Launches of one case, or ``([], reason)`` when the op does not run on the Triton backend at that shape."""
    with capture(case.label) as launches:
        try:
            case.run()
        except NotImplementedError as exc:  # the dispatcher's reasons for not choosing triton
            return [], " ".join(str(exc).split())
    return launches, None


# ---------------------------------------------------------------------------------------------------------- compile
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
_RE_SCALAR16 = re.compile(r"^\s*ld\.global(?:\.[a-z]+)*\.(?:b16|u16|s16)\s", re.M)


def _ttgir_fma_dots(ttgir: str) -> int:
    """``tt.dot`` ops that were not lowered to a tensor-core encoding (their result is a blocked layout: FMA loop)."""
    n = 0
    for line in ttgir.splitlines():
        if re.search(r"\btt\.dot\b", line) and "->" in line:
            result = line.rsplit("->", 1)[1]
            n += "#mma" not in result and "nvidia_mma" not in result
    return n


def analyse(compiled, ptxas_log: str) -> dict:
    """Resource and instruction counts of one compiled kernel."""
    ptx, ttir, ttgir = compiled.asm["ptx"], compiled.asm["ttir"], compiled.asm["ttgir"]
    regs = [int(m) for m in _RE_REGS.findall(ptxas_log)]
    spills = [(int(a), int(b)) for a, b in _RE_SPILL.findall(ptxas_log)]
    stack = [int(m) for m in _RE_STACK.findall(ptxas_log)]
    return {
        "registers": max(regs) if regs else None,
        "spill_stores": max((s for s, _ in spills), default=0),
        "spill_loads": max((l for _, l in spills), default=0),
        "stack": max(stack, default=0),
        "shared": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "dots": len(re.findall(r"\btt\.dot\b", ttir)),
        "fma_dots": _ttgir_fma_dots(ttgir),
        "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)) + len(re.findall(r"cp\.async\.bulk", ptx)),
        "scalar16_loads": len(_RE_SCALAR16.findall(ptx)),
    }


def compile_spec(spec: dict, arch: int, cache_dir: str | None = None) -> dict:
    """Compile one recorded specialisation for ``sm_<arch>``; ``{"error": ...}`` when it fails. Cached by key."""
    path = Path(cache_dir, f"{spec['key']}-sm{arch}.json") if cache_dir else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, qualname = spec["kernel"].split(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    src = ASTSource(
        fn,
        dict(spec["signature"]),
        dict(spec["constexprs"]),
        {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]},
    )
    log = io.StringIO()
    start = time.perf_counter()
    cpu = _cpu_seconds()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log (registers, spills) to stdout
    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    try:
        # An empty Triton cache: a cache hit would skip ptxas and with it the register/spill log.
        with tempfile.TemporaryDirectory(prefix="rpp-gate-triton-") as tmp, contextlib.redirect_stdout(log):
            os.environ["TRITON_CACHE_DIR"] = tmp
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
            result = analyse(compiled, log.getvalue())
    except Exception as exc:  # noqa: BLE001 - a failed compile is a gate violation, reported with its message
        result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
    finally:
        if saved_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache
    result["compile_s"] = round(time.perf_counter() - start, 2)
    result["cpu_s"] = round(_cpu_seconds() - cpu, 2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _compile_job(job):
    spec, arch, cache_dir = job
    return spec["key"], arch, compile_spec(spec, arch, cache_dir)


def compile_all(specs: Iterable[dict], archs=ARCHS, jobs: int | None = None, cache_dir: str | None = None) -> dict:
    """``{(key, arch): result}`` for every distinct specialisation, compiled in a pool of ``jobs`` processes."""
    work = [(spec, arch, cache_dir) for spec in specs for arch in archs]
    # Longest first (backward and KD kernels), so the pool does not end on one long compile.
    work.sort(key=lambda w: ("bwd" not in w[0]["kernel"] and "kd" not in w[0]["kernel"], w[0]["key"]))
    jobs = jobs or min(len(work), os.cpu_count() or 1) or 1
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        return {(key, arch): res for key, arch, res in pool.map(_compile_job, work)}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------ check
def occupancy(result: dict, arch: int) -> int | None:
    """CTAs resident per SM from registers (allocated per warp in units of 256), shared memory and warps."""
    if "error" in result or not result.get("registers"):
        return None
    warps = result["num_warps"]
    regs_per_warp = -(-result["registers"] * 32 // 256) * 256
    by_regs = SM_REGS // (regs_per_warp * warps)
    by_smem = SM_SHARED[arch] // (result["shared"] + 1024) if result["shared"] else SM_MAX_CTAS
    return max(0, min(by_regs, by_smem, SM_MAX_WARPS[arch] // warps, SM_MAX_CTAS))


def violations(launch: dict, result: dict, arch: int) -> list[tuple[str, str]]:
    """(kind, detail) for each way this launch breaks the gate on ``sm_<arch>``."""
    out = []
    if any(g > lim for g, lim in zip(launch["grid"], GRID_LIMIT, strict=True)):
        out.append(("grid", f"grid {tuple(launch['grid'])} over CUDA's limits (x <= 2^31-1, y/z <= 65535)"))
    if "error" in result:
        return out + [("compile-error", result["error"])]
    if result["spill_stores"] or result["spill_loads"]:
        out.append(("spill", f"{result['spill_stores']} B spill stores, {result['spill_loads']} B spill loads"))
    if result["shared"] > SHARED_LIMIT[arch]:
        out.append(("smem", f"{result['shared']} B shared memory > {SHARED_LIMIT[arch]} B"))
    if result["dots"] and (result["fma_dots"] or not (result["mma_sync"] or result["wgmma"])):
        out.append(("no-mma", f"{result['dots']} tl.dot, {result['fma_dots']} lowered to FMA, no tensor-core MMA"))
    return out


@dataclass
class Report:
    """Everything one gate run found; ``rows(arch)`` is the per-launch table committed as JSON."""

    archs: tuple[int, ...]
    launches: list[dict]
    results: dict  # "key/arch" -> compile result
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why triton does not run it
    seconds: dict[str, float] = field(default_factory=dict)

    def result(self, launch: dict, arch: int) -> dict:
        return self.results[f"{launch['key']}/{arch}"]

    def violations(self, arch: int | None = None) -> list[dict]:
        """Distinct (case, kernel, arch, kind) violations with one detail each."""
        seen = {}
        for launch in self.launches:
            for a in self.archs if arch is None else (arch,):
                for kind, detail in violations(launch, self.result(launch, a), a):
                    name = launch["kernel"].rsplit(":", 1)[-1]
                    seen.setdefault((launch["case"], name, a, kind), detail)
        return [dict(case=c, kernel=k, arch=a, violation=v, detail=d) for (c, k, a, v), d in seen.items()]

    def rows(self, arch: int) -> list[dict]:
        rows = []
        for launch in self.launches:
            res = self.result(launch, arch)
            row = {
                "case": launch["case"],
                "kernel": launch["kernel"].rsplit(":", 1)[-1],
                "grid": launch["grid"],
                "ctas": launch["grid"][0] * launch["grid"][1] * launch["grid"][2],
                "constexprs": {k: v for k, v in launch["constexprs"].items() if k.isupper()},
                "options": launch["options"],
                "key": launch["key"],
            }
            row.update({k: v for k, v in res.items() if k not in ("compile_s", "cpu_s")})
            row["ctas_per_sm"] = occupancy(res, arch)
            row["violations"] = [kind for kind, _ in violations(launch, res, arch)]
            rows.append(row)
        return rows

    def table(self, arch: int) -> dict:
        import triton

        return {
            "schema": SCHEMA,
            "what": f"static GPU gate: every Triton launch of the gate's cases compiled for sm_{arch} as a real launch "
            "specialises it (no GPU; ptxas -v and PTX read)",
            "target": f"sm_{arch}",
            "shared_limit": SHARED_LIMIT[arch],
            "versions": {"triton": triton.__version__, "torch": torch.__version__},
            "skipped": self.skipped,
            "launches": self.rows(arch),
        }


def run_gate(cases, archs=ARCHS, jobs: int | None = None, cache_dir: str | None = None, log=None) -> Report:
    """Capture every case, compile each distinct specialisation for each arch, and return the report."""
    start = time.perf_counter()
    launches, skipped = [], {}
    for case in cases:
        recorded, why = capture_case(case)
        if why is None and not recorded:
            why = "no Triton launch: the op runs on torch/cuBLAS at this shape"
        if why is not None:
            skipped[case.label] = why
        launches += [asdict(launch) for launch in recorded]
        if log:
            log(f"captured {case.label}: {len(recorded)} launches" + (f" (skipped: {why})" if why else ""))
    captured = time.perf_counter()
    specs = {launch["key"]: launch for launch in launches}
    if log:
        log(f"compiling {len(specs)} specialisations x {len(archs)} targets")
    results = compile_all(specs.values(), archs, jobs, cache_dir)
    results = {f"{key}/{arch}": res for (key, arch), res in results.items()}
    seconds = {"capture": round(captured - start, 1), "compile": round(time.perf_counter() - captured, 1)}
    return Report(tuple(archs), launches, results, skipped, seconds)


# --------------------------------------------------------------------------------------------------- known violations
def load_known(path: str | os.PathLike) -> list[dict]:
    """The committed known-violations list: entries ``{case, kernel, arch, violation, reason}``."""
    entries = json.loads(Path(path).read_text())["known"]
    for e in entries:
        missing = {"case", "kernel", "arch", "violation", "reason"} - set(e)
        if missing or e["violation"] not in VIOLATIONS or not str(e["reason"]).strip():
            raise ValueError(f"known-violations entry {e} lacks {sorted(missing)} or has an unknown kind/empty reason")
    return entries


def compare_known(found: list[dict], known: list[dict], cases: Iterable[str]) -> tuple[list[dict], list[dict]]:
    """(new violations not in the list, listed entries that no longer violate). Entries of cases not run are kept."""
    ident = lambda e: (e["case"], e["kernel"], int(e["arch"]), e["violation"])  # noqa: E731
    listed = {ident(e) for e in known}
    have = {ident(v) for v in found}
    ran = set(cases)
    new = [v for v in found if ident(v) not in listed]
    stale = [e for e in known if ident(e) not in have and e["case"] in ran]
    return new, stale


# --------------------------------------------------------------------------------------------------------- printing
def summary(report: Report, arch: int) -> str:
    """One line per (case, kernel) on ``sm_<arch>``: grid, CTAs, regs, spills, shared memory, MMA, violations."""
    lines = [
        f"sm_{arch} (shared limit {SHARED_LIMIT[arch]} B)",
        f"{'case':<44} {'kernel':<34} {'grid':>18} {'CTAs':>8} {'regs':>4} {'spill':>9} {'smem':>7} "
        f"{'mma':>6} {'occ':>3}  violations",
    ]
    for row in report.rows(arch):
        if "error" in row:
            mma, regs, spill, smem = "-", "-", "-", "-"
        else:
            mma = str(row["wgmma"] or row["mma_sync"]) + ("w" if row["wgmma"] else "") if row["dots"] else "."
            regs, spill, smem = row["registers"], f"{row['spill_stores']}/{row['spill_loads']}", row["shared"]
        grid = "x".join(map(str, row["grid"]))
        lines.append(
            f"{row['case'][:44]:<44} {row['kernel'][:34]:<34} {grid:>18} {row['ctas']:>8} {regs!s:>4} {spill:>9} "
            f"{smem!s:>7} {mma:>6} {row['ctas_per_sm']!s:>3}  {','.join(row['violations']) or 'ok'}"
        )
    for case, why in report.skipped.items():
        lines.append(f"{case[:44]:<44} not on the triton backend: {why}")
    return "\n".join(lines)


def _dedupe_rows(report: Report) -> None:
    """Identical (case, key, grid) launches (e.g. one kernel per layer) are listed once."""
    seen, kept = set(), []
    for launch in report.launches:
        ident = (launch["case"], launch["key"], tuple(launch["grid"]))
        if ident not in seen:
            seen.add(ident)
            kept.append(launch)
    report.launches = kept


def write_tables(report: Report, out_dir: str | os.PathLike) -> list[Path]:
    out = []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for arch in report.archs:
        path = Path(out_dir, f"sm_{arch}.json")
        path.write_text(json.dumps(report.table(arch), indent=1) + "\n")
        out.append(path)
    return out


README_CASES = (
    "attention vit-b16 P=16 bf16",
    "attention vit-b16 P=16 fp32",
    "attention vit-l14 P=16 bf16",
    "attention vit-b16 P=16 D=80 bf16",
    "attention text-suffix bf16",
    "attention text-suffix-21k-eval bf16",
    "kd E=512 Et=768 feats k=100 bf16",
    "kd E=1024 Et=1024 feats k=None bf16",
)


def markdown(tables_dir: str | os.PathLike, labels: Iterable[str] = README_CASES) -> str:
    """The README's short version of ``sm_80.json`` + ``sm_90.json``: one row per (case, kernel) of ``labels``."""
    tables = {a: json.loads(Path(tables_dir, f"sm_{a}.json").read_text()) for a in ARCHS}
    by_arch = {a: {(r["case"], r["kernel"], tuple(r["grid"])): r for r in t["launches"]} for a, t in tables.items()}
    lines = [
        "| case | kernel | CTAs | sm_80 regs / spill B / smem B / MMA | sm_90 regs / spill B / smem B / MMA | gate |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        for ident, r80 in by_arch[80].items():
            if ident[0] != label:
                continue
            r90 = by_arch[90].get(ident, {})

            def cell(r):
                if not r or "error" in r:
                    return "compile error" if r else "-"
                mma = f"{r['wgmma']} wgmma" if r["wgmma"] else f"{r['mma_sync']} mma.sync"
                return f"{r['registers']} / {r['spill_stores']} / {r['shared']:,} / {mma if r['dots'] else '.'}"

            bad = sorted(set(r80["violations"]) | set(r90.get("violations", [])))
            lines.append(
                f"| {label} | `{ident[1]}` | {r80['ctas']:,} | {cell(r80)} | {cell(r90)} | {', '.join(bad) or 'ok'} |"
            )
    return "\n".join(lines)


def _reexec_without_interpreter(argv: list[str], module: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _reexec_without_interpreter(argv, "rpp_kernels.tools.static_gate")
    from rpp_kernels.tools import gate_cases

    parser = argparse.ArgumentParser(
        prog="python -m rpp_kernels.tools.static_gate",
        description="Compile every Triton launch of the gate's cases for sm_80/sm_90 as a real launch specialises it "
        "and check spills, shared memory, grid limits and tensor-core MMA (no GPU needed).",
    )
    parser.add_argument("--all", action="store_true", help="add the extra cases (fp16 head-dim sweep)")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    parser.add_argument("--arch", default="80,90", help="comma-separated targets (default 80,90)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--cache", default=None, help="directory caching compile results by specialisation key")
    parser.add_argument("--json", default=None, help="write the whole report (launches + results) to this file")
    parser.add_argument("--tables", default=None, help="write sm_<arch>.json tables into this directory")
    parser.add_argument("--known", default=None, help="known-violations file: report new and stale entries")
    parser.add_argument("--quiet", action="store_true", help="print only the violations")
    parser.add_argument("--markdown", default=None, help="print the README table from this tables directory; exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
        if not set(archs) <= set(SHARED_LIMIT):
            raise ValueError
    except ValueError:
        print(f"error: --arch must be a comma-separated subset of 80,90, got {args.arch!r}", file=sys.stderr)
        return 2
    cases = [c for c in gate_cases.cases() if args.all or c.group == "core"]
    if args.only:
        cases = [c for c in cases if args.only in c.label]
        if not cases:
            print(f"error: no case label contains {args.only!r}", file=sys.stderr)
            return 2
    log = None if args.quiet else lambda msg: print(msg, file=sys.stderr, flush=True)
    report = run_gate(cases, archs, args.jobs, args.cache, log)
    _dedupe_rows(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report)))
    if args.tables:
        for path in write_tables(report, args.tables):
            print(f"wrote {path}", file=sys.stderr)
    if not args.quiet:
        for arch in archs:
            print(summary(report, arch))
    found = report.violations()
    status = 0
    if args.known:
        new, stale = compare_known(found, load_known(args.known), [c.label for c in cases])
        for v in new:
            print(f"NEW sm_{v['arch']} {v['case']} {v['kernel']}: {v['violation']} ({v['detail']})")
        for e in stale:
            print(f"STALE sm_{e['arch']} {e['case']} {e['kernel']}: {e['violation']} no longer happens; remove it")
        status = int(bool(new or stale))
    else:
        for v in found:
            print(f"sm_{v['arch']} {v['case']} {v['kernel']}: {v['violation']} ({v['detail']})")
        status = int(bool(found))
    print(
        f"{len(report.launches)} launches, {len(report.results)} compiles, {len(found)} violations; "
        f"capture {report.seconds['capture']} s, compile {report.seconds['compile']} s",
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
