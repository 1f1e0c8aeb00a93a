"""``bash bench/gpu_check.sh --dry-run``: the one-call GPU check runs end to end on a CPU (tiny shapes, torch path),
so the script a lent GPU runs never rots."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.skipif(
    __import__("rpp_kernels")._dispatch.triton_import_error() is not None, reason="the work model needs triton"
)
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    summary = out[out.index("=== summary") :]
    for stage in ("versions", "gpu tests", "work model", "measure vs model"):
        assert any(line.startswith(stage) and " ok " in line for line in summary.splitlines()), summary
    assert "MEASURED on CPU (dry run" in summary
    results = next(tmp_path.glob("gpu_check.*"))
    assert (results / "gpu_check.json").exists() and (results / "model" / "attention.json").exists()


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
