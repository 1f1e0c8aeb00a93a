"""Datasets for ``python -m rpp.spt``: the built-in synthetic patterns, FGVC and VTAB-1k from local copies.

Layouts under ``--data DIR`` (``--data-format``; ``auto`` picks the first that exists, in this order):

- ``filelist``, VTAB-1k as SPT and NOAH distribute it: ``DIR/train800val200.txt`` and ``DIR/test.txt``.
- ``filelist``, FGVC lists as SPT writes them: ``DIR/train.txt`` (or ``DIR/*_train.txt``) and ``DIR/test.txt``
  (or ``DIR/*_test.txt``).
  List lines are ``relative/path label`` (label a non-negative int); paths are relative to ``--image-root``, by default
  ``DIR/images`` when the list's first image is there (SPT's CUB/NABirds layout), else ``DIR``.
- ``vpt-json``, VPT's FGVC annotations: ``DIR/train.json`` and ``DIR/test.json`` (``{"relative/path": class id}``,
  class ids mapped to contiguous labels in sorted order, as VPT does); paths relative to ``--image-root`` as above.
- ``imagefolder``: ``DIR/train/<class>/<image>`` and ``DIR/test/<class>/...`` with the same class folders.

The evaluation split is the test split (``--eval-split test``), as SPT reports; ``--eval-split val`` reads
``val200.txt`` / ``val.txt`` / ``*_val.txt`` / ``val.json`` / ``val/`` instead. ``--benchmark`` (``auto``: ``vtab`` when
``train800val200.txt`` exists, else ``fgvc``) selects SPT's preprocessing, from its ``Dataset/FGVC.py`` and
``Dataset/VTAB.py``:

- ``fgvc``: train ``RandomResizedCrop(S)`` + horizontal flip; eval ``Resize(S * 256 / 224)`` + ``CenterCrop(S)``.
  ``--fgvc-crop random`` gives VPT's instead: train ``Resize(S * 256 / 224)`` + ``RandomCrop(S)`` + flip.
- ``vtab``: ``Resize(S)`` + ``CenterCrop(S)`` for train and eval (no augmentation).

All resizes are bicubic; normalisation follows the backbone. Augmentation is seeded per (seed, epoch, image), not by
worker RNG, so a batch depends only on the step that draws it: a resumed run sees the images an uninterrupted one
would, whatever ``--num-workers``. A corrupt image is skipped with one warning: in training the next image of the
epoch's order takes its place (the batch keeps its size), in evaluation it is left out; both are counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from rpp.errors import UserError

SYNTHETIC_CLASSES = (
    "red horizontal stripes",
    "green vertical stripes",
    "blue checkerboard",
    "yellow disc",
    "magenta diagonal stripes",
    "cyan ring",
)
_SYNTHETIC_COLOURS = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.3), (0.2, 0.35, 0.95), (0.95, 0.85, 0.15), (0.85, 0.2, 0.8))
_SYNTHETIC_COLOURS += ((0.2, 0.85, 0.9),)
DATA_FORMATS = ("auto", "filelist", "vpt-json", "imagefolder")
BENCHMARKS = ("auto", "fgvc", "vtab")
FGVC_CROPS = ("random-resized", "random")
EVAL_SPLITS = ("test", "val")
MAX_CONSECUTIVE_CORRUPT = 64


def synthetic_patterns(split: str, per_class: int, image_size: int = 32, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Coloured patterns, one class per (colour, pattern) pair of :data:`SYNTHETIC_CLASSES`, generated in memory.

    Each image: a random grey background, the class pattern (random frequency, phase and centre) in the class colour
    with colour jitter, and pixel noise. Deterministic in (split, seed). Returns images ``[n, 3, S, S]`` normalised
    with mean = std = 0.5, and their labels (a list of ints).
    """
    gen = torch.Generator().manual_seed(seed * 1000 + {"train": 1, "val": 2, "test": 2}[split])
    n_cls = len(SYNTHETIC_CLASSES)
    labels = torch.arange(n_cls).repeat(per_class)
    n = labels.numel()
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [S, S] in (0, 1)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    freq = (2 + 3 * rand(n))[:, None, None]
    phase = (2 * math.pi * rand(n))[:, None, None]
    cy, cx = (0.3 + 0.4 * rand(n))[:, None, None], (0.3 + 0.4 * rand(n))[:, None, None]
    radius = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    wave = lambda t: torch.sin(2 * math.pi * freq * t + phase) > 0  # noqa: E731 - local shorthand
    masks = torch.stack(
        [
            wave(yy.expand(n, -1, -1)),
            wave(xx.expand(n, -1, -1)),
            wave(yy.expand(n, -1, -1)) ^ wave(xx.expand(n, -1, -1)),
            radius < 0.15 + 0.1 * rand(n)[:, None, None],
            wave((xx + yy).expand(n, -1, -1) / 2),
            (radius > 0.15) & (radius < 0.28),
        ]
    )[labels, torch.arange(n)].float()[:, None]  # [n, 1, S, S]: each image's own class pattern
    colour = (torch.tensor(_SYNTHETIC_COLOURS)[labels] + 0.15 * (rand(n, 3) - 0.5))[:, :, None, None]
    background = (0.2 + 0.5 * rand(n))[:, None, None, None]
    images = background * (1 - masks) + colour * masks + 0.08 * torch.randn(n, 3, image_size, image_size, generator=gen)
    return (images.clamp(0, 1) - 0.5) / 0.5, labels.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Sources: (path, label) lists or in-memory tensors, behind one `load(i)`.


class FileSource:
    """``(path, label)`` pairs; ``load(i)`` decodes image ``i`` to RGB (raises on a corrupt file)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.paths = [p for p, _ in samples]
        self.labels = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def load(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB")


class TensorSource:
    """Preprocessed in-memory images ``[n, C, H, W]`` (the built-in demo); ``load`` returns the tensor itself."""

    def __init__(self, images: torch.Tensor, labels: list[int]):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"built-in image {i}"

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


def sample_seed(*parts: object) -> int:
    """A stable 63-bit seed from printable parts (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class SPTDataset(Dataset):
    """Items ``(image [C, H, W] or None, label, skipped)`` of a source, addressed by ``(epoch, index)`` or an index.

    ``substitute=True`` (training): a corrupt image is replaced by the next one of ``order`` (positions map through it,
    so the replacement is the image the epoch would have drawn next); ``skipped`` counts the corrupt ones passed over.
    ``substitute=False`` (evaluation, prototype init): the item's image is None and ``skipped`` is 1; the collate
    function drops it. The transform runs under RNG seeded from (seed, epoch, image), see the module docstring.
    """

    def __init__(self, source, transform: Callable | None, seed: int = 0, substitute: bool = False):
        self.source, self.transform, self.seed, self.substitute = source, transform, seed, substitute
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _warn(self, index: int, e: Exception) -> None:
        if index not in self._warned:
            self._warned.add(index)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(
                f"rpp.spt: skipping corrupt image {self.source.describe(index)}: {type(e).__name__}: {first}",
                stacklevel=2,
            )

    def _transform(self, image, epoch, index: int) -> torch.Tensor:
        if self.transform is None:
            return image
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            random.seed(sample_seed(self.seed, epoch, index, "py"))
            out = self.transform(image)
        random.setstate(state)
        return out

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if not self.substitute:
            try:
                image = self.source.load(index)
            except Exception as e:  # noqa: BLE001 - any decoder error means "corrupt image"
                self._warn(index, e)
                return None, self.source.labels[index], 1
            return self._transform(image, epoch, index), self.source.labels[index], 0
        n = len(self.source)
        for skipped in range(min(MAX_CONSECUTIVE_CORRUPT, n)):
            i = (index + skipped) % n
            try:
                image = self.source.load(i)
            except Exception as e:  # noqa: BLE001 - any decoder error means "corrupt image"
                self._warn(i, e)
                continue
            return self._transform(image, epoch, i), self.source.labels[i], skipped
        raise UserError(
            f"{min(MAX_CONSECUTIVE_CORRUPT, n)} unreadable images in a row from {self.source.describe(index)}: "
            "check the dataset"
        )


def collate(items) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images [B, C, H, W], labels [B], corrupt images skipped); items without an image are dropped."""
    kept = [(img, label) for img, label, _ in items if img is not None]
    skipped = sum(s for _, _, s in items)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([img for img, _ in kept])
    return images, torch.tensor([label for _, label in kept], dtype=torch.long), skipped


# ----------------------------------------------------------------------------------------------------------------
# Transforms (SPT's Dataset/FGVC.py and Dataset/VTAB.py; VPT's src/data/transforms.py for --fgvc-crop random).


def build_transforms(benchmark: str, image_size: int, mean, std, fgvc_crop: str = "random-resized"):
    """(train transform, eval transform) for ``benchmark`` ``'fgvc'`` or ``'vtab'`` at input size ``image_size``."""
    bicubic = transforms.InterpolationMode.BICUBIC
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if benchmark == "vtab":
        t = transforms.Compose(
            [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size), *normalize]
        )
        return t, t
    if benchmark != "fgvc":
        raise ValueError(f"benchmark must be 'fgvc' or 'vtab', got {benchmark!r}")
    resize = transforms.Resize(round(image_size * 256 / 224), interpolation=bicubic)
    flip = transforms.RandomHorizontalFlip(0.5)
    if fgvc_crop == "random-resized":
        train = transforms.Compose([transforms.RandomResizedCrop(image_size, interpolation=bicubic), flip, *normalize])
    elif fgvc_crop == "random":
        train = transforms.Compose([resize, transforms.RandomCrop(image_size), flip, *normalize])
    else:
        raise ValueError(f"fgvc_crop must be one of {FGVC_CROPS}, got {fgvc_crop!r}")
    return train, transforms.Compose([resize, transforms.CenterCrop(image_size), *normalize])


# ----------------------------------------------------------------------------------------------------------------
# Layout detection and readers.


@dataclass
class Layout:
    """A resolved ``--data`` directory: format, benchmark, the train / eval annotation (file or folder), image root."""

    format: str
    benchmark: str
    train: Path
    eval: Path
    image_roots: tuple[Path, ...]  # list paths resolve under the first root that holds the list's first image


def _one(root: Path, names: tuple[str, ...], pattern: str | None = None) -> Path | None:
    """The first of ``names`` that exists in ``root``, else the single match of ``pattern`` (None if none or many)."""
    for n in names:
        if (root / n).exists():
            return root / n
    if pattern is not None:
        matches = sorted(root.glob(pattern))
        if len(matches) == 1:
            return matches[0]
    return None


def _candidates(root: Path, fmt: str, split: str) -> tuple[Path | None, Path | None]:
    """(train, eval) annotation paths of format ``fmt`` under ``root`` for eval split ``split``, None where absent."""
    if fmt == "filelist":
        if (root / "train800val200.txt").is_file():  # VTAB-1k: its val200.txt is the held-out part of train800val200
            ev = "test.txt" if split == "test" else "val200.txt"
            return root / "train800val200.txt", (root / ev if (root / ev).is_file() else None)
        train = _one(root, ("train.txt",), "*_train.txt")
        ev = _one(root, (f"{split}.txt",), f"*_{split}.txt")
        return train, ev
    if fmt == "vpt-json":
        return _one(root, ("train.json",)), _one(root, (f"{split}.json",))
    train = root / "train" if (root / "train").is_dir() else None
    return train, (root / split if (root / split).is_dir() else None)


def detect_layout(
    root: str | os.PathLike,
    data_format: str = "auto",
    benchmark: str = "auto",
    eval_split: str = "test",
    image_root: str | None = None,
) -> Layout:
    """Resolve ``--data`` (see the module docstring); UserError naming what was expected where."""
    root = Path(root)
    formats = ("filelist", "vpt-json", "imagefolder") if data_format == "auto" else (data_format,)
    found = None
    for fmt in formats:
        train, ev = _candidates(root, fmt, eval_split)
        if train is not None and ev is not None:
            found = (fmt, train, ev)
            break
        if train is not None and data_format == "auto":
            raise UserError(
                f"--data {root}: found {train.name} ({fmt}) but no {eval_split} split beside it "
                f"(--eval-split {eval_split})"
            )
    if found is None:
        expected = {
            "filelist": "train800val200.txt + test.txt (VTAB-1k) or train.txt / *_train.txt + test.txt (FGVC lists)",
            "vpt-json": "train.json + test.json (VPT)",
            "imagefolder": "train/<class>/ + test/<class>/",
        }
        wanted = "; or ".join(expected[f] for f in formats).replace("test", eval_split)
        raise UserError(f"--data {root}: expected {wanted}")
    fmt, train, ev = found
    if benchmark == "auto":
        benchmark = "vtab" if train.name == "train800val200.txt" else "fgvc"
    if image_root is not None:
        if not Path(image_root).is_dir():
            raise UserError(f"--image-root: directory not found: {image_root}")
        roots = (Path(image_root),)
    else:
        roots = (root / "images", root) if fmt != "imagefolder" and (root / "images").is_dir() else (root,)
    return Layout(fmt, benchmark, train, ev, roots)


def _pick_root(first: str, roots: tuple[Path, ...]) -> Path:
    """The first of ``roots`` holding ``first`` (the list's first image), or the first root when none does."""
    return next((r for r in roots if (r / first).is_file()), roots[0])


def read_file_list(path: Path, image_roots: tuple[Path, ...]) -> list[tuple[str, int]]:
    """``relative/path label`` lines; UserError naming the line for a malformed one or a missing image."""
    entries = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path}:{lineno}: expected 'relative/path label' with a non-negative int label: {line!r}")
        entries.append((lineno, parts[0].strip(), int(parts[1])))
    if not entries:
        raise UserError(f"{path} lists no images")
    root = _pick_root(entries[0][1], image_roots)
    samples = []
    for lineno, name, label in entries:
        image = root / name
        if not image.is_file():
            raise UserError(f"{path}:{lineno}: image not found: {image} (see --image-root)")
        samples.append((str(image), label))
    return samples


def read_json_list(path: Path, image_roots: tuple[Path, ...]) -> list[tuple[str, object]]:
    """VPT's ``{"relative/path": class id}`` annotations (ids still raw; see :func:`load_splits`)."""
    try:
        anno = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(anno, dict) or not anno:
        raise UserError(f"{path}: expected a non-empty JSON object mapping image paths to class ids")
    samples = []
    image_root = _pick_root(next(iter(anno)), image_roots)
    for name, cls in anno.items():
        if isinstance(cls, bool) or not isinstance(cls, (int, str)):
            raise UserError(f"{path}: class id of {name!r} must be an int or a string, got {cls!r}")
        image = image_root / name
        if not image.is_file():
            raise UserError(f"{path}: image not found: {image} (see --image-root)")
        samples.append((str(image), cls))
    return samples


def load_splits(layout: Layout) -> tuple[FileSource, FileSource, list[str]]:
    """(train source, eval source, class names) of a resolved layout."""
    if layout.format == "imagefolder":
        try:
            train = datasets.ImageFolder(str(layout.train))
            ev = datasets.ImageFolder(str(layout.eval))
        except (FileNotFoundError, RuntimeError) as e:  # torchvision's "no valid image files" / "couldn't find class"
            raise UserError(f"imagefolder data: {e}") from None
        if train.classes != ev.classes:
            raise UserError(f"{layout.train} and {layout.eval} have different class folders")
        return FileSource(train.samples), FileSource(ev.samples), list(train.classes)
    if layout.format == "vpt-json":
        train, ev = read_json_list(layout.train, layout.image_roots), read_json_list(layout.eval, layout.image_roots)
        ids = sorted({c for _, c in train}, key=lambda c: (isinstance(c, str), c))  # VPT: contiguous, sorted
        index = {c: i for i, c in enumerate(ids)}
        unknown = [c for _, c in ev if c not in index]
        if unknown:
            raise UserError(f"{layout.eval}: class id {unknown[0]!r} does not occur in {layout.train}")
        relabel = lambda samples: [(p, index[c]) for p, c in samples]  # noqa: E731
        return FileSource(relabel(train)), FileSource(relabel(ev)), [str(c) for c in ids]
    train, ev = read_file_list(layout.train, layout.image_roots), read_file_list(layout.eval, layout.image_roots)
    num_classes = 1 + max(label for _, label in train + ev)
    return FileSource(train), FileSource(ev), [str(c) for c in range(num_classes)]
