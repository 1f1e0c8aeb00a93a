"""One SPT training step on ViT-B/16 with deep prompts (P = 20): our integration vs explicit-concat VPT.

Both providers run the same frozen ``vit_base_patch16_224`` (random weights: speed and memory do not depend on them)
with trainable prompts + head, forward + cross-entropy + backward:

- ``rpp``: :func:`rpp_kernels.integrations.timm.add_prompts` (prompt rows projected once per block, batch-shared prefix
  K/V, no prompt-row queries/MLP except at the last block when the head reads them);
- ``vpt_concat``: :func:`rpp_kernels.integrations.timm.vpt_forward_features` (prompts concatenated into every block's
  sequence, the unmodified timm blocks).

Two heads, as SPT trains them: ``token`` (MoCo v3 and supervised backbones: the head reads CLS, so the prompt rows'
outputs are never computed) and ``avg`` (MAE: the mean of prompt and patch outputs, so the last block also runs the
prompt rows' queries and MLP; the pretrained final norm then follows the pooling).

Batch 128 on GPU (time, peak memory, bytes saved for backward, in fp32 and bf16); batch 4 in fp32 on CPU (time and
bytes saved for backward; about two minutes). Results: ``bench/results/<device>/spt_deep_train_step.json``.
"""

from __future__ import annotations

import benchutil
import pytest
import timm
import torch
import torch.nn.functional as F

from rpp_kernels.integrations.timm import add_prompts, vpt_forward_features

DEVICE = benchutil.bench_device()
ON_GPU = DEVICE.type == "cuda"
BATCH = 128 if ON_GPU else 4
NUM_PROMPTS = 20
NUM_CLASSES = 100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16} if ON_GPU else {"fp32": torch.float32}
HEADS = ("token", "avg")
PROVIDERS = {
    "rpp": lambda model, x: model(x),
    "vpt_concat": lambda model, x: model.forward_head(vpt_forward_features(model, x)),
}
_RESULTS: dict[tuple[str, str, str], dict] = {}


@pytest.fixture(scope="module", params=[(d, h) for d in DTYPES for h in HEADS], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    dtype_name, head = request.param
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES, global_pool=head)
    model = model.to(DEVICE, dtype).requires_grad_(False)
    add_prompts(model, NUM_PROMPTS, "deep")
    model.head.requires_grad_(True)
    images = torch.randn(BATCH, 3, 224, 224, device=DEVICE, dtype=dtype)
    labels = torch.randint(NUM_CLASSES, (BATCH,), device=DEVICE)
    return dtype_name, head, model, images, labels


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_spt_deep_train_step(benchmark, setup, provider):
    dtype_name, head, model, images, labels = setup
    forward = PROVIDERS[provider]

    def loss():
        return F.cross_entropy(forward(model, images).float(), labels)

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()
        benchutil.synchronize(DEVICE)

    times = benchutil.time_quantiles(step, DEVICE, **({} if ON_GPU else {"warmup": 1, "rep": 3}))
    saved = benchutil.saved_bytes(lambda: loss().backward(), exclude=[*model.parameters(), images])
    peak = benchutil.peak_memory_bytes(step, DEVICE)
    benchmark.pedantic(step, rounds=1, iterations=1)
    entry = {
        "provider": provider,
        "dtype": dtype_name,
        "head": head,
        "model": "vit_base_patch16_224",
        "batch": BATCH,
        "num_prompts": NUM_PROMPTS,
        "mode": "fwd+bwd",
        **times,
        "saved_for_backward_bytes": saved,
        "peak_memory_bytes": peak,
    }
    _RESULTS[(dtype_name, head, provider)] = entry
    other = _RESULTS.get((dtype_name, head, "vpt_concat" if provider == "rpp" else "rpp"))
    if other is not None:  # both providers done: put the ratios side by side
        ours, ref = (entry, other) if provider == "rpp" else (other, entry)
        ours["speedup_vs_vpt_concat"] = ref["median_ms"] / ours["median_ms"]
        ours["saved_bytes_ratio_vs_vpt_concat"] = ours["saved_for_backward_bytes"] / ref["saved_for_backward_bytes"]
        if ours["peak_memory_bytes"] is not None:
            ours["peak_memory_ratio_vs_vpt_concat"] = ours["peak_memory_bytes"] / ref["peak_memory_bytes"]
        benchmark.extra_info.update({k: v for k, v in ours.items() if k.endswith("vs_vpt_concat")})
        benchutil.record("spt_deep_train_step", ref)
        benchutil.record("spt_deep_train_step", ours)
    benchmark.extra_info.update({k: v for k, v in entry.items() if k.endswith(("_ms", "_bytes"))})
