"""Datasets for prompt pretraining: built-in shapes, image folders, the ImageNet-21K synset tree, webdataset shards.

Every dataset yields `(views, label, index, skipped)`:
  views:   [V, C, H, W] float, V augmented views of one image
  label:   int class index (into the class-name list)
  index:   int position of the image in the full (not few-shot) dataset; for webdataset streams the sample id
           `shard * 2**32 + position` (shard: its number in the expanded --data list, in the order given; position:
           the sample's place among that shard's samples in tar member order), see `sample_id`. A teacher cache maps
           it to a row with its stored per-shard counts; corrupt samples are never yielded, so their ids are unused.
  skipped: int corrupt images skipped to produce this item (summed per batch and logged)

Augmentation is seeded per (seed, epoch, index, view), not by worker RNG, so a batch depends only on the step that
draws it: resuming mid-epoch, or changing --num-workers, reproduces the same images.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import math
import os
import random
import re
import signal
import tarfile
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rpp import index as image_index
from rpp.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".JPEG")
SYNSET = re.compile(r"^n\d{8}$")
MAX_CONSECUTIVE_CORRUPT = 64


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seeded_views(image: Image.Image, transform: Callable, views: int, seed: int) -> torch.Tensor:
    """[V, C, H, W]: `transform` applied `views` times under torch/python RNG seeded from `seed`, without touching
    the caller's global RNG state."""
    out = []
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        for v in range(views):
            torch.manual_seed(_seed(seed, v))
            random.seed(_seed(seed, v, "py"))
            out.append(transform(image))
    random.setstate(state)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# Built-in dataset: procedurally drawn coloured shapes.

COLORS = {"red": (220, 45, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
BUILTIN_SPLITS = {"train": 32, "val": 16}  # images per class


class BuiltinShapes:
    """12 classes ("red circle", "blue square", ...) of 64x64 images, generated deterministically in memory.

    Each image: a noisy light background and one shape of random size, position and colour jitter.
    """

    classnames = [f"{c} {s}" for c in COLORS for s in SHAPES]

    def __init__(self, split: str = "train", per_class: int | None = None, seed: int = 0):
        if split not in BUILTIN_SPLITS:
            raise ValueError(f"split must be one of {list(BUILTIN_SPLITS)}, got {split!r}")
        self.split, self.seed = split, seed
        n = per_class or BUILTIN_SPLITS[split]
        self.labels = [i % len(self.classnames) for i in range(n * len(self.classnames))]

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"builtin:{self.split}:{i}"

    def load(self, i: int) -> Image.Image:
        rng = random.Random(_seed("builtin", self.seed, self.split, i))
        color_name, shape = self.classnames[self.labels[i]].split(" ")
        size = 64
        bg = tuple(rng.randint(150, 235) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(12):  # background clutter: faint grey dots
            x, y, r, g = rng.randint(0, size), rng.randint(0, size), rng.randint(1, 3), rng.randint(110, 200)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(g, g, g))
        color = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[color_name])
        half = rng.randint(10, 20)
        cx, cy = rng.randint(half + 2, size - half - 2), rng.randint(half + 2, size - half - 2)
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
        return img


# ----------------------------------------------------------------------------------------------------------------
# Files on disk.


class ImageFiles:
    """A list of (path, label) pairs; `load` decodes one image to RGB (raises on a corrupt file)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples
        self.labels = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def load(self, i: int) -> Image.Image:
        with Image.open(self.samples[i][0]) as img:
            return img.convert("RGB")


def _list_images(folder: Path) -> list[str]:
    out = []
    for root, _, files in os.walk(folder, followlinks=True):
        out.extend(
            os.path.join(root, f) for f in files if f.endswith(IMAGE_EXTENSIONS) or f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(out)


def read_classnames(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """(names, synsets) from a names file.

    Plain format: one class name per line. Class-description format (ImageNet-21K words.txt, LOC_synset_mapping):
    `nXXXXXXXX<tab or space>name, synonym, ...`; the name is the first comma-separated entry and synsets are returned.
    Blank lines are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"class names file not found: {path}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"class names file is empty: {path}")
    split = [line.split(None, 1) for line in lines]
    if all(SYNSET.match(parts[0]) and len(parts) == 2 for parts in split):
        return [parts[1].split(",")[0].strip() for parts in split], [parts[0] for parts in split]
    return lines, None


def image_folder(
    root: str, classnames_file: str | None = None, *, cache_dir: str | None = None
) -> tuple[image_index.ImageIndex, list[str]]:
    """`root/<class>/**/*.jpg` (torchvision ImageFolder layout): labels follow the sorted folder names. Class names
    come from `classnames_file` (one per line, in sorted-folder order) or the folder names with '_' -> ' '.
    `root` may also be an index folder or a file list (see rpp.index); the images are held as a compact
    `rpp.index.ImageIndex`, saved in and reused from `cache_dir` when one is given."""
    index = _index(root, "imagefolder", cache_dir)
    return index, _index_classnames(index, classnames_file, root)


def _index(data: str, layout: str, cache_dir: str | None) -> image_index.ImageIndex:
    """The index of an index folder, a file list or a folder tree (walked once, or reused from `cache_dir`)."""
    p = Path(data)
    progress = image_index._rank() == 0
    if image_index.is_index(p):
        return image_index.load_index(p, progress=progress)
    if p.is_file() and cache_dir is None:
        return image_index.build_index(p, progress=progress)
    base = p if p.is_file() else image_index.tree_base(p, layout)
    if not p.is_file() and not image_index._class_folders(base, layout):
        what = "synset folders (nXXXXXXXX)" if layout == "imagenet21k" else "class folders"
        raise UserError(f"no {what} in {data}: expected {data}/<class>/<image files>")
    if cache_dir is None:
        return image_index.scan_tree(p, layout, progress=progress)
    return image_index.cached_index(p, None if p.is_file() else layout, cache_dir, progress=progress)


def _index_classnames(index: image_index.ImageIndex, classnames_file: str | None, data: str) -> list[str]:
    """One name per class of `index`: synsets through a class-description file (`classnames_file`, else one found
    next to the images), other class folders through `classnames_file` or their own names ('_' -> ' ')."""
    if index.layout == "imagenet21k":
        if classnames_file is None:
            base = Path(index.root)
            candidates = [d / f for d in (base, base.parent, base.parent.parent) for f in DESCRIPTION_FILES]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise UserError(
                    f"no class-description file for {data}: pass --classnames (words.txt format or one name "
                    f"per line), or put words.txt in {base}"
                )
            classnames_file = str(found[0])
        return _names_for_folders(index.classes, classnames_file, data, "synset folders")
    if classnames_file:
        return _names_for_folders(index.classes, classnames_file, data, "class folders")
    if index.source.get("label_ids"):
        raise UserError(f"{data} labels its classes by number: pass --classnames FILE (one name per line, in id order)")
    return [c.replace("_", " ") for c in index.classes]


def _names_for_folders(folders: list[str], classnames_file: str, root: str, kind: str) -> list[str]:
    """One name per folder, from a `<folder id>\t<name>` description file or a plain list in folder order."""
    names, described = read_classnames(classnames_file)
    if described is not None:
        lookup = dict(zip(described, names, strict=True))
        missing = [f for f in folders if f not in lookup]
        if missing:
            raise UserError(f"{len(missing)} {kind} of {root} are missing from {classnames_file}, e.g. {missing[0]}")
        return [lookup[f] for f in folders]
    if len(names) != len(folders):
        raise UserError(f"{classnames_file} has {len(names)} names but {root} has {len(folders)} {kind}")
    return names


DESCRIPTION_FILES = ("words.txt", "imagenet21k_wordnet_lemmas.txt", "LOC_synset_mapping.txt", "classnames.txt")


def imagenet21k_folder(
    root: str, classnames_file: str | None = None, *, cache_dir: str | None = None
) -> tuple[image_index.ImageIndex, list[str]]:
    """ImageNet-21K winter21 tree: `root/nXXXXXXXX/*.JPEG` (or `root/train/nXXXXXXXX/`), an index folder or a file
    list. Names come from a class-description file (`--classnames`, else words.txt or LOC_synset_mapping.txt found in
    root or its parent). Held as a compact `rpp.index.ImageIndex` (see `image_folder`)."""
    index = _index(root, "imagenet21k", cache_dir)
    return index, _index_classnames(index, classnames_file, root)


def _existing_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data path not found: {path}")
    if not p.is_dir():
        raise UserError(f"data path is not a directory: {path}")
    return p


def few_shot(labels: list[int], shots: int, seed: int) -> list[int]:
    """Sorted indices keeping `shots` images per class (all of a class that has fewer), chosen by `seed`."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # image positions grouped by class, ascending within each
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rng = random.Random(_seed("few-shot", seed))
    keep = []
    for idx in np.split(order, bounds) if len(order) else []:
        idx = idx.tolist()  # one class at a time: never a Python object per image of the whole dataset
        keep.extend(idx if len(idx) <= shots else rng.sample(idx, shots))
    return sorted(keep)


class ViewsDataset(Dataset):
    """Map-style dataset over a source (BuiltinShapes / ImageFiles), optionally a subset of it.

    Items are addressed by `(epoch, position)` pairs (see EpochBatchSampler) so augmentation can be seeded per
    epoch; a plain int position means epoch 0. A corrupt image is skipped (the next position is used instead),
    warned about once and counted in the item's `skipped` field.
    """

    def __init__(self, source, transform: Callable, views: int = 1, seed: int = 0, indices: list[int] | None = None):
        self.source, self.transform, self.views, self.seed = source, transform, views, seed
        self.indices = range(len(source)) if indices is None else indices  # a range: no per-image objects
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, pos = key if isinstance(key, tuple) else (0, key)
        for skipped in range(MAX_CONSECUTIVE_CORRUPT):
            index = self.indices[(pos + skipped) % len(self.indices)]
            try:
                image = self.source.load(index)
            except Exception as e:  # any decoder error means "corrupt image": skip it, do not stop the run
                if index not in self._warned:
                    self._warned.add(index)
                    warnings.warn(f"skipping corrupt image {self.source.describe(index)}: {e}", stacklevel=1)
                continue
            views = seeded_views(image, self.transform, self.views, _seed(self.seed, epoch, index))
            return views, int(self.source.labels[index]), index, skipped
        raise RuntimeError(f"{MAX_CONSECUTIVE_CORRUPT} corrupt images in a row near {self.source.describe(index)}")


class EpochBatchSampler:
    """Infinite stream of batches of (epoch, position) keys for this rank, starting at `start` batches in.

    Each epoch is the DistributedSampler order for (seed, epoch) on this rank (padded so every rank has the same
    number of batches), cut into full batches. The stream depends only on (seed, world size, batch size), so a
    resumed run starts at batch `start` and sees what an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.batches_per_epoch = math.ceil(n / world) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"dataset of {n} images is too small for batch size {batch_size} on {world} processes")

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's positions for `epoch` (int64 [ceil(n / world)]): DistributedSampler's order (shuffled with
        seed + epoch, padded by repetition, strided by rank), as a tensor rather than a Python list of n ints."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g)
        total = math.ceil(self.n / self.world) * self.world
        if total > self.n:
            order = torch.cat([order, order.repeat(math.ceil((total - self.n) / self.n))[: total - self.n]])
        return order[self.rank : total : self.world].clone()  # not a view: the full permutation is freed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start, self.batches_per_epoch)
        while True:
            order = self.order(epoch)
            for b in range(batch, self.batches_per_epoch):
                yield [(epoch, p) for p in order[b * self.batch_size : (b + 1) * self.batch_size].tolist()]
            epoch, batch = epoch + 1, 0


class ShardedEvalSampler:
    """Positions rank, rank + world, ... in batches: every image exactly once over all ranks (no padding), so
    all-reduced counts are exact."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        self.positions = list(range(rank, n, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(len(self)):
            yield self.positions[b * self.batch_size : (b + 1) * self.batch_size]


# ----------------------------------------------------------------------------------------------------------------
# webdataset shards.


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern (`shards-{0000..0099}.tar`), a directory of .tar files or one .tar."""
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise UserError(f"no .tar shards in directory {spec}")
        return shards
    import webdataset

    shards = webdataset.shardlists.expand_urls(spec)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UserError(
            f"webdataset shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" * (len(missing) > 1))
        )
    return shards


_UNDECODED = object()
SHARD_SHIFT = 32  # sample id = shard << SHARD_SHIFT | position: 4 billion samples per shard, 2**31 shards in int64


def sample_id(shard: int, position: int) -> int:
    """The `index` a webdataset stream yields for sample `position` of shard number `shard` (see the module doc)."""
    return (shard << SHARD_SHIFT) | position


def _member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member: the path before the first '.' of the file name, and the rest."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar: consecutive file members with the same key, in file
    order."""
    key, sample = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            this, ext = _member_key(member.name)
            if this != key and sample:
                yield key, sample
                sample = {}
            key = this
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def shard_samples(path: str) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, {extension: bytes}) per sample of one shard; an unreadable rest of the shard is warned about
    and skipped (positions before it keep their meaning)."""
    try:
        for position, (key, sample) in enumerate(_tar_samples(path)):
            yield position, key, sample
    except (tarfile.TarError, OSError, EOFError) as e:
        warnings.warn(f"skipping the rest of unreadable shard {path}: {e}", stacklevel=1)


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard, grouped exactly as `shard_samples` groups them, from the tar headers only (data is seeked
    over, not read). An unreadable rest of a shard is warned about; its count stops there."""
    counts = []
    for shard in shards:
        n, key = 0, None
        try:
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    this = _member_key(member.name)[0] if member.isfile() else key
                    n, key = n + (this != key), this
        except (tarfile.TarError, OSError, EOFError) as e:
            warnings.warn(f"counting only the first {n} samples of unreadable shard {shard}: {e}", stacklevel=1)
        counts.append(n)
    return counts


def decode_sample(key: str, sample: dict[str, bytes]) -> tuple[Image.Image, int] | None:
    """(RGB image, label) of a webdataset sample, or None (with a warning) for a corrupt one."""
    try:
        return Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), int(sample["cls"].decode().strip())
    except Exception as e:  # missing key or undecodable bytes: a corrupt sample
        warnings.warn(f"skipping corrupt webdataset sample {key}: {type(e).__name__}: {e}", stacklevel=1)
        return None


class WebDatasetStream(IterableDataset):
    """Endless, deterministic stream of `(views, label, sample id, skipped)` from webdataset shards with `jpg`/`cls`.

    Pass p shuffles the shard list with (seed, p). Shards are split over the `world * workers` slots (node, then
    worker, as webdataset's split_by_node/split_by_worker); with fewer shards than slots, every slot reads all
    shards and keeps every (world*workers)-th sample, so no slot is starved. A small seeded shuffle buffer mixes
    samples within a slot. `start` = batches this rank already consumed: each worker skips the raw samples behind
    them without decoding, so a resumed run continues where it stopped. Every raw sample is one item: a corrupt one
    is replaced by the next readable sample (and counted in `skipped`), so positions never depend on decoding.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Callable,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        views: int = 1,
        seed: int = 0,
        start: int = 0,
        buffer: int = 256,
    ):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world, self.views, self.seed, self.start, self.buffer = rank, world, views, seed, start, buffer

    def _slot_samples(self, slot: int, slots: int) -> Iterator[tuple[int, str, dict[str, bytes], int]]:
        for p in range(1 << 62):
            shards = list(enumerate(self.shards))  # (number in the given order, path): numbers make the sample ids
            random.Random(_seed("shards", self.seed, p)).shuffle(shards)
            by_shard = len(shards) >= slots
            mine = shards[slot::slots] if by_shard else shards
            buffer: list[tuple[int, str, dict[str, bytes], int]] = []
            rng = random.Random(_seed("buffer", self.seed, p, slot))
            n = 0
            for number, shard in mine:
                for position, key, sample in shard_samples(shard):
                    n += 1
                    if not by_shard and (n - 1) % slots != slot:
                        continue
                    buffer.append((p, key, sample, sample_id(number, position)))
                    if len(buffer) >= self.buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batches round-robin from workers, starting at worker 0: batch b of an uninterrupted run
        # came from worker b % workers. A loader resumed at batch `start` asks worker 0 first, so worker w plays the
        # part of worker (w + start) % workers and skips the samples of the batches that one already produced.
        worker = (worker + self.start) % workers
        done = max(0, (self.start - worker + workers - 1) // workers) * self.batch_size
        slots = self._slot_samples(self.rank * workers + worker, self.world * workers)
        for _ in range(done):  # raw samples, not decoded: one item per raw sample makes the count exact
            next(slots)
        # Item i of the slot is raw sample i, or, if that one is corrupt, the next readable raw sample (as the
        # map-style datasets do). Counting raw samples, a resumed stream continues exactly where it stopped, whatever
        # is corrupt, without decoding what it skips; `skipped` is 1 on the item that stands in for a corrupt sample.
        pending: deque[list] = deque()  # [p, key, sample bytes, id, decoded or _UNDECODED], from the current item on
        while True:
            j = 0
            while True:
                if j == len(pending):
                    pending.append([*next(slots), _UNDECODED])
                entry = pending[j]
                if entry[4] is _UNDECODED:
                    entry[4] = decode_sample(entry[1], entry[2])
                    entry[2] = None  # the bytes are not needed once decoded
                if entry[4] is not None:
                    break
                j += 1
                if j == MAX_CONSECUTIVE_CORRUPT:
                    raise RuntimeError(f"{MAX_CONSECUTIVE_CORRUPT} corrupt webdataset samples in a row near {entry[1]}")
            p, key, _, index, (image, label) = pending[j]
            yield seeded_views(image, self.transform, self.views, _seed(self.seed, p, key)), label, index, int(j > 0)
            pending.popleft()


# ----------------------------------------------------------------------------------------------------------------
# Entry point used by train / eval / teacher_cache.


@dataclass
class DataSpec:
    """A resolved dataset: the source (map-style) or shards (webdataset), class names and the format."""

    format: str
    classnames: list[str]
    source: object | None = None
    shards: list[str] | None = None
    eval_source: object | None = None

    def fingerprint(self) -> str:
        """Identifies the image list and class list (checked when a teacher cache is used). Shards count by file
        name (not directory, so a moved shard set still matches), size and modification time, in the order given."""
        h = hashlib.sha256(repr(self.classnames).encode())
        if isinstance(self.source, image_index.ImageIndex):  # computed when the index was built: O(1) here
            h.update(f"index:{self.source.fingerprint}".encode())
        elif self.source is not None:
            h.update(str(len(self.source)).encode())
            for i in range(len(self.source)):
                h.update(f"{self.source.describe(i)}:{self.source.labels[i]}\n".encode())
        for shard in self.shards or []:
            stat = os.stat(shard)
            h.update(f"{os.path.basename(shard)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def infer_format(path: str | None) -> str:
    if path is None:
        return "builtin"
    p = Path(path)
    if path.endswith(".tar") or ("{" in path and "}" in path) or (p.is_dir() and any(p.glob("*.tar"))):
        return "webdataset"
    layout = image_index.index_layout(p) if p.is_dir() else None
    if layout is not None:
        return layout
    if p.is_dir() and any(SYNSET.match(d.name) for d in p.iterdir() if d.is_dir()):
        from rpp.datasets import imagenet_synsets

        synsets = {d.name for d in p.iterdir() if d.is_dir() and SYNSET.match(d.name)}
        # ImageNet-1K and its variants (val, Sketch, A, R): CLIP's curated class names (rpp.datasets)
        return "imagenet1k" if synsets <= set(imagenet_synsets()) else "imagenet21k"
    if p.is_dir() and {d.name for d in p.iterdir() if d.is_dir()} == IMAGENET_V2_FOLDERS:
        return "imagenet-v2"  # class ids 0..999: sorted numerically, not as strings (rpp.datasets)
    return "imagefolder"


IMAGENET_V2_FOLDERS = {str(i) for i in range(1000)}


def resolve(
    data: str | None,
    data_format: str | None,
    classnames: str | None,
    seed: int = 0,
    eval_data: str | None = None,
    *,
    index_cache: str | None = None,
) -> DataSpec:
    """Find the images and class names; UserError for anything missing. Folder trees and file lists become a compact
    `rpp.index.ImageIndex`, saved in and reused from `index_cache` when given (rank 0 builds, other ranks map it)."""
    if data is not None and not data.strip():  # "" would be the current directory, every subfolder a class
        raise UserError("invalid value '' for --data: expected a dataset path (omit --data for the built-in data)")
    fmt = data_format or infer_format(data)
    if fmt != "builtin" and data is None:
        raise UserError(f"--data-format {fmt} needs --data PATH")
    if fmt == "builtin":
        if data is not None:
            raise UserError("--data-format builtin takes no --data")
        names = list(BuiltinShapes.classnames)
        return DataSpec(fmt, names, BuiltinShapes("train", seed=seed), eval_source=BuiltinShapes("val", seed=seed))
    if fmt == "webdataset":
        shards = expand_shards(data)
        if classnames is None:
            raise UserError("--data-format webdataset needs --classnames FILE (one name per `cls` index)")
        names, _ = read_classnames(classnames)
        spec = DataSpec(fmt, names, shards=shards)
    else:
        from rpp.datasets import READERS  # ImageNet-21K-P, ImageNet-1K variants with CLIP names, ImageNet-V2

        load = READERS.get(fmt) or (image_folder if fmt == "imagefolder" else imagenet21k_folder)
        source, names = load(data, classnames, cache_dir=index_cache)
        _check_empty_classes(source, names, fmt, data)
        spec = DataSpec(fmt, names, source)
    _warn_duplicate_names(spec.classnames)
    if eval_data is not None:
        from rpp.datasets import READERS

        load = READERS.get(fmt) or (imagenet21k_folder if infer_format(eval_data) == "imagenet21k" else image_folder)
        spec.eval_source, eval_names = load(eval_data, classnames, cache_dir=index_cache)
        if eval_names != spec.classnames:
            raise UserError(f"--eval-data {eval_data} has different classes than --data {data}")
    return spec


def _check_empty_classes(source, names: list[str], fmt: str, data: str) -> None:
    """A class without images still enters every softmax (and, in an image folder, is usually a stray folder):
    refused for image folders; synset trees keep empty synsets (their ids stay aligned with the synset list), with a
    warning. One bincount over the labels, no per-image Python work."""
    labels = getattr(source, "labels", None)
    if labels is None:
        return
    empty = np.flatnonzero(np.bincount(np.asarray(labels), minlength=len(names)) == 0)
    if not len(empty):
        return
    classes = getattr(source, "classes", names)
    example = classes[empty[0]] if len(classes) == len(names) else names[empty[0]]
    if fmt == "imagefolder":
        raise UserError(f"{len(empty)} class folder(s) of --data {data} hold no images, e.g. {example!r}: remove "
                        "them or add their images (an empty folder would still be a class)")  # fmt: skip
    warnings.warn(f"{len(empty)} class(es) of --data {data} hold no images (e.g. {example!r}); they stay classes, "
                  "so class ids match the full class list", stacklevel=2)  # fmt: skip


def _warn_duplicate_names(names: list[str]) -> None:
    """Same-named classes (real in ImageNet-21K: several synsets are called 'crane') get identical text features."""
    counts = Counter(names)
    repeated = [(name, n) for name, n in counts.items() if n > 1]
    if repeated:
        examples = ", ".join(f"{name!r} x{n}" for name, n in repeated[:3])
        warnings.warn(
            f"{len(repeated)} class name(s) occur more than once ({examples}{', ...' * (len(repeated) > 3)}): "
            "those classes get identical text features, so zero-shot prompts cannot tell them apart",
            stacklevel=2,
        )


# ----------------------------------------------------------------------------------------------------------------
# Decoding on the training device (--decode-on-device): workers read file bytes, the GPU decodes and augments.

_RGB_STEPS = ("_to_rgb", "_convert_to_rgb", "MaybeConvertMode")  # decoders below already give RGB
_TO_TENSOR_STEPS = ("ToTensor", "MaybeToTensor", "PILToTensor")
_TENSOR_STEPS = ("RandomResizedCrop", "Resize", "CenterCrop", "RandomHorizontalFlip", "RandAugment", "Normalize")


def _uint8_to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255)


def tensor_transform(transform: Callable) -> Callable:
    """The tensor form of a PIL training transform (a torchvision Compose): uint8 [3, H, W] on any device -> float.

    Same steps with the same parameters, so under the same seed they draw the same random crops, flips and
    RandAugment ops (torchvision draws them on the CPU generator whatever the image's device); only the resampling
    differs (torch's antialiased bicubic instead of PIL's). The RGB conversion is dropped (decoding gives RGB) and
    ToTensor becomes a uint8 -> float scale. A step with no tensor form is a UserError naming it."""
    steps = list(getattr(transform, "transforms", [transform]))
    out: list[Callable] = []
    for step in steps:
        name = getattr(step, "__name__", type(step).__name__)
        if name in _RGB_STEPS:
            continue
        if name in _TO_TENSOR_STEPS:
            out.append(_uint8_to_float)
        elif name in _TENSOR_STEPS:
            out.append(step)
        else:
            raise UserError(f"--decode-on-device: the augmentation step {step!r} has no tensor form on the device")
    return lambda image: functools.reduce(lambda x, f: f(x), out, image)


class EncodedViews(Dataset):
    """ViewsDataset's items undecoded, for --decode-on-device: `(file bytes uint8 [L], label, index, seed)`; the seed
    is the one ViewsDataset would augment with. An unreadable file gives empty bytes (a corrupt image downstream)."""

    def __init__(self, source, seed: int = 0, indices: list[int] | None = None):
        if not hasattr(source, "path"):
            raise UserError("--decode-on-device needs images in files: an image folder, an ImageNet-21K tree, an "
                            "index or a file list (not the built-in data or webdataset shards)")  # fmt: skip
        self.source, self.seed = source, seed
        self.indices = range(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, pos = key if isinstance(key, tuple) else (0, key)
        index = self.indices[pos % len(self.indices)]
        try:
            data = Path(self.source.path(index)).read_bytes()
        except OSError:
            data = b""
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return encoded, int(self.source.labels[index]), index, _seed(self.seed, epoch, index)


def _collate_encoded(items):
    encoded, labels, indices, seeds = zip(*items, strict=True)
    return list(encoded), torch.tensor(labels), torch.tensor(indices), list(seeds)


def decode_images(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 [3, H, W] images on `device` (None for a corrupt one): JPEGs in one batched torchvision
    `decode_jpeg` on the device (nvJPEG on a GPU), anything else (PNG, CMYK JPEG, ...) through torchvision's or PIL's
    CPU decoders."""
    from torchvision import io as tvio

    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg = [i for i, e in enumerate(encoded) if len(e) > 3 and int(e[0]) == 0xFF and int(e[1]) == 0xD8]
    rest = sorted(set(range(len(encoded))) - set(jpeg))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        try:
            decoded = tvio.decode_jpeg([encoded[i] for i in jpeg], mode=tvio.ImageReadMode.RGB, device=device)
            for i, image in zip(jpeg, decoded, strict=True):
                out[i] = image
        except RuntimeError:  # one bad JPEG fails the batch: decode them one by one below
            rest = list(range(len(encoded)))
        for i in rest:
            if len(encoded[i]) == 0:
                continue
            try:
                out[i] = tvio.decode_image(encoded[i], mode=tvio.ImageReadMode.RGB).to(device)
            except (RuntimeError, ValueError):
                try:
                    with Image.open(io.BytesIO(encoded[i].numpy().tobytes())) as img:
                        array = np.asarray(img.convert("RGB"))
                    out[i] = torch.from_numpy(array.copy()).permute(2, 0, 1).to(device)
                except Exception:  # any decoder error: a corrupt image
                    out[i] = None
    return out


class DeviceDecodedLoader:
    """Iterates a loader of EncodedViews batches and yields rpp.data's usual `(views [B, V, C, H, W], labels [B],
    indices [B], skipped [B])`, decoded and augmented on `device` (views stay there).

    A corrupt image is replaced by the next good image of the same batch (its label and index; augmented with the
    corrupt one's seed), warned about once and counted in `skipped`, as ViewsDataset counts the images it skips."""

    def __init__(self, loader: DataLoader, source, transform: Callable, views: int, device: torch.device):
        self.loader, self.source, self.views, self.device = loader, source, views, torch.device(device)
        self.transform = tensor_transform(transform)
        self._warned: set[int] = set()

    def __iter__(self):
        for encoded, labels, indices, seeds in self.loader:
            images = decode_images(encoded, self.device)
            good = [b for b, image in enumerate(images) if image is not None]
            if not good:
                raise RuntimeError(f"every image of a batch is corrupt, e.g. {self.source.describe(int(indices[0]))}")
            skipped = torch.zeros(len(images), dtype=torch.int64)
            take = list(range(len(images)))
            for b, image in enumerate(images):
                if image is None:
                    index = int(indices[b])
                    if index not in self._warned:
                        self._warned.add(index)
                        warnings.warn(f"skipping corrupt image {self.source.describe(index)}", stacklevel=1)
                    take[b] = next(g for g in good[bisect.bisect_left(good, b) :] + good)
                    skipped[b] = (take[b] - b) % len(images)
            views = torch.stack([seeded_views(images[take[b]], self.transform, self.views, seeds[b])
                                 for b in range(len(images))])  # fmt: skip
            yield views, labels[take], indices[take], skipped


def eval_loader(source, transform: Callable, batch_size: int, rank: int, world: int, num_workers: int) -> DataLoader:
    dataset = ViewsDataset(source, transform)
    sampler = ShardedEvalSampler(len(dataset), batch_size, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_single_view)


def collate_single_view(items):
    """Eval batches: (images [B, C, H, W], labels [B], indices [B], skipped [B])."""
    views, labels, indices, skipped = torch.utils.data.default_collate(items)
    return views[:, 0], labels, indices, skipped


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers ignore SIGINT/SIGTERM sent to the whole process group (Ctrl-C, schedulers): the main process
    finishes its step, saves and exits, and the daemonic workers go with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(
    spec: DataSpec,
    transform: Callable,
    *,
    batch_size: int,
    views: int,
    seed: int,
    shots: int | None,
    shots_seed: int,
    rank: int,
    world: int,
    num_workers: int,
    start: int = 0,
    pin_memory: bool = False,
    decode_device: torch.device | None = None,
) -> tuple[DataLoader | DeviceDecodedLoader, int | None]:
    """(endless loader from batch `start` on, batches per epoch or None when unknown without counting).

    Batches: (views [B, V, C, H, W], labels [B], indices [B], skipped [B]). With `decode_device`, workers only read
    file bytes and the views are decoded and augmented on that device (see DeviceDecodedLoader).
    """
    kwargs = dict(num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
                  worker_init_fn=_ignore_stop_signals)  # fmt: skip
    if spec.format == "webdataset":
        if shots is not None:
            raise UserError("--shots needs a map-style dataset (imagefolder, imagenet21k, builtin), not webdataset")
        if decode_device is not None:
            raise UserError("--decode-on-device needs images in files (map-style data), not webdataset shards")
        stream = WebDatasetStream(spec.shards, transform, batch_size, rank, world, views, seed, start)
        return DataLoader(stream, batch_size=batch_size, **kwargs), None
    indices = few_shot(spec.source.labels, shots, shots_seed) if shots is not None else None
    if decode_device is not None:
        encoded = EncodedViews(spec.source, seed, indices)
        sampler = EpochBatchSampler(len(encoded), batch_size, rank, world, seed, start)
        kwargs.update(pin_memory=False, collate_fn=_collate_encoded)
        loader = DataLoader(encoded, batch_sampler=sampler, **kwargs)
        return DeviceDecodedLoader(loader, spec.source, transform, views, decode_device), sampler.batches_per_epoch
    dataset = ViewsDataset(spec.source, transform, views, seed, indices)
    sampler = EpochBatchSampler(len(dataset), batch_size, rank, world, seed, start)
    return DataLoader(dataset, batch_sampler=sampler, **kwargs), sampler.batches_per_epoch
