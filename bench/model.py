"""Work model of every Triton launch at the static gate's shapes: a MODEL, never a measurement.

For each launch the static gate records (``rpp_kernels.tools.static_gate.capture``: real grid, tile constexprs and
scalar arguments of the launchers, nothing executed), the per-kernel descriptions below compute

* MMA FLOPs executed: every ``tl.dot`` of every loop trip the program runs, at its padded tile shape;
* MMA FLOPs useful: the unpadded matmul work of the op (FlashAttention's count: 2 matmuls forward, 5 backward);
* minimum HBM bytes: each tensor the kernel must read or write, once;
* streamed bytes: what the programs load and store, summed over programs (no L2 reuse assumed);
* CTAs per wave on an H100 (132 SMs x CTAs resident per SM from the sm_90 compile's registers and shared memory,
  read from ``bench/results/static/sm_90.json`` when it holds the same specialisation; else 1 per SM);
* a lower-bound H100 time: ``max(ceil(CTAs / 132) * FLOPs per CTA / (peak / 132), min bytes / 3.35 TB/s)`` with peak
  989 TFLOP/s dense bf16/fp16, 494.5 TF32, a third of that for 3xTF32, 67 for fp32 FMA (``input_precision="ieee"``).

Each kernel's description states how many ``tl.dot`` calls it and each JIT helper it calls contain
(``DOTS``); ``check_dots`` compares that with the kernel source, so a kernel that changes its matmuls fails
``pytest bench/test_model.py`` until its description here is updated. Kernel owners keep these current.

Run ``python bench/model.py [--out bench/results/model] [--only TEXT]`` (imports Triton without the interpreter).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H100 = {"sms": 132, "hbm_bytes_per_s": 3.35e12}
PEAK_FLOPS = {"16-bit": 989e12, "tf32": 494.5e12, "tf32x3": 494.5e12 / 3, "ieee": 67e12}
LABEL = "MODEL: computed from the launches' grids and tiles (no GPU ran this); never a measurement"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class View:
    """One recorded launch, read by the descriptions: ``c`` constexprs, ``s`` scalars, ``t`` tensors."""

    kernel: str
    grid: tuple[int, int, int]
    c: dict
    s: dict
    t: dict

    def nbytes(self, *names: str) -> int:
        """Bytes of the named tensors, each distinct tensor once (stand-ins repeat another argument's pointer)."""
        seen, total = set(), 0
        for name in names:
            info = self.t.get(name)
            if info is None:
                continue
            ident = (info["ptr"], tuple(info["shape"]))
            if ident not in seen:
                seen.add(ident)
                total += info["bytes"]
        return total

    def elem(self, name: str) -> int:
        info = self.t[name]
        return info["bytes"] // max(1, math.prod(info["shape"]))


@dataclass
class Work:
    family: str  # the op pass the launch belongs to: attention-fwd, attention-bwd, qkv-fwd, kd-fwd, kd-bwd
    mma_flops: float  # executed, padded tiles included
    min_bytes: float
    streamed_bytes: float
    precision: str  # key of PEAK_FLOPS


KERNELS: dict[str, Callable[[View], Work]] = {}
# kernel -> {JIT function reached from it: number of tl.dot calls in its body}; functions without tl.dot may be omitted
DOTS: dict[str, dict[str, int]] = {}
SOURCES = {
    "attention": "rpp_kernels/ops/attention/triton.py",
    "kd": "rpp_kernels/ops/kd/triton.py",
}


def describe(name: str, dots: dict[str, int]):
    def register(fn):
        KERNELS[name], DOTS[name] = fn, dots
        return fn

    return register


def _precision(v: View, pointer: str, constexpr: str) -> str:
    if v.t[pointer]["dtype"] in ("bfloat16", "float16"):
        return "16-bit"
    return str(v.c.get(constexpr, "ieee"))


# ---------------------------------------------------------------------------------------------- attention kernels
# prompt_qkv has no Triton kernel: it is F.linear (cuBLAS) + head-split views (family qkv-fwd, no launch).
def _arg(v: View, name: str) -> int:
    """A scalar argument, wherever specialisation put it (an argument equal to 1 is a constexpr)."""
    value = v.s.get(name, v.c.get(name))
    return 0 if value is None else int(value)


def _token_tiles_fwd(v: View, start_m: int) -> int:
    """Token key tiles a forward query block starting at ``start_m`` visits (causal: up to the diagonal)."""
    bm, bn, n_k = v.c["BLOCK_M"], v.c["BLOCK_N"], _arg(v, "n_k")
    return cdiv(min(n_k, start_m + bm) if v.c["CAUSAL"] else n_k, bn)


@describe("_prompt_attn_fwd_kernel", {"_prompt_attn_fwd_kernel": 0, "_fwd_tiles": 2})
def _attn_fwd(v: View) -> Work:
    # 1-D grid: batch * heads * query blocks; each block walks cdiv(P, BLOCK_P) prefix tiles, then its token tiles.
    bm, bn, bp, bd = v.c["BLOCK_M"], v.c["BLOCK_N"], v.c["BLOCK_P"], v.c["BLOCK_D"]
    n_q, n_prefix = _arg(v, "n_q"), _arg(v, "n_prefix")
    m_blocks = cdiv(n_q, bm)
    heads = v.grid[0] // max(1, m_blocks)
    token = sum(_token_tiles_fwd(v, m * bm) for m in range(m_blocks))
    prefix = m_blocks * cdiv(n_prefix, bp)
    elem = v.elem("q_ptr")
    streamed = heads * ((prefix * bp + token * bn) * 2 * bd + m_blocks * 2 * bm * bd) * elem
    return Work(
        "attention-fwd",
        heads * 2 * 2 * bm * bd * (prefix * bp + token * bn),
        v.nbytes("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "o_ptr", "lse_ptr") if n_q else 0,
        streamed,
        _precision(v, "q_ptr", "DOT_PRECISION"),
    )


@describe("_bwd_preprocess_kernel", {"_bwd_preprocess_kernel": 0})
def _attn_pre(v: View) -> Work:
    both = v.nbytes("o_ptr", "do_ptr", "delta_ptr")
    return Work("attention-bwd", 0, both, both, _precision(v, "o_ptr", ""))


@describe("_prompt_attn_bwd_kernel", {"_prompt_attn_bwd_kernel": 0, "_bwd_key_block": 5})
def _attn_bwd(v: View) -> Work:
    # Programs (split, head) together visit every (sample, head) once: per key block (prefix blocks, then token blocks,
    # causal from the diagonal) the streamed query blocks run 5 matmuls each (S, dP, dV, dK, dQ); dQ accumulates in an
    # fp32 scratch (read + write per pair), converted once at the end.
    bm, bn, bp, bd = v.c["BLOCK_M"], v.c["BLOCK_N"], v.c["BLOCK_P"], v.c["BLOCK_D"]
    n_q, n_k, n_prefix = _arg(v, "n_q"), _arg(v, "n_k"), _arg(v, "n_prefix")
    items = _arg(v, "n_batch") * _arg(v, "n_heads")
    m_blocks = cdiv(n_q, bm)
    prefix_pairs = cdiv(n_prefix, bp) * m_blocks
    token_pairs = sum(m_blocks - ((j * bn) // bm if v.c["CAUSAL"] else 0) for j in range(cdiv(n_k, bn)))
    key_rows = prefix_pairs * bp + token_pairs * bn  # sum over pairs of the key block's rows
    pairs = prefix_pairs + token_pairs
    elem = v.elem("q_ptr")
    per_item = (
        (cdiv(n_prefix, bp) * bp + cdiv(n_k, bn) * bn) * 4 * bd * elem  # K, V in; dK, dV out
        + pairs * bm * (2 * bd * elem + 2 * bd * 4 + 8)  # q, dO, lse, delta in; dQ scratch read + write
        + m_blocks * bm * bd * (4 + elem)  # final dQ conversion
    )
    return Work(
        "attention-bwd",
        items * 5 * 2 * bm * bd * key_rows,
        v.nbytes(
            "q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dq_ptr", "dk_ptr",
            "dv_ptr", "dpk_ptr", "dpv_ptr",
        ),
        items * per_item,
        _precision(v, "q_ptr", "DOT_PRECISION"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- KD kernels
def _kd_pad(v: View, dim: str, block: str) -> int:
    return cdiv(_arg(v, dim), v.c[block]) * v.c[block]


def _kd_full_teacher(v: View) -> tuple[int, int]:
    """(bytes, padded Et) of the full teacher a fwd/ds launch reads: 1 logits, 2 feats (a tl.dot over Et). The fwd
    kernel's FULL holds that form; the ds kernel's FULL is a flag with the form in TEACHER."""
    full = v.c["FULL"] if "TEACHER" not in v.c else (v.c["TEACHER"] if v.c["FULL"] else 0)
    if full == 1:
        return v.nbytes("t_ptr"), 0
    if full == 2:
        return v.nbytes("tf_ptr", "tce_ptr"), _kd_pad(v, "ET", "BLOCK_ET")
    return 0, 0


@describe("_kd_fwd_kernel", {"_kd_fwd_kernel": 0, "_logits_tile": 1})
def _kd_fwd(v: View) -> Work:
    # Grid (row blocks, class splits): every row block visits every class tile once, whatever the split.
    bb, bc = v.c["BLOCK_B"], v.c["BLOCK_C"]
    tiles = v.grid[0] * cdiv(_arg(v, "C"), bc)
    teacher_bytes, et_pad = _kd_full_teacher(v)
    k_total = _kd_pad(v, "E", "BLOCK_E") + et_pad
    outs = v.nbytes("part_ptr")
    streamed = tiles * (bb + bc) * k_total * v.elem("sf_ptr") + outs
    if v.c["FULL"] == 1:
        streamed += teacher_bytes
    return Work(
        "kd-fwd",
        tiles * 2 * bb * bc * k_total,
        v.nbytes("sf_ptr", "ce_ptr", "mask_ptr") + teacher_bytes + outs,
        streamed,
        _precision(v, "sf_ptr", "PRECISION"),
    )


@describe("_kd_topk_kernel", {"_kd_topk_kernel": 0})
def _kd_topk(v: View) -> Work:
    # Reads one [B, NC] chunk of teacher logits (given, or from a cuBLAS matmul: see useful_flops' kd-cublas).
    elem = v.elem("t_ptr")
    both = _arg(v, "B") * _arg(v, "NC") * elem + v.nbytes("keys_ptr")
    return Work("kd-fwd", 0, both, both, "ieee")


@describe("_kd_gather_kernel", {"_kd_gather_kernel": 0})
def _kd_gather(v: View) -> Work:
    rows, j = v.grid[0], _arg(v, "J")
    gathered = rows * j * _arg(v, "E") * v.elem("ce_ptr")
    return Work("kd-fwd", 0, v.nbytes("sf_ptr", "idx_ptr", "out_ptr") + gathered, gathered, "ieee")


@describe("_kd_bwd_ds_kernel", {"_kd_bwd_ds_kernel": 0, "_logits_tile": 1})
def _kd_ds(v: View) -> Work:
    # Grid (row blocks, class tiles of the chunk): recomputes s (and a full feats teacher's t) once per tile and writes
    # ds; the two gradient matmuls on ds run on cuBLAS (useful_flops' kd-cublas).
    bb, bc = v.c["BLOCK_B"], v.c["BLOCK_C"]
    ctas = v.grid[0] * v.grid[1]
    teacher_bytes, et_pad = _kd_full_teacher(v)
    k_total = _kd_pad(v, "E", "BLOCK_E") + et_pad
    streamed = ctas * (bb + bc) * k_total * v.elem("sf_ptr") + v.nbytes("ds_ptr")
    return Work(
        "kd-bwd",
        ctas * 2 * bb * bc * k_total,
        v.nbytes("sf_ptr", "ce_ptr", "coef_ptr", "ds_ptr", "mask_ptr") + teacher_bytes,
        streamed,
        _precision(v, "sf_ptr", "PRECISION"),
    )


@describe("_kd_bwd_ds_sparse_kernel", {"_kd_bwd_ds_sparse_kernel": 0})
def _kd_ds_sparse(v: View) -> Work:
    # The k + 1 sparse coefficients per row added into the ds chunk: B * J slots, each ds entry read and written.
    slots = v.grid[0] * _arg(v, "J")
    moved = v.nbytes("idx_ptr", "coef_ptr") + 2 * slots * v.elem("ds_ptr")
    return Work("kd-bwd", 0, moved, moved, "ieee")


@describe("_kd_bwd_sparse_dx_kernel", {"_kd_bwd_sparse_dx_kernel": 0})
def _kd_sparse_dx(v: View) -> Work:
    rows, j = v.grid[0], _arg(v, "J")
    moved = rows * j * _arg(v, "E") * v.elem("ce_ptr")  # gathered class embeddings
    return Work("kd-bwd", 0, v.nbytes("idx_ptr", "coef_ptr") + 2 * v.nbytes("dx_ptr") + moved, moved, "ieee")


@describe("_kd_bwd_sparse_dw_kernel", {"_kd_bwd_sparse_dw_kernel": 0})
def _kd_sparse_dw(v: View) -> Work:
    # One program per class over its slots (CSR): B * J gathered feature rows, each touched class row read + written.
    slots = v.t["src_ptr"]["shape"][0]
    moved = slots * _arg(v, "E") * (v.elem("sf_ptr") + 2 * 4)
    return Work("kd-bwd", 0, v.nbytes("start_ptr", "src_ptr", "coef_ptr") + moved, moved, "ieee")


# ------------------------------------------------------------------------------------------------- useful work
def useful_flops(op: str, p: dict) -> dict[str, float]:
    """Unpadded matmul FLOPs of each pass the Triton kernels do for a case (FlashAttention's convention)."""
    if op == "attention":
        b, h, n, d = p["batch"], p["heads"], p["n_tokens"], p["head_dim"]
        n_prefix = p.get("n_prompt", p.get("n_prefix", 0))
        causal = "n_prefix" in p  # the text cases are causal
        pairs = n * n_prefix + (n * (n + 1) // 2 if causal else n * n)  # (query, key) pairs visible
        embed = h * d
        out = {"qkv-fwd": 2 * b * n * embed * 3 * embed, "attention-fwd": 2 * 2 * b * h * pairs * d}
        if p.get("backward"):
            out["attention-bwd"] = 5 * 2 * b * h * pairs * d
        return out
    if op == "prompt_qkv":
        b, n, embed = p["batch"], p["n_tokens"], p["heads"] * p["head_dim"]
        return {"qkv-fwd": 2 * b * n * embed * 3 * embed}
    if op == "kd":
        # Triton passes: student logits forward and their recompute in backward, plus a full feats teacher's logits in
        # both (fused). cuBLAS (no Triton launch): a top-k feats teacher's logits and the two gradient matmuls on ds.
        b, c, e = p["batch"], p["classes"], p["embed"]
        teacher = 2 * b * c * p["teacher_embed"] if p["form"] == "feats" else 0
        fused = teacher if p["k"] is None else 0
        return {
            "kd-fwd": 2 * b * c * e + fused,
            "kd-bwd": 2 * b * c * e + fused,
            "kd-cublas": teacher - fused + 2 * (2 * b * c * e),
        }
    raise ValueError(f"unknown op {op!r}")


# --------------------------------------------------------------------------------------------------- the model
def _static_rows(path: Path) -> dict[str, dict]:
    """specialisation key -> its row of the committed sm_90 static table (CTAs per SM, wgmma count), when present."""
    if not path.exists():
        return {}
    return {row["key"]: row for row in json.loads(path.read_text())["launches"]}


def model_launch(launch: dict, static: dict[str, dict]) -> dict:
    name = launch["kernel"].rsplit(":", 1)[-1]
    if name not in KERNELS:
        raise KeyError(f"no work description for kernel {name}: add one to bench/model.py")
    v = View(name, tuple(launch["grid"]), launch["constexprs"], launch["scalars"], launch["tensors"])
    w = KERNELS[name](v)
    ctas = v.grid[0] * v.grid[1] * v.grid[2]
    row = static.get(launch["key"], {})
    occ = row.get("ctas_per_sm")
    per_wave = H100["sms"] * (occ or 1)
    peak = PEAK_FLOPS[w.precision]
    t_mma = cdiv(ctas, H100["sms"]) * (w.mma_flops / max(ctas, 1)) / (peak / H100["sms"]) if ctas else 0.0
    t_mem = w.min_bytes / H100["hbm_bytes_per_s"]
    return {
        "kernel": name,
        "family": w.family,
        "grid": list(v.grid),
        "ctas": ctas,
        "ctas_per_sm": occ,
        "ctas_per_wave": per_wave,
        "waves": round(ctas / per_wave, 3),
        "mma_flops": w.mma_flops,
        "min_bytes": w.min_bytes,
        "streamed_bytes": w.streamed_bytes,
        "precision": w.precision,
        "bound_us": round(max(t_mma, t_mem) * 1e6, 3),
        "wgmma_sm90": row.get("wgmma"),  # from the static table when it holds this specialisation, else None
    }


def model_case(label: str, op: str, params: dict, launches: list[dict], static: dict[str, dict]) -> dict:
    rows = [model_launch(launch, static) for launch in launches]
    useful = useful_flops(op, params)
    families = {}
    for fam in dict.fromkeys([r["family"] for r in rows] + list(useful)):
        mine = [r for r in rows if r["family"] == fam]
        executed = sum(r["mma_flops"] for r in mine)
        families[fam] = {
            "launches": len(mine),
            "mma_flops_executed": executed,
            "mma_flops_useful": useful.get(fam, 0),
            "executed_over_useful": round(executed / useful[fam], 3) if mine and useful.get(fam) else None,
            "min_bytes": sum(r["min_bytes"] for r in mine),
            "streamed_bytes": sum(r["streamed_bytes"] for r in mine),
            "streamed_over_min": round(
                sum(r["streamed_bytes"] for r in mine) / max(1, sum(r["min_bytes"] for r in mine)), 3
            )
            if mine
            else None,
            "min_ctas": min((r["ctas"] for r in mine if r["mma_flops"]), default=None),
            # A pass with no Triton launch (cuBLAS) is modelled at peak on its useful FLOPs.
            "bound_us": round(sum(r["bound_us"] for r in mine), 3)
            if mine
            else round(useful.get(fam, 0) / PEAK_FLOPS["16-bit"] * 1e6, 3),
            "useful_bound_us": round(useful.get(fam, 0) / PEAK_FLOPS["16-bit"] * 1e6, 3),
            "note": None if mine else "no Triton launch (torch/cuBLAS path): bound_us is its useful FLOPs at peak",
        }
    return {"case": label, "op": op, "params": params, "families": families, "launches": rows}


def check_dots(root: Path = ROOT) -> list[str]:
    """Mismatches between ``DOTS`` and the ``tl.dot`` calls in the kernel sources (empty: consistent)."""
    problems = []
    graphs = {}
    for path in SOURCES.values():
        tree = ast.parse((root / path).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
                dots = sum(isinstance(c.func, ast.Attribute) and c.func.attr == "dot" for c in calls)
                callees = {c.func.id for c in calls if isinstance(c.func, ast.Name)}
                graphs[node.name] = (dots, callees)
    for kernel, declared in DOTS.items():
        if kernel not in graphs:
            problems.append(f"{kernel}: described in bench/model.py but not found in {list(SOURCES.values())}")
            continue
        reached, todo = {}, [kernel]
        while todo:
            name = todo.pop()
            if name in reached or name not in graphs:
                continue
            reached[name] = graphs[name][0]
            todo += sorted(graphs[name][1])
        reached = {k: n for k, n in reached.items() if n}
        if reached != {k: n for k, n in declared.items() if n}:
            problems.append(f"{kernel}: source has tl.dot counts {reached}, bench/model.py declares {declared}")
    launched = {n for n in graphs if n.endswith("_kernel")}
    problems += [f"{k}: a kernel with no description in bench/model.py" for k in sorted(launched - set(DOTS))]
    return problems


def run(only: str | None = None, static_table: Path | None = None) -> dict[str, dict]:
    """Capture the gate's cases and model them; ``{op: document}``."""
    from rpp_kernels.tools import gate_cases, static_gate

    static = _static_rows(static_table or ROOT / "bench/results/static/sm_90.json")
    docs: dict[str, dict] = {}
    for case in gate_cases.cases():
        if case.group != "core" or (only and only not in case.label):
            continue
        launches, why = static_gate.capture_case(case)
        doc = docs.setdefault(
            case.op,
            {"label": LABEL, "assumptions": {"h100": H100, "peak_flops": PEAK_FLOPS}, "cases": [], "skipped": {}},
        )
        if why:
            doc["skipped"][case.label] = why
            continue
        seen, unique = set(), []
        for launch in launches:  # a kernel launched identically per layer is one row
            from dataclasses import asdict

            d = asdict(launch)
            ident = (d["key"], tuple(d["grid"]), json.dumps(d["scalars"], sort_keys=True))
            if ident not in seen:
                seen.add(ident)
                unique.append(d)
        doc["cases"].append(model_case(case.label, case.op, case.params, unique, static))
    return docs


def _case(docs: dict[str, dict], op: str, label: str) -> dict | None:
    return next((c for c in docs.get(op, {}).get("cases", []) if c["case"] == label), None)


def matmul_bound_us(p: dict, elem: int = 2) -> float:
    """KD's floor: its matmuls (logits; teacher logits for a feats teacher; dX; dW) each at peak or reading/writing its
    operands once, whichever is slower (what cuBLAS chunks could reach)."""
    b, c, e, et = p["batch"], p["classes"], p["embed"], p["teacher_embed"]
    mms = [(2 * b * c * e, (b * e + c * e) * elem), (2 * b * c * e, (c * e + b * e) * elem)]  # logits, dX
    mms.append((2 * b * c * e, (b * e + 2 * c * e) * elem))  # dW: read feats, write [C, E]
    if p["form"] == "feats":
        mms.append((2 * b * c * et, (b * et + c * et) * elem))
    return sum(max(f / PEAK_FLOPS["16-bit"], by / H100["hbm_bytes_per_s"]) for f, by in mms) * 1e6


def targets(docs: dict[str, dict]) -> list[dict]:
    """Issue 11's modelled targets, each with the model's value (not measured)."""
    out = []
    attn = _case(docs, "attention", "attention vit-b16 P=16 bf16")
    if attn:
        fam = attn["families"]
        executed = sum(fam[f]["mma_flops_executed"] for f in ("attention-fwd", "attention-bwd") if f in fam)
        useful = sum(fam[f]["mma_flops_useful"] for f in ("attention-fwd", "attention-bwd") if f in fam)
        ratio = executed / useful if useful else None
        out.append(dict(target="attention fwd+bwd ViT-B/16 P=16 bf16: executed/useful MMA FLOPs <= 1.3", value=ratio,
                        met=ratio is not None and ratio <= 1.3))  # fmt: skip
    kd = _case(docs, "kd", "kd E=512 Et=768 feats k=100 bf16")
    if kd:
        main = [r for r in kd["launches"] if r["mma_flops"]]
        fewest = min((r["ctas"] for r in main), default=None)
        out.append(dict(target="KD B=256 C=21841 E=512 Et=768 k=100: >= 264 CTAs in every main (MMA) launch",
                        value=fewest, met=fewest is not None and fewest >= 264))  # fmt: skip
        bound = sum(f["bound_us"] for f in kd["families"].values())
        ratio = bound / matmul_bound_us(kd["params"])
        out.append(
            dict(target="KD same shape: modelled time <= 1.5x the matmuls' bound", value=ratio, met=ratio <= 1.5)
        )
        wg = [r["wgmma_sm90"] for r in main]
        known = None not in wg and bool(wg)
        note = None if known else "the sm_90 static table lacks these launches"
        target = "KD same shape: wgmma on sm_90 in every main launch (static table)"
        out.append(dict(target=target, value=wg, met=known and all(wg), note=note))
    qkv = _case(docs, "prompt_qkv", "prompt_qkv vit-b16 bf16")
    if qkv:
        fam = qkv["families"].get("qkv-fwd", {})
        ratio = fam.get("streamed_over_min")
        note = (
            "no Triton launch: F.linear (cuBLAS) + views, traffic minimal by construction"
            if not fam.get("launches")
            else None
        )
        out.append(dict(target="prompt_qkv ViT-B/16 bf16: modelled HBM traffic <= 1.5x its minimum", value=ratio,
                        met=True if note else ratio is not None and ratio <= 1.5, note=note))  # fmt: skip
    return out


def summary(docs: dict[str, dict]) -> str:
    lines = [
        f"{LABEL}",
        f"{'case':<44} {'pass':<14} {'exec/useful':>11} {'stream/min':>10} {'min CTAs':>8} {'bound us':>9}",
    ]
    for doc in docs.values():
        for case in doc["cases"]:
            for fam, f in case["families"].items():
                ratio = "-" if f["executed_over_useful"] is None else f"{f['executed_over_useful']:.2f}"
                stream = "-" if f["streamed_over_min"] is None else f"{f['streamed_over_min']:.2f}"
                head = f"{case['case'][:44]:<44} {fam:<14}"
                lines.append(f"{head} {ratio:>11} {stream:>10} {f['min_ctas']!s:>8} {f['bound_us']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write <op>.json model tables into this directory")
    parser.add_argument("--only", default=None, help="only cases whose label contains this text")
    parser.add_argument("--static", default=None, help="sm_90 static table for occupancy")
    args = parser.parse_args(argv)
    problems = check_dots()
    if problems:
        print("work descriptions out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    docs = run(args.only, Path(args.static) if args.static else None)
    print(summary(docs))
    goals = targets(docs)
    for t in goals:
        value = t["value"] if not isinstance(t["value"], float) else round(t["value"], 3)
        print(
            f"{'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {value}"
            + (f" ({t['note']})" if t.get("note") else "")
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for op, doc in docs.items():
            (Path(args.out) / f"{op}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (Path(args.out) / "targets.json").write_text(json.dumps({"label": LABEL, "targets": goals}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if importlib.util.find_spec("rpp_kernels") is None:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
