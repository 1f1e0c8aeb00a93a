"""Training augmentations (``--augment``), built with torchvision for the student's input size and normalisation.

* ``open_clip``: open_clip's own training transform for the model (``RandomResizedCrop(scale=(0.9, 1))``, bicubic).
* ``pomp``: POMP's pipeline (``configs/trainers/POMP/*_randaug2.yaml``) with torchvision's RandAugment:
  ``RandomResizedCrop(scale=(0.08, 1))`` (bicubic), horizontal flip, ``RandAugment(num_ops=--randaugment-ops,
  magnitude=--randaugment-magnitude)`` (2, 10 by default, Dassl's ``RANDAUGMENT_N``/``_M``), normalisation.
* ``pomp-dassl``: the same crop and flip with the RandAugment variant POMP's configs name (``randaugment2``, Dassl's
  ``RandAugment2(n=2, p=0.6)``): ``--randaugment-ops`` operations drawn with replacement from 15, each applied with
  probability 0.6 at a magnitude drawn uniformly from its range (:class:`DasslRandAugment`).
* ``crop-flip``: the same crop and flip without RandAugment.
* ``none``: the evaluation transform (resize, centre crop): no augmentation.

``--crop-min-scale`` sets the smallest crop area fraction of ``pomp`` and ``crop-flip`` (0.08 in POMP/Dassl).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

__all__ = ["AUGMENTATIONS", "DasslRandAugment", "train_transform"]

AUGMENTATIONS = ("open_clip", "pomp", "pomp-dassl", "crop-flip", "none")

# Dassl's randaugment_list2 (third_party/Dassl.pytorch/dassl/data/transforms/randaugment.py): (op, low, high).
_DASSL_OPS = (
    ("autocontrast", 0.0, 1.0), ("brightness", 0.1, 1.9), ("color", 0.1, 1.9), ("contrast", 0.1, 1.9),
    ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0), ("invert", 0.0, 1.0), ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0), ("sharpness", 0.1, 1.9), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0), ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3),
)  # fmt: skip
_MIRRORED = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # sign flipped with probability 1/2


def _dassl_op(name: str, image: Image.Image, v: float) -> Image.Image:
    """One of Dassl's operations on a PIL image at magnitude ``v`` (its own parametrisation)."""
    if name in _MIRRORED and random.random() > 0.5:
        v = -v
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "invert":
        return ImageOps.invert(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "identity":
        return image
    if name == "posterize":
        return ImageOps.posterize(image, int(v))
    if name == "solarize":
        return ImageOps.solarize(image, v)
    if name == "rotate":
        return image.rotate(v)
    enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
               "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}  # fmt: skip
    if name in enhance:
        return enhance[name](image).enhance(v)
    affine = {
        "shear_x": (1, v, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, v, 1, 0),
        "translate_x": (1, 0, v * image.size[0], 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, v * image.size[1]),
    }[name]
    return image.transform(image.size, Image.AFFINE, affine)


class DasslRandAugment:
    """POMP's ``randaugment2`` (Dassl's ``RandAugment2``): ``n`` operations drawn with replacement from Dassl's 15,
    each skipped with probability ``1 - p``, else applied at a magnitude drawn uniformly from its range. Draws from
    Python's ``random`` (seeded per view by :func:`rpp.data.seeded_views`). Equivalent to Dassl's::

        for op, low, high in random.choices(ops, k=n):
            if random.random() > p: continue
            img = op(img, random.random() * (high - low) + low)
    """

    def __init__(self, n: int = 2, p: float = 0.6):
        self.n, self.p = n, p

    def __call__(self, image: Image.Image) -> Image.Image:
        for name, low, high in random.choices(_DASSL_OPS, k=self.n):
            if random.random() > self.p:
                continue
            image = _dassl_op(name, image, random.random() * (high - low) + low)
        return image

    def __repr__(self) -> str:
        return f"DasslRandAugment(n={self.n}, p={self.p})"


def train_transform(
    name: str,
    image_size: int | tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    open_clip_train: Callable,
    open_clip_val: Callable,
    crop_min_scale: float = 0.08,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 10,
) -> Callable:
    """The PIL image -> ``[3, H, W]`` tensor transform ``name`` (see the module docstring).

    ``open_clip_train`` / ``open_clip_val`` are the model's own transforms (returned for ``open_clip`` / ``none``).
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    if not 0 < crop_min_scale <= 1:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}")
    if randaugment_ops < 0 or not 0 <= randaugment_magnitude <= 30:
        raise ValueError(
            f"RandAugment needs ops >= 0 and magnitude in [0, 30], got {randaugment_ops}, {randaugment_magnitude}"
        )
    if name == "open_clip":
        return open_clip_train
    if name == "none":
        return open_clip_val
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps: list[Callable] = [
        T.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if name == "pomp":
        steps.append(T.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    elif name == "pomp-dassl":
        steps.append(DasslRandAugment(n=randaugment_ops))
    return T.Compose([_to_rgb, *steps, T.ToTensor(), T.Normalize(mean, std)])


def _to_rgb(image):
    return image.convert("RGB")
