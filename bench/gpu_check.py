"""Measured time of the static gate's shapes next to the work model's lower bound (``bench/gpu_check.sh``).

``python bench/gpu_check.py --out DIR``: on a GPU, times one forward+backward step (``triton.testing.do_bench``,
median of the quantiles) of each case below at the gate's shapes, reads the modelled H100 bound from
``DIR/model/<op>.json`` (``bench/model.py``; it covers the Triton launches only, not the torch glue such as
``out_proj`` or cuBLAS backward GEMMs) and writes ``DIR/gpu_check.json``. ``--dry-run``: tiny shapes on the CPU
through the torch backend (no model bound), so CI exercises the script. ``--summary DIR`` prints the table of a run,
with the op benchmarks' ours-vs-peer ratios from ``DIR/attention.json`` and ``DIR/kd.json`` when present.
Measured numbers come only from this script on a real GPU; nothing here is estimated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import benchutil  # noqa: E402

CASES = (
    "attention vit-b16 P=16 bf16",
    "attention vit-l14 P=16 bf16",
    "attention text-suffix bf16",
    "prompt_qkv vit-b16 bf16",
    "kd E=512 Et=768 feats k=100 bf16",
    "kd E=512 Et=768 logits k=100 bf16",
)
# --dry-run: tiny versions of the same ops (torch backend on CPU).
TINY = (
    ("attention", dict(batch=2, heads=2, n_tokens=9, n_prompt=3, head_dim=32)),
    ("text", dict(batch=4, heads=2, n_tokens=5, n_prefix=3, head_dim=32)),
    ("prompt_qkv", dict(batch=2, heads=2, n_tokens=9, head_dim=32)),
    ("kd", dict(batch=4, classes=50, embed=32, teacher_embed=48, form="feats", k=10)),
)


def _model_bound_ms(model_dir: Path, op: str, label: str) -> float | None:
    path = model_dir / f"{op}.json"
    if not path.exists():
        return None
    for case in json.loads(path.read_text())["cases"]:
        if case["case"] == label:
            return sum(f["bound_us"] for f in case["families"].values()) / 1e3
    return None


def _time_ms(step, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return benchutil.time_quantiles(step, device)
    step()  # warm-up
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1e3
    return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}


def measure(out: Path, dry_run: bool) -> dict:
    from rpp_kernels.tools import gate_cases

    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device (use --dry-run on a CPU machine)")
    if dry_run:
        cases = [gate_cases.custom_case(op, "fp32", **shape) for op, shape in TINY]
    else:
        by_label = {c.label: c for c in gate_cases.cases()}
        cases = [by_label[label] for label in CASES]
    rows = []
    for case in cases:
        with torch.device(device):
            step = case.setup()
            times = _time_ms(step, device)
        bound = None if dry_run else _model_bound_ms(out / "model", case.op, case.label)
        rows.append(
            {
                "case": case.label,
                "op": case.op,
                "params": case.params,
                "time": times,
                "model_bound_ms": bound,
                "measured_over_bound": None if bound is None else times["median_ms"] / bound,
            }
        )
        print(f"{case.label}: {times['median_ms']:.3f} ms" + (f" (model bound {bound:.3f} ms)" if bound else ""))
    doc = {
        "label": "MEASURED" + (" on CPU (dry run, torch backend, tiny shapes)" if dry_run else f" on {device}"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": benchutil.versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "model_bound_ms: bench/model.py's H100 lower bound of the Triton launches (a model, not measured)",
        "cases": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def summary(out: Path) -> str:
    doc = json.loads((out / "gpu_check.json").read_text())
    lines = [doc["label"], f"{'case':<40} {'measured ms':>12} {'model bound ms':>15} {'ratio':>7}"]
    for row in doc["cases"]:
        bound = row["model_bound_ms"]
        ratio = row["measured_over_bound"]
        lines.append(
            f"{row['case'][:40]:<40} {row['time']['median_ms']:>12.3f} {'-' if bound is None else f'{bound:.3f}':>15} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>7}"
        )
    for name in ("attention", "kd"):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        lines.append(f"{name} benchmarks, median ms (x: peer time / ours, > 1 means ours is faster):")
        groups: dict[tuple, dict[str, float]] = {}
        for row in json.loads(path.read_text())["results"]:
            if "provider" not in row or "mode" not in row:
                continue
            shape = row.get("shape_name") or f"B={row.get('B')} k={row.get('k')}"
            groups.setdefault((shape, row["mode"]), {})[row["provider"]] = row.get("time", row)["median_ms"]
        for (shape, mode), times in groups.items():
            ours = times.get("prompt_attention", times.get("ours"))
            cells = [
                f"{p} {t:.3f}" + ("" if ours is None or p in ("ours", "prompt_attention") else f" ({t / ours:.2f}x)")
                for p, t in times.items()
            ]
            lines.append(f"  {shape:<22} {mode:<8} " + "; ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results directory (writes gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, torch backend")
    parser.add_argument("--summary", type=Path, default=None, help="print the table of a finished run")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --summary DIR)")
    measure(args.out, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
