"""The static GPU gate (``rpp_kernels.tools.static_gate``): every Triton launch at the shapes users run, compiled for
sm_80 and sm_90 exactly as a real launch specialises it, must not spill, overflow shared memory, exceed a grid limit
or run ``tl.dot`` without tensor cores -- unless ``static_gate_known.json`` lists that violation with a reason.

The list can only shrink: a listed violation that no longer happens fails too, so fixing a kernel means deleting its
entries. The gate runs once per session in a subprocess (Triton must be imported without ``TRITON_INTERPRET`` to
compile); set ``RPP_GATE_CACHE=<dir>`` to reuse compile results across runs while iterating (keys include the kernel
source, so an edited kernel recompiles). ``python -m rpp_kernels.tools.static_gate --known
tests/ops/static_gate_known.json`` runs the same check by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rpp_kernels.tools import gate_cases
from rpp_kernels.tools import static_gate as gate

KNOWN = Path(__file__).with_name("static_gate_known.json")
ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(
    __import__("rpp_kernels")._dispatch.triton_import_error() is not None, reason="triton is not importable"
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------------------------------- checks (no compile needed)
def _result(**over):
    base = dict(registers=128, spill_stores=0, spill_loads=0, stack=0, shared=49152, num_warps=4, dots=2, fma_dots=0)
    return base | dict(mma_sync=16, wgmma=0, cp_async=4, scalar16_loads=0) | over


LAUNCH = {"grid": [2, 1536, 1], "kernel": "m:_k", "case": "c", "key": "k"}


def test_clean_launch_has_no_violations():
    assert gate.violations(LAUNCH, _result(), 80) == []


@pytest.mark.parametrize(
    "launch, result, arch, kind",
    [
        (LAUNCH, _result(spill_stores=64, spill_loads=72), 90, "spill"),
        (LAUNCH, _result(spill_loads=4), 80, "spill"),
        (LAUNCH, _result(shared=197120), 80, "smem"),  # the KD backward of issue 10 on an A100
        (LAUNCH, _result(mma_sync=0), 80, "no-mma"),  # fp32 with input_precision="ieee": FMA only
        (LAUNCH, _result(fma_dots=1), 90, "no-mma"),  # one of several dots left on FMA
        ({**LAUNCH, "grid": [1, 174728, 1]}, _result(), 90, "grid"),  # 21,841 classes x 8 heads on axis 1
        ({**LAUNCH, "grid": [1, 1, 65536]}, _result(), 80, "grid"),
        (LAUNCH, {"error": "CompilationError: boom"}, 80, "compile-error"),
    ],
)
def test_each_violation_is_detected(launch, result, arch, kind):
    assert kind in [k for k, _ in gate.violations(launch, result, arch)]


def test_limits_are_exact():
    assert gate.violations(LAUNCH, _result(shared=166912), 80) == []
    assert gate.violations(LAUNCH, _result(shared=166913), 80)[0][0] == "smem"
    assert gate.violations(LAUNCH, _result(shared=232448), 90) == []
    assert gate.violations({**LAUNCH, "grid": [2**31 - 1, 65535, 65535]}, _result(), 90) == []
    assert gate.violations(LAUNCH, _result(dots=0, mma_sync=0), 90) == []  # no tl.dot, nothing to demand


def test_occupancy_from_registers_shared_memory_and_warps():
    # 128 regs x 128 threads = 16 K regs per CTA -> 4 by registers; 48 KiB (+1 KiB reserved) -> 4 by shared memory.
    assert gate.occupancy(_result(registers=128, shared=49152, num_warps=4), 90) == 4
    assert gate.occupancy(_result(registers=255, shared=0, num_warps=8), 90) == 1  # 256 x 256 = 64 K registers
    assert gate.occupancy(_result(registers=32, shared=0, num_warps=1), 90) == 32  # CTA-count limit
    assert gate.occupancy({"error": "x"}, 90) is None


def test_ptx_and_ttgir_readers():
    ttgir = textwrap.dedent(
        """
        %1 = tt.dot %a, %b, %c : tensor<64x32xbf16, #dot0> * tensor<32x64xbf16, #dot1> -> tensor<64x64xf32, #mma>
        %2 = tt.dot %a, %b, %c : tensor<64x32xf32, #dot0> * tensor<32x64xf32, #dot1> -> tensor<64x64xf32, #blocked>
        """
    )
    assert gate._ttgir_fma_dots(ttgir) == 1
    ptx = "\tld.global.b16 %rs1, [%rd1];\n\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2];\n"
    assert len(gate._RE_SCALAR16.findall(ptx)) == 1
    log = "ptxas info    : Used 168 registers, used 1 barriers, 64 bytes spill stores, 72 bytes spill loads"
    assert gate._RE_REGS.findall(log) == ["168"] and gate._RE_SPILL.findall(log) == [("64", "72")]


def test_known_list_semantics():
    found = [dict(case="a", kernel="k", arch=80, violation="smem", detail="")]
    known = [
        dict(case="a", kernel="k", arch=80, violation="smem", reason="r"),
        dict(case="b", kernel="k", arch=80, violation="spill", reason="r"),  # b ran and no longer spills: stale
        dict(case="z", kernel="k", arch=80, violation="spill", reason="r"),  # z did not run: kept
    ]
    new, stale = gate.compare_known(found, known, ["a", "b"])
    assert new == [] and [e["case"] for e in stale] == ["b"]
    new, stale = gate.compare_known(found + [dict(found[0], arch=90)], known[:1], ["a"])
    assert [v["arch"] for v in new] == [90] and stale == []


def test_known_file_is_well_formed():
    known = gate.load_known(KNOWN)
    labels = {c.label for c in gate_cases.cases()}
    idents = [(e["case"], e["kernel"], e["arch"], e["violation"]) for e in known]
    assert len(idents) == len(set(idents)), "duplicate entries in static_gate_known.json"
    assert not [e for e in known if e["case"] not in labels], "entries for cases the gate does not have"
    assert all(e["arch"] in gate.ARCHS for e in known)


def test_case_labels_are_unique_and_cover_every_op():
    cases = gate_cases.cases()
    assert len({c.label for c in cases}) == len(cases)
    assert {c.op for c in cases} == {"attention", "prompt_qkv", "kd"}


def test_custom_case_rejects_unknown_shape_names():
    with pytest.raises(ValueError, match="n_prompt"):
        gate_cases.custom_case("text", "bf16", n_prompt=3)
    with pytest.raises(ValueError, match="dtype"):
        gate_cases.custom_case("kd", "int8")


# ------------------------------------------------------------------------------- capture + compile (subprocesses)
SPECIALISE = """
import json
import tempfile
from rpp_kernels.tools import gate_cases, static_gate as g
launches = []
for case in (
    gate_cases.custom_case("text", "fp16", batch=1, heads=1, n_tokens=24, n_prefix=16, head_dim=64),
    gate_cases.custom_case("kd", "fp16", batch=1, classes=300, embed=64, teacher_embed=64, form="logits", k=None),
):
    recorded, why = g.capture_case(case)
    assert why is None and recorded, why
    launches += recorded
first = next(l for l in launches if l.signature)
spec = {k: getattr(first, k) for k in ("key", "kernel", "signature", "constexprs", "divisible", "options")}
cache = tempfile.mkdtemp() + "/not/yet/there"  # --cache DIR need not exist
result = g.compile_spec(spec, 80, cache)
assert g.compile_spec(spec, 80, cache) == result  # the second call reads the cached result
print(json.dumps({"launches": [l.__dict__ for l in launches], "result": result}))
"""


@needs_triton
def test_capture_specialises_like_a_real_launch():
    """Pointers 16-byte aligned and integers % 16 == 0 get divisibility; integers equal to 1 become constants (batch
    and heads are 1 here) unless the kernel marks them do_not_specialize; the first launch compiles for sm_80 with
    tensor cores wherever it has tl.dot."""
    proc = subprocess.run(
        [sys.executable, "-c", SPECIALISE], env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    launches, res = out["launches"], out["result"]
    assert launches
    for launch in launches:
        sig, div = launch["signature"], set(launch["divisible"])
        for name, info in launch["tensors"].items():
            assert sig[name].startswith("*") and (name in div) == (info["ptr"] % 16 == 0), (launch["kernel"], name)
        for name, value in launch["scalars"].items():
            if sig[name] in ("i32", "i64") and name not in launch["unspecialised"]:  # do_not_specialize: plain ints
                assert value != 1 and (name in div) == (value % 16 == 0), (launch["kernel"], name, value)
        assert all(launch["constexprs"][n] in (1, None) for n in launch["specialised"])
        assert len(launch["grid"]) == 3 and all(g >= 1 for g in launch["grid"])
    assert "error" not in res, res
    assert res["registers"] > 0 and res["spill_stores"] == 0
    assert not res["dots"] or res["mma_sync"] > 0, "fp16 tl.dot must compile to mma.sync on sm_80"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> gate.Report:
    """The whole gate (core cases, both targets), once per session."""
    cache = os.environ.get("RPP_GATE_CACHE") or str(tmp_path_factory.mktemp("gate-cache"))
    out = tmp_path_factory.mktemp("gate") / "report.json"
    cmd = [sys.executable, "-m", "rpp_kernels.tools.static_gate", "--quiet", "--cache", cache, "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert out.exists(), f"the gate did not finish:\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    return gate.Report(tuple(data["archs"]), data["launches"], data["results"], data["skipped"], data["seconds"])


@needs_triton
def test_gate_captures_every_case(report):
    labels = [c.label for c in gate_cases.cases() if c.group == "core"]
    launched = {launch["case"] for launch in report.launches}
    missing = [label for label in labels if label not in launched and label not in report.skipped]
    assert not missing, f"cases with no Triton launch and no dispatch reason: {missing}"
    assert all(why.strip() for why in report.skipped.values())
    assert {launch["case"].split()[0] for launch in report.launches} >= {"attention", "kd"}


@needs_triton
def test_no_violation_outside_the_known_list(report):
    new, _ = gate.compare_known(
        report.violations(), gate.load_known(KNOWN), {launch["case"] for launch in report.launches}
    )
    assert not new, "new static-gate violations (fix the kernel, or list them with a reason):\n" + "\n".join(
        f"  sm_{v['arch']} {v['case']} {v['kernel']}: {v['violation']} ({v['detail']})" for v in new
    )


@needs_triton
def test_known_violations_still_happen(report):
    ran = {launch["case"] for launch in report.launches} | set(report.skipped)
    _, stale = gate.compare_known(report.violations(), gate.load_known(KNOWN), ran)
    assert not stale, "fixed: remove these entries from tests/ops/static_gate_known.json:\n" + "\n".join(
        f"  sm_{e['arch']} {e['case']} {e['kernel']}: {e['violation']}" for e in stale
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--op", "text", "--prompts", "3"], "op 'text' takes no ['n_prompt']"),
        (["--op", "kd", "--k", "abc"], "--k must be a positive int or 'none'"),
        (["--batch", "0"], "shape values must be positive"),
        (["--arch", "75"], "--arch must be a comma-separated subset of 80,90"),
    ],
)
def test_info_kernels_cli_rejects_bad_input(args, message):
    """``python -m rpp_kernels.info --kernels``: user mistakes are one line and exit 2 (before any compile)."""
    proc = subprocess.run(
        [sys.executable, "-m", "rpp_kernels.info", "--kernels", *args], env=_env(), capture_output=True, text=True,
        timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
