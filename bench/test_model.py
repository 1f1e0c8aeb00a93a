"""The work model (``bench/model.py``): its kernel descriptions match the kernel sources, and it models every launch
at the static gate's shapes. Writes ``bench/results/model/<op>.json`` (a MODEL, never a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import model
import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "model"


def test_descriptions_match_the_kernels():
    problems = model.check_dots()
    assert not problems, "update bench/model.py's kernel descriptions:\n  " + "\n  ".join(problems)


def test_useful_flops_follow_flash_attention():
    # ViT-B/16, P=16: 2 * 128 * 12 * 197 * 213 * 64 = 8.25 GFLOP per matmul; 2 forward, 5 backward (issue 11).
    p = dict(batch=128, heads=12, n_tokens=197, n_prompt=16, head_dim=64, backward=True)
    useful = model.useful_flops("attention", p)
    assert useful["attention-fwd"] == 2 * 2 * 128 * 12 * 197 * 213 * 64
    assert useful["attention-bwd"] == 2.5 * useful["attention-fwd"]


@pytest.mark.skipif(
    __import__("rpp_kernels")._dispatch.triton_import_error() is not None, reason="the model captures Triton launches"
)
def test_model_of_every_gate_shape():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "bench/model.py", "--out", str(OUT)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for op in ("attention", "prompt_qkv", "kd"):
        doc = json.loads((OUT / f"{op}.json").read_text())
        assert doc["label"].startswith("MODEL") and doc["cases"]
        for case in doc["cases"]:
            for fam, f in case["families"].items():
                if f["launches"] and f["mma_flops_useful"]:
                    # Padding only adds work: executed below useful means a description undercounts.
                    assert f["mma_flops_executed"] >= f["mma_flops_useful"] * 0.999, (case["case"], fam, f)
                if f["launches"]:
                    assert f["min_bytes"] > 0 and f["bound_us"] > 0, (case["case"], fam)
            for row in case["launches"]:
                assert row["ctas"] > 0 and row["waves"] > 0
