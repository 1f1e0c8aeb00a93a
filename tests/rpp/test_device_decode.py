"""--decode-on-device: workers read bytes, the training device decodes (nvJPEG on a GPU) and augments; here on CPU."""

import io
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from rpp import data
from rpp.augment import train_transform
from rpp.errors import UserError

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _smooth(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def _transform(name: str):
    clip_train = open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)
    clip_val = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
    return train_transform(name, 32, MEAN, STD, open_clip_train=clip_train, open_clip_val=clip_val)


@pytest.mark.parametrize("name", ["open_clip", "crop-flip", "pomp", "none"])
def test_tensor_transform_draws_the_same_augmentation(name):
    pil = _transform(name)
    image = _smooth()
    as_tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    a = data.seeded_views(image, pil, 2, seed=7)
    b = data.seeded_views(as_tensor, data.tensor_transform(pil), 2, seed=7)
    assert a.shape == b.shape == (2, 3, 32, 32) and b.dtype == torch.float32
    # Same crops, flips and RandAugment ops; only PIL's and torch's bicubic resampling differ.
    assert (a - b).abs().mean() < 0.1, (a - b).abs().mean()
    if name != "none":  # another seed: other random draws, a much larger difference
        assert (a - data.seeded_views(image, pil, 2, seed=8)).abs().mean() > 3 * (a - b).abs().mean()


def test_tensor_transform_refuses_steps_without_a_tensor_form():
    with pytest.raises(UserError, match="has no tensor form"):
        data.tensor_transform(lambda image: image.rotate(3))


def _folder(root):
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            buf = io.BytesIO()
            _smooth(40, 30, seed=10 * c + i).save(buf, "PNG" if i == 2 else "JPEG")
            (root / name / f"{i}.{'png' if i == 2 else 'jpg'}").write_bytes(buf.getvalue())
    (root / "b" / "0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_decode_on_device_loader_matches_views_and_skips_corrupt(tmp_path):
    spec = data.resolve(str(_folder(tmp_path / "imgs")), "imagefolder", None)
    transform = _transform("crop-flip")

    def first(decode_device, workers=0):
        loader, per_epoch = data.train_loader(
            spec, transform, batch_size=6, views=2, seed=3, shots=None, shots_seed=0, rank=0, world=1,
            num_workers=workers, decode_device=decode_device,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = next(iter(loader))
        return batch, per_epoch, caught

    (views, labels, indices, skipped), per_epoch, caught = first(torch.device("cpu"))
    assert views.shape == (6, 2, 3, 32, 32) and per_epoch == 1 and int(skipped.sum()) == 1
    assert any("skipping corrupt image" in str(w.message) and "0.jpg" in str(w.message) for w in caught)
    bad = int((skipped > 0).nonzero()[0])
    assert int(indices[bad]) != 3 and 3 not in indices.tolist()  # image 3 = b/0.jpg, replaced by the next good one
    assert labels.tolist() == [int(spec.source.labels[i]) for i in indices.tolist()]

    (again, labels2, indices2, _), _, _ = first(torch.device("cpu"), workers=1)
    assert torch.equal(views, again) and torch.equal(indices, indices2)  # deterministic, whatever the workers
    (pil_views, _, pil_indices, _), _, _ = first(None)
    good = [b for b in range(6) if skipped[b] == 0]
    assert pil_indices[good].tolist() == indices[good].tolist()
    assert (pil_views[good] - views[good]).abs().mean() < 0.1  # the same augmentation, resampled by torch


def test_decode_on_device_needs_files():
    spec = data.resolve(None, "builtin", None)
    with pytest.raises(UserError, match="needs images in files"):
        data.train_loader(spec, _transform("none"), batch_size=4, views=1, seed=0, shots=None, shots_seed=0, rank=0,
                          world=1, num_workers=0, decode_device=torch.device("cpu"))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_decode_images_on_gpu_match_cpu():
    buf = io.BytesIO()
    _smooth(50, 40).save(buf, "JPEG")
    encoded = [torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)] * 3
    gpu = data.decode_images(encoded, torch.device("cuda"))
    cpu = data.decode_images(encoded, torch.device("cpu"))
    assert all(g.is_cuda for g in gpu)
    assert max((g.cpu().float() - c.float()).abs().max() for g, c in zip(gpu, cpu, strict=True)) <= 8  # IDCTs differ
