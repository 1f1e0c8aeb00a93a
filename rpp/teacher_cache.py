"""Offline teacher soft labels: `python -m rpp.teacher_cache --data PATH --teacher ViT-L-14 --teacher-pretrained W
--output DIR`, then train with `--teacher-cache DIR`.

The cache holds, for every image of the dataset (imagefolder, imagenet21k, builtin or webdataset shards), the
teacher's top-k class ids and probabilities (softmax at --temperature over all classes, truncated to k and
renormalised):
  DIR/indices.npy   int32   [N, k]   numpy memmaps (np.load(..., mmap_mode="r"))
  DIR/probs.npy     float16 [N, k]
  DIR/meta.json     n, k, classes, teacher, temperature, seed (random teachers), dataset fingerprint; for webdataset
                    also shards (file names, in the order given) and counts (samples per shard)
  DIR/progress-<rank>.json   units already written (the progress markers): chunks of `--chunk` images of a
                    map-style dataset, or whole shards of a webdataset
Rows: image i of a map-style dataset is row i. A webdataset sample is row `offset of its shard + its position in the
shard` (offsets = cumulative counts, taken once from the tar headers when the cache is created); the training stream
yields `data.sample_id(shard, position)` and `TeacherCache.lookup` maps it to that row. A corrupt image's row stays
zero: the data loaders skip it, so training never asks for it.

Which views the teacher labels. By default one row per image from the evaluation transform (resize + centre crop):
a deliberate difference from the online teacher, which labels each augmented training view (rpp.train logs it).
`--augmented` labels exactly the views rpp.train draws (map-style data): give the training run's --seed, --views,
--epochs, --shots, --shots-seed and augmentation options (--augment, ...); augmentation is seeded per (seed, epoch,
image, view), so the cache regenerates the same views. Rows: `((epoch * M + j) * views + view)` for the j-th image of
the few-shot subset of M images; rpp.train checks that its options match and looks rows up by epoch and view.
`--topk` defaults to the method's --kd-topk (100 by default), the k training uses.
It is built resumably: a unit is written, flushed, then recorded in the rank's progress marker (atomic rename), so a
killed run restarts at the first unit it had not recorded. Under torchrun the units are shared out over ranks
(unit u on rank u % world); within a rank, data workers read different shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from rpp import checkpoint, data, distributed
from rpp.config import DATA_FORMATS, parse
from rpp.errors import UserError

META_KEYS = {"n": int, "k": int, "classes": int, "fingerprint": str, "temperature": (int, float)}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _read_json(path: Path, what: str) -> object:
    """json.loads of a cache file; a missing, torn or non-JSON file is a one-line UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"teacher cache {path.parent}: {path.name} ({what}) is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"teacher cache {path.parent}: {path.name} ({what}) is unreadable or torn: {e}") from None


def read_meta(folder: Path) -> dict:
    """The validated meta.json of a cache folder."""
    meta = _read_json(folder / "meta.json", "the cache description")
    if not isinstance(meta, dict):
        raise UserError(f"teacher cache {folder}: meta.json is not a JSON object")
    for key, types in META_KEYS.items():
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool):
            raise UserError(f"teacher cache {folder}: meta.json has no valid {key!r} (rebuild the cache)")
    if "shards" in meta:
        shards, counts = meta["shards"], meta.get("counts")
        if not (isinstance(shards, list) and isinstance(counts, list) and len(shards) == len(counts)):
            raise UserError(f"teacher cache {folder}: meta.json's shards and counts do not match (rebuild the cache)")
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != meta["n"]:
            raise UserError(f"teacher cache {folder}: meta.json's counts do not add up to n (rebuild the cache)")
    elif not isinstance(meta.get("chunk"), int) or meta["chunk"] <= 0:
        raise UserError(f"teacher cache {folder}: meta.json has no valid 'chunk' (rebuild the cache)")
    return meta


def _done_units(folder: Path, units: int | None = None) -> set[int]:
    done: set[int] = set()
    for marker in sorted(folder.glob("progress-*.json")):
        record = _read_json(marker, "a progress marker")
        ids = record.get("done") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in ids):
            raise UserError(f"teacher cache {folder}: {marker.name} is not a progress marker (delete it to redo its "
                            "units)")  # fmt: skip
        if units is not None and any(not 0 <= u < units for u in ids):
            raise UserError(f"teacher cache {folder}: {marker.name} names units beyond the cache's {units}")
        done.update(ids)
    return done


def load_arrays(folder: Path, meta: dict, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """(indices int32 [n, k], probs float16 [n, k]) memory-mapped; never unpickled (object arrays are refused).
    A missing, torn or mis-shaped array is a one-line UserError."""
    out = []
    for name, dtype in (("indices.npy", np.int32), ("probs.npy", np.float16)):
        path = folder / name
        if not path.is_file():
            raise UserError(f"teacher cache {folder}: {name} is missing (rebuild the cache)")
        try:
            array = np.load(path, mmap_mode=mode, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # object arrays, torn headers, truncated data
            raise UserError(f"teacher cache {folder}: {name} is unreadable or torn: {e}") from None
        if array.dtype != dtype or array.shape != (meta["n"], meta["k"]):
            raise UserError(f"teacher cache {folder}: {name} holds {array.dtype} {list(array.shape)}, expected "
                            f"{np.dtype(dtype)} {[meta['n'], meta['k']]} (rebuild the cache)")  # fmt: skip
        out.append(array)
    return out[0], out[1]


def fingerprint(spec: data.DataSpec) -> str:
    """The dataset identity a cache is checked against: the data's own fingerprint (relative paths, labels, sizes and
    modification times of the images, or shard names, sizes and mtimes; the class names), plus the seed of the
    built-in dataset, whose images it generates."""
    fp = spec.fingerprint()
    if spec.format == "builtin":
        fp = hashlib.sha256(f"{fp}:builtin-seed:{spec.source.seed}".encode()).hexdigest()[:16]
    return fp


def content_hash(spec: data.DataSpec) -> str:
    """sha256 over the bytes of every image file (map-style, in dataset order, with labels) or shard (in the order
    given): what `--verify` compares, catching a file replaced with the same size and modification time."""
    h = hashlib.sha256(fingerprint(spec).encode())
    if spec.shards is not None:
        files = list(spec.shards)
    elif spec.format == "builtin":
        return h.hexdigest()[:32]  # generated from the seed, which the fingerprint holds
    else:
        files = [spec.source.describe(i) for i in range(len(spec.source))]
    for path in tqdm(files, desc="teacher cache --verify: hashing", unit="file", delay=2):
        try:
            file_hash = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    file_hash.update(block)
            h.update(file_hash.digest())
        except OSError as e:
            h.update(f"unreadable:{e.errno}".encode())
    return h.hexdigest()[:32]


def _units(meta: dict) -> tuple[int, str]:
    """(progress units of the cache, their name): shards of a webdataset, else chunks of images."""
    if "shards" in meta:
        return len(meta["shards"]), "shards"
    views = meta["augmented"]["views"] if meta.get("augmented") else 1
    return math.ceil(meta["n"] // views / meta["chunk"]), "chunks"


class TeacherCache:
    """Read side, used by rpp.train: `lookup(indices [B]) -> (class ids [B, k] int64, probs [B, k] fp32)`, where
    indices are the data loader's (dataset positions, or webdataset sample ids)."""

    def __init__(self, folder: Path, meta: dict, subset: np.ndarray | None = None):
        self.folder, self.meta = folder, meta
        self.indices, self.probs = load_arrays(folder, meta)
        self.counts = np.asarray(meta.get("counts", []), dtype=np.int64)
        self.offsets = np.cumsum(self.counts) - self.counts
        self.augmented = meta.get("augmented")
        self.subset = subset  # augmented caches: the sorted dataset positions of the few-shot subset

    def describe(self) -> str:
        """One line for the training log: which views the cached teacher labels belong to."""
        if self.augmented:
            a = self.augmented
            return (f"teacher cache {self.folder}: top-{self.meta['k']} of the augmented training views "
                    f"({a['epochs']} epoch(s) x {a['views']} view(s), seed {a['seed']})")  # fmt: skip
        return (
            f"teacher cache {self.folder}: top-{self.meta['k']} of centre crops, one per image (built without "
            "--augmented): the teacher did not see the augmented views the student trains on"
        )

    @classmethod
    def open(
        cls, folder: str, spec: data.DataSpec, *, temperature: float, training: dict | None = None
    ) -> TeacherCache:
        """The complete cache in ``folder`` for ``spec``'s images and classes at ``temperature``; else UserError.
        ``training`` (see :func:`training_views`): the run's view options, which an ``--augmented`` cache must
        match."""
        path = Path(folder)
        if not (path / "meta.json").is_file():
            raise UserError(f"--teacher-cache: no meta.json in {folder} (build it with python -m rpp.teacher_cache)")
        meta = read_meta(path)
        if meta["fingerprint"] != fingerprint(spec):
            raise UserError(f"--teacher-cache {folder} was built for different images or classes than --data "
                            "(or images changed since: sizes and modification times are compared)")  # fmt: skip
        if meta["temperature"] != temperature:
            raise UserError(f"--teacher-cache {folder} holds probabilities at temperature {meta['temperature']}, "
                            f"this run uses --temperature {temperature}")  # fmt: skip
        units, name = _units(meta)
        missing = units - len(_done_units(path, units))
        if missing:
            raise UserError(f"--teacher-cache {folder} is incomplete ({missing} {name} left): rerun rpp.teacher_cache")
        augmented = meta.get("augmented")
        if not augmented:
            return cls(path, meta)
        if training is not None:
            built = {key: value for key, value in augmented.items() if key != "epochs"}
            changed = sorted(key for key in built if built[key] != training.get(key))
            if changed:
                what = ", ".join(f"{key} {built[key]!r} (this run: {training.get(key)!r})" for key in changed)
                raise UserError(f"--teacher-cache {folder} holds the teacher's labels of other augmented views: built "
                                f"with {what}; rebuild it with this run's options")  # fmt: skip
        return cls(path, meta, few_shot_subset(spec, augmented["shots"], augmented["shots_seed"]))

    def rows(self, indices: torch.Tensor) -> np.ndarray:
        """Cache rows [B] of data-loader indices [B]."""
        idx = indices.numpy()
        if "shards" not in self.meta:
            return idx
        shard, position = idx >> data.SHARD_SHIFT, idx & ((1 << data.SHARD_SHIFT) - 1)
        beyond = position >= self.counts[shard]
        if beyond.any():  # only if a shard's content changed while its size and modification time did not
            s = int(shard[beyond][0])
            raise UserError(f"--teacher-cache {self.folder}: shard {self.meta['shards'][s]} has more samples than the "
                            f"{self.counts[s]} counted when the cache was built: rebuild the cache")  # fmt: skip
        return self.offsets[shard] + position

    def lookup(
        self, indices: torch.Tensor, epoch: int | None = None, views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class ids [B * views, k], probs [B * views, k]) for data-loader indices [B], view-major per image (the
        order of ``batch.flatten(0, 1)``). A centre-crop cache repeats each image's row over its views; an augmented
        one returns each view's own row of ``epoch``."""
        rows = self.rows(indices)
        if not self.augmented:
            rows = np.repeat(rows, views)
        else:
            a = self.augmented
            if views != a["views"]:
                raise UserError(
                    f"--teacher-cache {self.folder} holds {a['views']} view(s) per image, the batch has {views}"
                )
            if epoch is None or not 0 <= epoch < a["epochs"]:
                raise UserError(f"--teacher-cache {self.folder} covers {a['epochs']} epoch(s) of augmented views; this "
                                f"run reached epoch {epoch}: rebuild it with --epochs of the run")  # fmt: skip
            items = epoch * len(self.subset) + np.searchsorted(self.subset, rows)
            rows = (items[:, None] * views + np.arange(views)).reshape(-1)
        return torch.from_numpy(self.indices[rows].astype(np.int64)), torch.from_numpy(
            self.probs[rows].astype(np.float32)
        )


class _ShardBatches(IterableDataset):
    """`(images [b, C, H, W], rows [b], shard, False)` batches of webdataset shards `(number, path, offset)`, then
    `(None, None, shard, True)` once a shard is fully read. Worker w of W reads shards w, w + W, ... so workers
    decode different shards in parallel; a corrupt sample is warned about and its row left out."""

    def __init__(self, shards: list[tuple[int, str, int]], transform, batch_size: int):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for number, path, offset in self.shards[worker::workers]:
            images, rows = [], []
            for position, key, sample in data.shard_samples(path):
                decoded = data.decode_sample(key, sample)
                if decoded is not None:
                    images.append(self.transform(decoded[0]))
                    rows.append(offset + position)
                if len(rows) == self.batch_size:
                    yield torch.stack(images), torch.tensor(rows), number, False
                    images, rows = [], []
            if rows:
                yield torch.stack(images), torch.tensor(rows), number, False
            yield None, None, number, True


def few_shot_subset(spec: data.DataSpec, shots: int | None, shots_seed: int) -> np.ndarray:
    """The sorted dataset positions rpp.train trains on (its --shots subset, or every image)."""
    if shots is None:
        return np.arange(len(spec.source))
    return np.asarray(data.few_shot(spec.source.labels, shots, shots_seed), dtype=np.int64)


def training_views(seed: int, views: int, shots: int | None, shots_seed: int, mcfg) -> dict:
    """What decides the augmented views of a training run (besides the epoch): recorded by an ``--augmented`` cache
    and compared with rpp.train's options."""
    transform = [mcfg.model, mcfg.augment, mcfg.crop_min_scale, mcfg.randaugment_ops, mcfg.randaugment_magnitude]
    return {"seed": seed, "views": views, "shots": shots, "shots_seed": shots_seed, "transform": transform}


def _augmented_batches(spec: data.DataSpec, transform, chunks: list[int], cfg: CacheConfig, subset: np.ndarray):
    """`(images [b * views, C, H, W], rows [b * views], chunk, False)` for chunks of `cfg.chunk` (epoch, image) items,
    each image's views drawn exactly as rpp.train's loader draws them (same ViewsDataset, seed and keys)."""
    m, per_batch = len(subset), max(1, cfg.batch_size // cfg.views)
    items = m * cfg.epochs
    batches: list[list[tuple[int, int]]] = []
    chunk_of: list[int] = []
    for c in chunks:
        keys = [divmod(u, m) for u in range(c * cfg.chunk, min(items, (c + 1) * cfg.chunk))]
        for start in range(0, len(keys), per_batch):
            batches.append(keys[start : start + per_batch])
            chunk_of.append(c)
    if not batches:
        return
    dataset = data.ViewsDataset(spec.source, transform, cfg.views, cfg.seed, subset.tolist())
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
    for b, (views, _, idx, _) in enumerate(loader):
        # idx is the image actually loaded (a corrupt one is replaced as in training): its own (epoch, image) rows
        epochs = torch.tensor([e for e, _ in batches[b]])
        item = epochs * m + torch.from_numpy(np.searchsorted(subset, idx.numpy()))
        rows = (item[:, None] * cfg.views + torch.arange(cfg.views)).reshape(-1)
        yield views.flatten(0, 1), rows, chunk_of[b], False
        if b + 1 == len(batches) or chunk_of[b + 1] != chunk_of[b]:
            yield None, None, chunk_of[b], True


def _chunk_batches(spec: data.DataSpec, transform, chunks: list[int], cfg: CacheConfig):
    """The same batches for chunks of `cfg.chunk` images of a map-style dataset, from one DataLoader: its workers start
    once and keep prefetching across chunk boundaries."""
    n = len(spec.source)
    positions: list[int] = []
    batches: list[list[int]] = []
    chunk_of: list[int] = []  # per batch: its chunk
    for c in chunks:
        first = len(positions)
        positions += range(c * cfg.chunk, min(n, (c + 1) * cfg.chunk))
        for start in range(first, len(positions), cfg.batch_size):
            batches.append(list(range(start, min(start + cfg.batch_size, len(positions)))))
            chunk_of.append(c)
    if not batches:
        return
    dataset = data.ViewsDataset(spec.source, transform, indices=positions)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=data.collate_single_view)  # fmt: skip
    for b, (images, _, idx, _) in enumerate(loader):
        # idx is the image actually loaded: a corrupt file's row stays empty, training never asks for it
        yield images, idx, chunk_of[b], False
        if b + 1 == len(batches) or chunk_of[b + 1] != chunk_of[b]:
            yield None, None, chunk_of[b], True


@dataclass
class CacheConfig:
    data: str | None = field(
        default=None,
        metadata={
            "help": "dataset path: image folder, ImageNet-21K synset tree, or webdataset shards (brace pattern, "
            "directory of .tar or one .tar; rows follow the shards in the order given); none = the built-in "
            "shapes dataset"
        },
    )
    data_format: str | None = field(
        default=None, metadata={"help": "data layout; none = infer from --data", "choices": DATA_FORMATS}
    )
    classnames: str | None = field(
        default=None, metadata={"help": "class names file, as for rpp.train (required for webdataset)"}
    )
    output: str = field(default="runs/teacher-cache", metadata={"help": "cache directory (created or resumed)"})
    topk: int | None = field(
        default=None, metadata={"help": "teacher classes kept per image; none = the method's --kd-topk (training's k)"}
    )
    augmented: bool = field(
        default=False,
        metadata={
            "help": "label the augmented views rpp.train draws (give its --seed, --views, --epochs, --shots, "
            "--shots-seed and augmentation options) instead of one centre crop per image (map-style data)"
        },
    )
    epochs: int = field(default=1, metadata={"help": "--augmented: epochs of views to label (rpp.train's --epochs)"})
    views: int = field(default=1, metadata={"help": "--augmented: views per image (rpp.train's --views)"})
    shots: int | None = field(
        default=None, metadata={"help": "--augmented: rpp.train's --shots (only that subset is labelled)"}
    )
    shots_seed: int = field(default=0, metadata={"help": "--augmented: rpp.train's --shots-seed"})
    chunk: int = field(
        default=4096,
        metadata={"help": "images per progress marker update (map-style data; webdataset progress is per shard)"},
    )
    batch_size: int = field(default=128, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=4, metadata={"help": "data-loading worker processes per rank"})
    seed: int = field(
        default=0,
        metadata={"help": "seed of random teacher weights (tiny test models) and, --augmented, rpp.train's --seed"},
    )
    trust_torchscript: str | None = field(
        default=None,
        metadata={
            "help": "a TorchScript archive (OpenAI's CLIP .pt release) you trust as --teacher-pretrained: only this "
            "file may be loaded with torch.jit.load, which can run code stored in it"
        },
    )
    verify: bool = field(
        default=False,
        metadata={
            "help": "hash every image or shard file (reads the whole dataset): stored with a new cache; an existing "
            "cache is checked against it (catches files replaced with the same size and modification time)"
        },
    )
    max_chunks: int | None = field(
        default=None,
        metadata={
            "help": "stop after this many chunks, or shards for webdataset (a time-boxed partial build); none = all"
        },
    )


def _verify(folder: Path, meta: dict, spec: data.DataSpec, info: distributed.DistInfo) -> None:
    """--verify on an existing cache: hash the data's bytes and compare them with the hash stored at build time (a
    cache built without --verify gets the hash of the data as it is now, and says so)."""
    if not info.is_main:
        return
    now = content_hash(spec)
    if "content_hash" not in meta:
        _write_json(folder / "meta.json", {**meta, "content_hash": now})
        print(f"rpp.teacher_cache: {folder} was built without --verify: recorded the content hash of the data as it "
              "is now; later --verify runs compare against it")  # fmt: skip
    elif meta["content_hash"] != now:
        raise UserError(f"--verify: the files of --data differ from those {folder} was built from (same names, sizes "
                        "and modification times, other bytes): rebuild the cache in another --output")  # fmt: skip
    else:
        print(f"rpp.teacher_cache: --verify: the data's bytes match the cache {folder}")


def planned_meta(cfg: CacheConfig, mcfg, spec: data.DataSpec) -> dict:
    """What meta.json records for this build (before the shard counts of a new webdataset cache)."""
    meta = {
        "k": min(cfg.topk, len(spec.classnames)), "classes": len(spec.classnames), "fingerprint": fingerprint(spec),
        "teacher": mcfg.teacher, "teacher_pretrained": mcfg.teacher_pretrained, "temperature": mcfg.temperature,
        # Random (test) teachers differ by seed; resuming a partial cache with another would mix two teachers.
        "seed": None if mcfg.teacher_pretrained else cfg.seed,
    }  # fmt: skip
    if spec.source is not None:
        meta.update(n=len(spec.source), chunk=cfg.chunk)
    if cfg.augmented:
        views = training_views(cfg.seed, cfg.views, cfg.shots, cfg.shots_seed, mcfg)
        meta.update(augmented={**views, "epochs": cfg.epochs})
        meta["n"] = len(few_shot_subset(spec, cfg.shots, cfg.shots_seed)) * cfg.epochs * cfg.views
    return meta


def check_existing(folder: Path, meta: dict) -> dict:
    """The existing cache's meta when it was built with `meta`'s settings, else a UserError naming what differs."""
    old = read_meta(folder)
    changed = sorted(key for key in meta if old.get(key) != meta[key])
    if changed:
        what = ", ".join("images or class names" if key == "fingerprint" else key for key in changed)
        raise UserError(f"{folder} holds a cache with different {what}: use another --output")
    return old


def build(cfg: CacheConfig, method, spec: data.DataSpec, info: distributed.DistInfo) -> int:
    """Fill the cache; returns the number of units (chunks or shards) this rank wrote."""
    folder = Path(cfg.output)
    meta = planned_meta(cfg, method.cfg, spec)
    k = meta["k"]
    if info.is_main:  # before any rank writes: what a kill during an earlier _write_json left behind
        for tmp in folder.glob(".*.json.tmp*") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
    if (folder / "meta.json").is_file():  # every rank checks, so none waits at the barrier for a refused build
        old = check_existing(folder, meta)
        if cfg.verify:
            _verify(folder, old, spec, info)
    elif info.is_main:
        if spec.shards is not None:  # counted once; the fingerprint (sizes, mtimes) guards them afterwards
            counts = data.shard_sample_counts(spec.shards)
            meta.update(n=sum(counts), shards=[os.path.basename(s) for s in spec.shards], counts=counts)
        if cfg.verify:
            meta["content_hash"] = content_hash(spec)
        checkpoint.make_output_dir(folder)
        try:
            np.lib.format.open_memmap(folder / "indices.npy", "w+", np.int32, (meta["n"], k)).flush()
            np.lib.format.open_memmap(folder / "probs.npy", "w+", np.float16, (meta["n"], k)).flush()
        except OSError as e:
            raise UserError(f"cannot create the teacher cache arrays in {folder}: {e.strerror or e}") from None
        _write_json(folder / "meta.json", meta)  # last: its presence means the arrays exist
    distributed.barrier()
    meta = read_meta(folder)
    indices, probs = load_arrays(folder, meta, mode="r+")
    units, name = _units(meta)
    done = _done_units(folder, units)
    mine = [u for u in range(units) if u % info.world == info.rank and u not in done]
    if cfg.max_chunks is not None:
        mine = mine[: cfg.max_chunks]
    if spec.shards is not None:
        offsets = np.cumsum(meta["counts"]) - np.asarray(meta["counts"])
        shards = _ShardBatches([(u, spec.shards[u], int(offsets[u])) for u in mine], method.preprocess_val,
                               cfg.batch_size)  # fmt: skip
        batches = DataLoader(shards, batch_size=None, num_workers=min(cfg.num_workers, len(mine)))
    elif cfg.augmented:
        subset = few_shot_subset(spec, cfg.shots, cfg.shots_seed)
        batches = _augmented_batches(spec, method.preprocess_train, mine, cfg, subset)
    else:
        batches = _chunk_batches(spec, method.preprocess_val, mine, cfg)
    marker = folder / f"progress-{info.rank}.json"
    bar = tqdm(total=units, initial=len(done), desc=f"teacher cache ({name})", disable=not info.is_main)
    for images, rows, unit, finished in batches:
        if not finished:
            top_idx, top_probs = method.teacher_topk(images, k)
            indices[rows.numpy()] = top_idx.cpu().numpy().astype(np.int32)
            probs[rows.numpy()] = top_probs.float().cpu().numpy().astype(np.float16)
            continue
        indices.flush()
        probs.flush()
        done.add(unit)
        _write_json(marker, {"done": sorted(done)})
        bar.update(1)
    bar.close()
    return len(mine)


def main(argv: list[str] | None = None) -> int:
    return distributed.cli_main("rpp.teacher_cache", run, argv)


def run(argv: list[str] | None = None) -> int:
    from rpp.method import MethodConfig, RPPMethod, register_tiny_models

    cfg, mcfg = parse([CacheConfig, MethodConfig], argv, prog="python -m rpp.teacher_cache",
                      description=__doc__.split("\n\n")[0], tool="rpp.teacher_cache",
                      recipe_from="rpp.train")  # fmt: skip
    if cfg.topk is None:
        if mcfg.kd_topk is None:
            raise UserError("--topk: a cache stores a top-k; give --topk (or --kd-topk) when --kd-topk is none")
        cfg.topk = mcfg.kd_topk
    for name in ("topk", "chunk", "batch_size", "epochs", "views"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.shots is not None and cfg.shots <= 0:
        raise UserError(f"--shots must be positive or none, got {cfg.shots}")
    if mcfg.teacher is None:
        raise UserError("--teacher is required to build a teacher cache")
    mcfg.validate()
    checkpoint.trust_torchscript(cfg.trust_torchscript)
    register_tiny_models()
    info = distributed.init()
    spec = data.resolve(cfg.data, cfg.data_format, cfg.classnames, cfg.seed)
    if cfg.augmented and spec.source is None:
        raise UserError("--augmented needs map-style data (image folders, imagenet21k, builtin), not webdataset")
    if (Path(cfg.output) / "meta.json").is_file():  # refuse another cache's or a torn folder before the teacher
        old = check_existing(Path(cfg.output), planned_meta(cfg, mcfg, spec))
        load_arrays(Path(cfg.output), old)
        _done_units(Path(cfg.output), _units(old)[0])
    torch.manual_seed(cfg.seed)
    method = RPPMethod(mcfg, spec.classnames, info.device)
    wrote = build(cfg, method, spec, info)
    distributed.barrier()
    if info.is_main:
        meta = read_meta(Path(cfg.output))
        units, name = _units(meta)
        left = units - len(_done_units(Path(cfg.output), units))
        state = "complete" if left == 0 else f"{left} {name} left (run again to continue)"
        print(f"rpp.teacher_cache: {cfg.output}: {meta['n']} images, top-{meta['k']}; wrote {wrote} {name} on "
              f"rank 0; {state}; config {json.dumps(asdict(cfg))}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
