"""Shared-prefix class-prompt encoding vs the naive 77-token CoOp/POMP encoding, fwd+bwd.

ViT-B/16 text tower config (width 512, 12 layers, 8 heads, embed 512; random weights), open_clip's ImageNet-1K class
names, n_ctx = 16. Per case: time (median/p20/p80), tokens run through the transformer, bytes autograd saves for
backward (activations only: parameters and the frozen tower excluded) and, on GPU, peak memory. Providers of the same
class count are recorded side by side with their ratios in ``bench/results/<device>/text_encoder.json``.

CPU cases by default: C = 100 (both providers) and C = 1000 (shared prefix). ``RPP_BENCH_FULL=1`` adds C = 250 (both),
the naive path at C = 1000 and the shared prefix at C = 21,841 with chunking + checkpointing. The naive path at
C = 1000 saves about 19 GB of activations in fp32, more than a 24 GB CPU box can hold next to everything else, so on
CPU it runs as 4 chunks of 250 classes with gradients accumulated (the same arithmetic; what a user of the naive path
has to do), and its bytes saved for backward are counted over one unchunked forward without keeping them
(``saved_bytes(keep=False)``, exact). On GPU: C = 1000 and C = 21,841 (ImageNet-1K names cycled) in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
from benchutil import (
    bench_device,
    imagenet_classnames,
    peak_memory_bytes,
    record,
    saved_bytes,
    synchronize,
    time_quantiles,
)
from open_clip.model import CLIP

from rpp_kernels.text import SharedPrefixTextEncoder, encode_text_naive

FULL = os.environ.get("RPP_BENCH_FULL") == "1"
DEVICE = bench_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
N_CTX = 16
TEXT_CFG = dict(width=512, heads=8, layers=12)
CONTEXT = 77
_full = pytest.mark.skipif(not FULL, reason="long on CPU: set RPP_BENCH_FULL=1")
_RESULTS: dict[tuple[int, str], dict] = {}

if DEVICE.type == "cuda":
    # (provider, C, chunk_size, checkpoint)
    CASES = [
        ("shared_prefix", 1000, None, False),
        ("naive", 1000, None, False),
        ("shared_prefix", 21841, None, False),
        ("shared_prefix", 21841, 4096, True),
        ("naive", 21841, None, False),
    ]
else:
    CASES = [
        ("shared_prefix", 100, None, False),
        ("naive", 100, None, False),
        pytest.param("naive", 250, None, False, marks=_full),
        pytest.param("shared_prefix", 250, None, False, marks=_full),
        ("shared_prefix", 1000, None, False),
        pytest.param("naive", 1000, 250, False, marks=_full),
        pytest.param("shared_prefix", 21841, 1024, True, marks=_full),
    ]


@pytest.fixture(scope="module")
def clip_model() -> CLIP:
    torch.manual_seed(0)
    tiny_vision = dict(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    return CLIP(512, tiny_vision, TEXT_CFG).eval().to(DEVICE, DTYPE)


@pytest.fixture(scope="module")
def encoder(clip_model) -> SharedPrefixTextEncoder:
    return SharedPrefixTextEncoder(clip_model, N_CTX)


@pytest.mark.parametrize(("provider", "n_classes", "chunk_size", "checkpoint"), CASES)
def test_text_encoder_fwd_bwd(benchmark, clip_model, encoder, provider, n_classes, chunk_size, checkpoint):
    names = imagenet_classnames(n_classes)
    encoder.chunk_size, encoder.checkpoint = chunk_size, checkpoint
    if provider == "shared_prefix":
        forward = lambda: encoder(names)
    else:
        forward = lambda: encode_text_naive(clip_model, names, encoder.ctx)
    grad_out = torch.randn(n_classes, 512, device=DEVICE, dtype=DTYPE)

    def step():
        encoder.ctx.grad = None
        if provider == "naive" and chunk_size is not None:  # gradient accumulation over class chunks
            for i in range(0, n_classes, chunk_size):
                encode_text_naive(clip_model, names[i : i + chunk_size], encoder.ctx).backward(
                    grad_out[i : i + chunk_size]
                )
        else:
            forward().backward(grad_out)
        synchronize(DEVICE)

    try:
        # pytest-benchmark's own round; it also tokenizes and plans once (cached afterwards), as training does.
        benchmark.pedantic(step, rounds=1, iterations=1)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        record("text_encoder", {"provider": provider, "n_classes": n_classes, "result": "out of memory"})
        pytest.skip(f"{provider} at C={n_classes}: out of memory")

    slow_cpu = DEVICE.type == "cpu" and (provider == "naive" or n_classes >= 1000)
    times = time_quantiles(step, DEVICE, warmup=0 if slow_cpu else 2, rep=2 if slow_cpu else 5)
    peak = peak_memory_bytes(step, DEVICE)
    # One unchunked forward's saved activations; counted without keeping them where they would not fit.
    saved = saved_bytes(forward, exclude=list(encoder.parameters()), keep=not (provider == "naive" and chunk_size))
    if provider == "shared_prefix":
        suffix_tokens = sum(len(s) for s in encoder._suffix_tokens(names))
        tokens = 1 + N_CTX + suffix_tokens
    else:
        tokens = CONTEXT * n_classes
    entry = {
        "provider": provider,
        "mode": "fwd+bwd",
        "n_classes": n_classes,
        "n_ctx": N_CTX,
        "text_cfg": TEXT_CFG,
        "dtype": str(DTYPE).replace("torch.", ""),
        "chunk_size": chunk_size,
        "checkpoint": checkpoint,
        "tokens": tokens,
        "time": times,
        "tokens_per_s": tokens / (times["median_ms"] / 1e3),
        "saved_bytes": saved,
        "saved_bytes_per_class": saved / n_classes,
        "peak_memory_bytes": peak,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    other = _RESULTS.get((n_classes, "shared_prefix" if provider == "naive" else "naive"))
    if other is not None and not checkpoint and not other["checkpoint"]:  # naive's chunks keep its arithmetic
        ours, naive = (entry, other) if provider == "shared_prefix" else (other, entry)
        entry["vs_naive"] = {
            "speedup": naive["time"]["median_ms"] / ours["time"]["median_ms"],
            "saved_bytes_ratio": ours["saved_bytes"] / naive["saved_bytes"],
            "tokens_ratio": ours["tokens"] / naive["tokens"],
        }
    if not checkpoint:
        _RESULTS[(n_classes, provider)] = entry
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "text_cfg"})
    record("text_encoder", entry)
