"""One prompt-pretraining step, end to end: RPPMethod vs a plain POMP-style baseline, fwd+bwd, in the same run.

Both providers share the same frozen student and teacher, the same prompts, batch, class sample and teacher top-k,
and compute the same loss (checked before timing):

* ``rpp``: :meth:`rpp.method.RPPMethod.loss`: shared-prefix text encoding (:mod:`rpp_kernels.text`), vision prompts
  with batch-shared K/V (:mod:`rpp_kernels.integrations.open_clip`), KD through :func:`rpp_kernels.kd.topk_kd_loss`.
* ``pomp_baseline``: what public POMP/CoOp code does: every sampled class prompt run through the text tower as 77
  tokens (:func:`rpp_kernels.text.encode_text_naive`), vision prompts concatenated to every sample's tokens
  (:func:`rpp_kernels.integrations.open_clip.encode_image_explicit`), eager CE and dense top-k KD over ``[B, K]``.

The teacher's forward (no grad) is part of both steps. GPU: ViT-B-16 student, ViT-L-14 teacher (open_clip configs,
random weights), batch 128, K = 1000 sampled classes out of 21,841, n_ctx 16, RPP text prompts in 9 layers, bf16
autocast; also the full 21,841-class softmax. CPU: the tiny ``rpp-tiny`` / ``rpp-tiny-teacher`` configs, batch 32,
K = 256 of 1000, fp32. Recorded per case: images/s (median step time), bytes saved for backward (activations only),
peak GPU memory, and the baseline/ours ratios in ``bench/results/<device>/train_step.json``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from benchutil import (
    bench_device,
    imagenet_classnames,
    peak_memory_bytes,
    record,
    saved_bytes,
    synchronize,
    time_quantiles,
)

from rpp.losses import local_correction
from rpp.method import MethodConfig, RPPMethod
from rpp_kernels.integrations.open_clip import encode_image_explicit
from rpp_kernels.text import encode_text_naive

DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
if GPU:
    SETUP = dict(model="ViT-B-16", teacher="ViT-L-14", batch=128, k=1000, classes=21841, precision="bf16", depth=9)
else:
    SETUP = dict(model="rpp-tiny", teacher="rpp-tiny-teacher", batch=32, k=256, classes=1000, precision="fp32", depth=1)
N_CTX = 16
# (vision prompts per layer, classes per step; None = the full class set)
CASES = [(0, SETUP["k"]), (4, SETUP["k"]), (0, None)]
_RESULTS: dict[tuple, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """On CPU, one intra-op thread: the tiny configs' ops are too small to gain from more, and on a shared machine
    extra threads mostly measure contention. Both providers run under the same setting (recorded per case)."""
    threads = torch.get_num_threads()
    if not GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def methods():
    """One RPPMethod per vision-prompt setting, sharing nothing but the deterministic init seed."""
    built = {}
    for vision_prompts in sorted({v for v, _ in CASES}):
        torch.manual_seed(0)
        cfg = MethodConfig(
            model=SETUP["model"],
            teacher=SETUP["teacher"],
            teacher_templates="single",
            n_ctx=N_CTX,
            text_depth=SETUP["depth"],
            vision_prompts=vision_prompts,
            vision_depth=SETUP["depth"],
            precision=SETUP["precision"],
            kd_classes="teacher-topk",  # the baseline below forces the teacher's top-k into the class set too
            allow_random_weights=True,  # timing only: random ViT-B-16 / ViT-L-14 weights
        )
        built[vision_prompts] = RPPMethod(cfg, imagenet_classnames(SETUP["classes"]), DEVICE)
    return built


def baseline_loss(method: RPPMethod, images, labels, generator) -> dict[str, torch.Tensor]:
    """The POMP-style step: naive 77-token text encoding, concatenated vision prompts, eager CE + dense top-k KD."""
    cfg, enc = method.cfg, method.text_encoder
    idx, probs = method.teacher.topk(images, cfg.kd_topk, cfg.temperature)
    sample = method._sample(labels, generator, idx)  # the same classes as ours (sampling is not what is measured)
    classes, targets, positions = sample.classes, sample.targets, sample.teacher_positions
    names = [method.classnames[i] for i in classes.tolist()]
    targets, positions = targets.to(DEVICE), positions.to(DEVICE)
    with method._autocast():
        if method.vision_prompts is not None:
            image = encode_image_explicit(method.clip.visual, images, method.vision_prompts)
        else:
            image = method.clip.encode_image(images)
        text = encode_text_naive(method.clip, names, **enc.prompt_parameters())
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = method.logit_scale() * image @ text.T
    correction = 0.0 if sample.is_full else local_correction(sample.num_classes, len(classes))
    ce = F.cross_entropy(logits + correction * (1 - F.one_hot(targets, len(classes))), targets)
    p = torch.zeros_like(logits).scatter(1, positions, probs.float())
    log_q = torch.log_softmax(logits / cfg.temperature, dim=-1)
    kd = cfg.temperature**2 * (p * (p.clamp_min(1e-30).log() - log_q)).sum(-1).mean()
    return {"loss": cfg.ce_weight * ce + cfg.kd_weight * kd, "ce": ce.detach(), "kd": kd.detach()}


@pytest.mark.parametrize("provider", ["rpp", "pomp_baseline"])
@pytest.mark.parametrize(("vision_prompts", "classes_per_step"), CASES)
def test_train_step(benchmark, methods, provider, vision_prompts, classes_per_step):
    method = methods[vision_prompts]
    method.cfg.classes_per_step = classes_per_step
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(SETUP["batch"], 3, *method.clip.visual.image_size, generator=gen).to(DEVICE)
    labels = torch.randint(0, SETUP["classes"], (SETUP["batch"],), generator=gen).to(DEVICE)
    params = method.learnable_parameters()

    def forward():
        generator = torch.Generator().manual_seed(1)  # the same class sample at every call, for both providers
        if provider == "rpp":
            return method.loss(images, labels, generator)
        return baseline_loss(method, images, labels, generator)

    def step():
        for p in params:
            p.grad = None
        forward()["loss"].backward()
        synchronize(DEVICE)

    case = {"provider": provider, "vision_prompts": vision_prompts, "classes_per_step": classes_per_step or "all"}
    try:
        with torch.no_grad():
            ours = method.loss(images, labels, torch.Generator().manual_seed(1))
            base = ours if provider == "rpp" else forward()
        tol = dict(rtol=2e-2, atol=2e-2) if GPU else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(base["loss"], ours["loss"], **tol)  # the two providers compute the same loss
        step()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        record("train_step", {**case, "result": "out of memory"})
        pytest.skip(f"{provider}: out of memory")

    times = time_quantiles(step, DEVICE, warmup=1, rep=3 if not GPU else 10)
    benchmark.pedantic(step, rounds=1, iterations=1)
    frozen = list(method.parameters()) + list(method.teacher.model.parameters()) + [images]
    entry = {
        **case,
        **{k: v for k, v in SETUP.items() if k != "depth"},
        "text_depth": SETUP["depth"],
        "vision_depth": SETUP["depth"] if vision_prompts else 0,
        "n_ctx": N_CTX,
        "num_classes_step": int(ours["num_classes"]),
        "time": times,
        "images_per_s": SETUP["batch"] / (times["median_ms"] / 1e3),
        "saved_bytes": saved_bytes(forward, exclude=frozen),
        "peak_memory_bytes": peak_memory_bytes(step, DEVICE),
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    key = (vision_prompts, classes_per_step)
    other = _RESULTS.get((*key, "pomp_baseline" if provider == "rpp" else "rpp"))
    if other is not None:
        rpp, base = (entry, other) if provider == "rpp" else (other, entry)
        entry["rpp_vs_baseline"] = {
            "images_per_s_ratio": rpp["images_per_s"] / base["images_per_s"],
            "saved_bytes_ratio": rpp["saved_bytes"] / base["saved_bytes"],
            "peak_memory_ratio": (
                rpp["peak_memory_bytes"] / base["peak_memory_bytes"] if rpp["peak_memory_bytes"] else None
            ),
        }
    _RESULTS[(*key, provider)] = entry
    benchmark.extra_info.update(entry)
    record("train_step", entry)
