"""topk_kd_loss, triton backend, against the eager reference: through TRITON_INTERPRET=1 on CPU (fp32/fp16), on the
GPU when there is one (all dtypes)."""

from __future__ import annotations

import pytest
import torch
from test_kd_helpers import Case, check_against_reference, make_inputs

from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.ops.kd import make_problem

pytest.importorskip("triton")
# Masked tiles compute exp(-inf) and -inf - (-inf) before tl.where discards them; numpy warns about it in the
# interpreter.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Every k (1, 5, 100 with KPAD = 128, None), B (1, 7, 64), teacher form, support, labels, masks, ties and a row with no
# teacher mass, with C kept small where the interpreter runs the top-k sorting networks.
CASES = [
    (Case(1, 1, 1), torch.float32),
    (Case(1, 10, 5, T=2.0, form="feats", support="topk", labels=True), torch.float16),
    (Case(7, 10, 100, ties=True), torch.float32),
    (Case(7, 200, 100, form="logits", support="topk", labels=True, mask=True, ties=True), torch.float32),
    (Case(7, 1000, 1, T=2.0, form="feats", support="topk", ties=True), torch.float16),
    (Case(64, 1000, None, T=2.0, form="feats", labels=True), torch.float16),
    (Case(64, 1000, None, form="logits", support="topk", mask=True, dead_row=True), torch.float32),
    (Case(64, 300, 5, form="logits", labels=True, mask=True, dead_row=True), torch.float32),
    (Case(7, 1000, 100, form="topk", labels=True, mask=True), torch.float16),
    (Case(7, 1000, 5, T=2.0, form="topk", support="topk", mask=True), torch.float32),
    (Case(7, 300, 5, T=2.0, form="feats", mask=True, ties=True), torch.float32),
    (Case(7, 1000, 5, form="logits", ties=True, dead_row=True), torch.float16),
]

SLOW_CASES = [
    (Case(64, 1000, 100, form="logits", labels=True, mask=True), torch.float32),
    (Case(64, 1000, 100, T=2.0, form="feats", support="topk", labels=True), torch.float16),
]


def _id(param) -> str:
    case, dtype = param
    return f"{case}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("param", CASES, ids=_id)
def test_triton_matches_reference(param):
    case, dtype = param
    check_against_reference(case, "triton", dtype=dtype, device=DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("param", SLOW_CASES, ids=_id)
def test_triton_matches_reference_slow(param):
    case, dtype = param
    check_against_reference(case, "triton", dtype=dtype, device=DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "case",
    [
        Case(64, 21841, 100, T=2.0, form="feats", labels=True, mask=True, E=512, Et=768),
        Case(64, 21841, 10, form="logits", support="topk", E=512),
        Case(64, 21841, None, form="feats", E=512, Et=768),
        Case(7, 21841, 100, form="topk", labels=True, E=512),
    ],
    ids=str,
)
def test_triton_gpu_full_size(case, dtype):
    check_against_reference(case, "triton", dtype=dtype, device="cuda")


def test_triton_tie_rule_and_signed_zero():
    """Equal teacher logits (including -0.0 == +0.0) keep the lower class index, across tiles, as the torch backend."""
    from rpp_kernels.ops.kd import chunked
    from rpp_kernels.ops.kd import triton as kd_triton

    t = torch.zeros(3, 150)
    t[0, 100] = 1.0  # the single max sits in the second tile
    t[1, ::2] = -0.0
    t[2, 70:] = 2.0
    p = make_problem(
        torch.zeros(3, 16), torch.zeros(150, 16), t.to(DEVICE), 5, 1.0, 1.0, None, 1.0, 0.0, None, "full", "mean"
    )
    p.student_feats, p.class_embeds = p.student_feats.to(DEVICE), p.class_embeds.to(DEVICE)
    got = kd_triton.stream(p)
    assert got.top_idx.tolist() == [[100, 0, 1, 2, 3], [0, 1, 2, 3, 4], [70, 71, 72, 73, 74]]
    want = chunked.stream(p)
    assert torch.equal(got.top_idx, want.top_idx) and torch.equal(got.top_val, want.top_val)


def test_triton_is_not_chosen_on_cpu_unless_forced():
    sf, ce, t = torch.randn(2, 16), torch.randn(10, 16), torch.randn(2, 10)
    from rpp_kernels import _dispatch

    assert _dispatch.select("kd", device=torch.device("cpu"), dtype=torch.float32, k=5) == "torch"
    topk_kd_loss(sf, ce, t, k=5, backend="triton")  # forced: runs through the interpreter
    with pytest.raises(NotImplementedError, match="k=200 > 128"):
        topk_kd_loss(torch.randn(2, 16), torch.randn(300, 16), torch.randn(2, 300), k=200, backend="triton")


def test_triton_kd_kernels_use_no_atomics():
    """Both gradients must be deterministic under ``torch.use_deterministic_algorithms``: the class-embedding gradient
    used fp32 ``tl.atomic_add`` (summation order varies run to run on a GPU; the interpreter serialises it, so only
    the source shows it)."""
    import ast
    import inspect

    from rpp_kernels.ops.kd import triton as kd_triton

    tree = ast.parse(inspect.getsource(kd_triton))
    atomics = [
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("atomic")
    ]
    assert not atomics, f"atomics in the KD kernels: {atomics}"


def test_triton_deterministic_mode_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms the triton backend runs (no op raises) and repeats itself bitwise;
    classes shared by many rows' top-k and labels exercise the class-embedding gradient's per-class sums."""
    case = Case(7, 300, 5, form="logits", labels=True, ties=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            sf, ce, teacher, kw = make_inputs(case, device=DEVICE)
            loss = topk_kd_loss(sf, ce, teacher, backend="triton", **kw)
            grads.append(torch.autograd.grad(loss, [sf, ce]))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_triton_teacher_rows_beyond_int32_offsets():
    """Row offsets are int64: with ``B * C >= 2^31`` the teacher's row ``r`` starts at ``r * C`` past int32 (both
    factors fit int32, their product does not). Rows here are 2^27 elements apart (a strided view; 4 GiB of address
    space of which only the 128 logits used per row are touched), so row 16 sits at 2^31."""
    stride, rows, cols = 2**27, 17, 128
    try:
        buf = torch.empty(rows * stride, dtype=torch.float16)
    except RuntimeError as exc:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {exc}")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, cols, generator=g).half()
    t = buf.as_strided((rows, cols), (stride, 1))
    t.copy_(logits)
    sf, ce = torch.zeros(rows, 16, dtype=torch.float16), torch.zeros(cols, 16, dtype=torch.float16)
    p = make_problem(sf, ce, t, 3, 1.0, 1.0, None, 1.0, 0.0, None, "topk", "mean")
    from rpp_kernels.ops.kd import triton as kd_triton

    got = kd_triton.stream(p)
    want_val, want_idx = torch.sort(logits.float(), dim=1, descending=True, stable=True)
    assert torch.equal(got.top_idx, want_idx[:, :3]) and torch.equal(got.top_val, want_val[:, :3])


def test_triton_label_inside_the_teacher_top_k():
    """Backward folds the sparse coefficients into ds; a label that is also a top-k class must add both (the label is
    written after the distinct top-k columns, not in the same read-modify-write)."""
    from test_kd_helpers import TOL, assert_close

    from rpp_kernels.ops.kd.reference import topk_kd_loss_ref

    sf, ce, teacher, kw = make_inputs(Case(7, 300, 5, form="logits", labels=True), device=DEVICE)
    kw["labels"] = teacher.float().argmax(1)  # the teacher's top class: always among its top-k slots
    loss = topk_kd_loss(sf, ce, teacher, backend="triton", **kw)
    ref = topk_kd_loss_ref(sf, ce, teacher, **kw)
    vtol, gtol = TOL[torch.float32]
    assert_close("loss", loss, ref, vtol)
    got, want = torch.autograd.grad(loss, [sf, ce]), torch.autograd.grad(ref, [sf, ce])
    for name, a, b in zip(("dsf", "dce"), got, want, strict=True):
        assert_close(name, a, b, gtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("form, k", [("feats", None), ("feats", 100), ("logits", None), ("logits", 100), ("topk", 100)])
@pytest.mark.parametrize("E, Et", [(512, 768), (1024, 1024), (4096, 4096)])
def test_triton_tile_configs_fit_shared_memory(dtype, form, k, E, Et):
    """Every config the launchers pick, counted with all pipeline stages and both operand tiles (and the teacher's
    matmul), fits sm_80's shared memory at any feature dim: the old backward kept whole [rows, E] and [classes, E]
    tiles on chip and needed 197,120 B at E = Et = 1024 bf16 with a full feats teacher. The static gate
    (tests/ops/test_static_gate.py) compiles the real launches; this is the config choice's own budget."""
    from rpp_kernels.ops.kd import triton as kd_triton

    B, C = 4, 300
    sf, ce = torch.empty(B, E, dtype=dtype), torch.empty(C, E, dtype=dtype)
    if form == "feats":
        teacher = (torch.zeros(B, Et, dtype=dtype), torch.zeros(C, Et, dtype=dtype))
    elif form == "logits":
        teacher = torch.zeros(B, C, dtype=dtype)
    else:
        teacher = (torch.arange(k).expand(B, k), torch.ones(B, k, dtype=dtype))
    p = make_problem(sf, ce, teacher, k, 1.0, 1.0, None, 1.0, 0.0, None, "full", "mean")
    teacher_dot = p.full_teacher and form == "feats"
    for cfg in (kd_triton.fwd_config(p), kd_triton.bwd_config(p)):
        used = kd_triton.smem_bytes(cfg, sf.element_size(), teacher_dot)
        assert used <= kd_triton.SMEM_LIMIT[80], (cfg, used)
