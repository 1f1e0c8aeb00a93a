"""Training augmentations (``--augment``), built with torchvision for the student's input size and normalisation.

* ``open_clip``: open_clip's own training transform for the model (``RandomResizedCrop(scale=(0.9, 1))``, bicubic).
* ``pomp``: POMP's recipe (``configs/trainers/POMP/*_randaug2.yaml``): ``RandomResizedCrop(scale=(0.08, 1))``
  (bicubic), horizontal flip, RandAugment, normalisation. RandAugment here is torchvision's
  ``RandAugment(num_ops=--randaugment-ops, magnitude=--randaugment-magnitude)`` (2, 10 by default, Dassl's
  ``RANDAUGMENT_N``/``_M``); POMP's ``randaugment2`` is Dassl's own variant (2 of 15 ops, each applied with p 0.6 at a
  uniformly random magnitude), a documented difference.
* ``crop-flip``: the same crop and flip without RandAugment.
* ``none``: the evaluation transform (resize, centre crop): no augmentation.

``--crop-min-scale`` sets the smallest crop area fraction of ``pomp`` and ``crop-flip`` (0.08 in POMP/Dassl).
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

__all__ = ["AUGMENTATIONS", "train_transform"]

AUGMENTATIONS = ("open_clip", "pomp", "crop-flip", "none")


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
    return T.Compose([_to_rgb, *steps, T.ToTensor(), T.Normalize(mean, std)])


def _to_rgb(image):
    return image.convert("RGB")
