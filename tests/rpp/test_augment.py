"""Training augmentations: POMP's pipelines (torchvision RandAugment, and Dassl's RandAugment2 as POMP's configs
name it), seeded per view."""

import random

import pytest
from PIL import Image, ImageChops

from rpp.augment import _DASSL_OPS, DasslRandAugment, _dassl_op, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image():
    image = Image.new("RGB", (40, 30), (30, 120, 200))
    image.paste((250, 10, 10), (5, 5, 20, 20))
    return image


@pytest.mark.parametrize(("name", "low", "high"), _DASSL_OPS)
def test_every_dassl_op_keeps_size_and_mode(name, low, high):
    for v in (low, high, (low + high) / 2):
        out = _dassl_op(name, _image(), v)
        assert out.size == (40, 30) and out.mode == "RGB"


def test_dassl_randaugment_draws_like_dassl():
    image = _image()
    random.seed(4)
    ours = DasslRandAugment(n=2, p=0.6)(image)
    random.seed(4)  # Dassl's RandAugment2.__call__, transcribed with the ops above
    expected = image
    for name, low, high in random.choices(_DASSL_OPS, k=2):
        if random.random() > 0.6:
            continue
        expected = _dassl_op(name, expected, random.random() * (high - low) + low)
    assert ImageChops.difference(ours, expected).getbbox() is None
    assert ImageChops.difference(DasslRandAugment(n=3, p=0.0)(image), image).getbbox() is None  # p 0: untouched


def test_pipelines():
    kwargs = dict(open_clip_train="train", open_clip_val="val")
    assert train_transform("open_clip", 32, MEAN, STD, **kwargs) == "train"
    assert train_transform("none", 32, MEAN, STD, **kwargs) == "val"
    dassl = train_transform("pomp-dassl", 32, MEAN, STD, **kwargs)
    assert "DasslRandAugment(n=2, p=0.6)" in repr(dassl) and "scale=(0.08, 1.0)" in repr(dassl)
    assert dassl(_image()).shape == (3, 32, 32)
    assert "RandAugment" not in repr(train_transform("crop-flip", 32, MEAN, STD, **kwargs))
    with pytest.raises(ValueError, match="augmentation must be one of"):
        train_transform("autoaugment", 32, MEAN, STD, **kwargs)
