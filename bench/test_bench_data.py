"""Data throughput: images/s of ONE data worker for JPEG decode + the training augmentation at 224 px.

Images: synthesised ImageNet-size JPEGs (500x375, quality 90, a smooth random field + stripes + noise tuned to about
110 KB, the mean size of ImageNet-21K's JPEGs), decoded from bytes in memory (disk and network reads not included).

Providers (decode -> augmentation -> normalised float [3, 224, 224]):
- ``pil``: ``PIL.Image.open(...).convert("RGB")`` and the PIL transforms of ``rpp.augment.train_transform`` (what
  rpp.data runs in each DataLoader worker);
- ``torchvision-cpu``: ``torchvision.io.decode_jpeg`` to a uint8 tensor and the same augmentation as
  ``torchvision.transforms.v2`` tensor ops;
- ``torchvision-gpu`` (only where CUDA exists): batched ``decode_jpeg(..., device="cuda")`` (nvJPEG) and the v2 ops on
  the GPU, per image; a worker then only reads bytes.

Augmentations: ``open_clip`` (RandomResizedCrop scale (0.9, 1), bicubic: the model's own) and ``pomp``
(RandomResizedCrop scale (0.08, 1) + flip + RandAugment(2, 10)), plus ``decode`` alone. A worker runs one intra-op
thread (DataLoader workers do), so the CPU numbers are per worker and per core. Results:
``bench/results/<device>/data_decode.json``; the CPU numbers carry ``measured_under_load`` when the 1-minute load
average exceeded 1.5 (other jobs shared the cores) or RPP_BENCH_UNDER_LOAD=1 says so.
"""

from __future__ import annotations

import io
import os

import benchutil
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import io as tvio
from torchvision.transforms import v2

from rpp.augment import train_transform

SIZE = 224
N_IMAGES = 48
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
AUGMENTS = ("decode", "open_clip", "pomp")
UNDER_LOAD = os.environ.get("RPP_BENCH_UNDER_LOAD", "0") == "1"
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not installed here); they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of 500x375 at quality 90, about 110 KB each."""
    out = []
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(low).astype(np.float32) + 40 * np.sin(xx[..., None] / (3 + i % 5) + yy[..., None] / 7.0)
        arr += rng.normal(0, 23, arr.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _pil_pipeline(augment: str):
    if augment == "decode":
        return lambda b: Image.open(io.BytesIO(b)).convert("RGB").load()
    clip_train = open_clip.image_transform(SIZE, is_train=True, mean=MEAN, std=STD)  # RandomResizedCrop(0.9, 1)
    clip_val = open_clip.image_transform(SIZE, is_train=False, mean=MEAN, std=STD)
    transform = train_transform(augment, SIZE, MEAN, STD, open_clip_train=clip_train, open_clip_val=clip_val)
    return lambda b: transform(Image.open(io.BytesIO(b)).convert("RGB"))


def _tensor_augment(augment: str):
    if augment == "decode":
        return lambda x: x
    scale = (0.9, 1.0) if augment == "open_clip" else (0.08, 1.0)
    steps = [v2.RandomResizedCrop(SIZE, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if augment == "pomp":
        steps += [v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=10)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def _tv_cpu_pipeline(augment: str):
    transform = _tensor_augment(augment)

    def run(b: bytes) -> torch.Tensor:
        data = torch.frombuffer(bytearray(b), dtype=torch.uint8)  # a worker's file read, copied into a tensor
        return transform(tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB))

    return run


@pytest.fixture(scope="module")
def jpegs():
    return synthetic_jpegs(N_IMAGES)


def _record(benchmark, provider: str, augment: str, times: dict, jpegs: list[bytes], device: str, extra=None):
    per_image_ms = times["median_ms"] / len(jpegs)
    entry = {
        "provider": provider,
        "augment": augment,
        "device": device,
        "image": "500x375 JPEG q90",
        "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
        "output": f"float32 [3, {SIZE}, {SIZE}]" if augment != "decode" else "uint8 decoded image",
        "images": len(jpegs),
        **times,
        "ms_per_image": per_image_ms,
        "images_per_s_per_worker": 1e3 / per_image_ms,
        "load_average_1m": os.getloadavg()[0],
        "measured_under_load": device == "cpu" and (UNDER_LOAD or os.getloadavg()[0] > 1.5),
        **(extra or {}),
    }
    benchmark.extra_info.update({"images_per_s_per_worker": entry["images_per_s_per_worker"]})
    benchutil.record("data_decode", entry)


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("provider", ["pil", "torchvision-cpu"])
def test_decode_augment_per_worker(benchmark, jpegs, one_thread, provider, augment):
    pipeline = (_pil_pipeline if provider == "pil" else _tv_cpu_pipeline)(augment)
    out = pipeline(jpegs[0])
    if augment != "decode":
        assert tuple(out.shape) == (3, SIZE, SIZE) and out.dtype == torch.float32

    def run():
        for b in jpegs:
            pipeline(b)

    times = benchutil.time_quantiles(run, torch.device("cpu"), warmup=1, rep=3)
    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, provider, augment, times, jpegs, "cpu", {"threads": 1})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("augment", AUGMENTS)
def test_decode_augment_gpu(benchmark, jpegs, augment):
    device = torch.device("cuda")
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    transform = _tensor_augment(augment)

    def run():
        images = tvio.decode_jpeg(data, device=device, mode=tvio.ImageReadMode.RGB)
        for image in images:
            transform(image)
        torch.cuda.synchronize(device)

    times = benchutil.time_quantiles(run, device)
    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "torchvision-gpu", augment, times, jpegs, torch.cuda.get_device_name(), {"batched": True})
