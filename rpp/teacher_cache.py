"""Offline teacher soft labels: `python -m rpp.teacher_cache --data PATH --teacher ViT-L-14 --teacher-pretrained W
--output DIR`, then train with `--teacher-cache DIR`.

The cache holds, for every image of a map-style dataset (imagefolder, imagenet21k, builtin), the teacher's top-k
class ids and probabilities (softmax at --temperature over all classes, truncated to k and renormalised):
  DIR/indices.npy   int32   [N, k]   numpy memmaps (np.load(..., mmap_mode="r"))
  DIR/probs.npy     float16 [N, k]
  DIR/meta.json     n, k, classes, teacher, temperature, seed (random teachers), dataset fingerprint
  DIR/progress-<rank>.json   chunks of `--chunk` images already written (the progress markers)
It is built resumably: chunks are written, flushed, then recorded in the rank's progress marker (atomic rename), so
a killed run restarts at the first chunk it had not recorded. Under torchrun the chunks are shared out over ranks.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rpp import data, distributed
from rpp.config import DATA_FORMATS, parse
from rpp.errors import UserError

CACHE_FORMATS = tuple(f for f in DATA_FORMATS if f != "webdataset")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _done_chunks(folder: Path) -> set[int]:
    done: set[int] = set()
    for marker in folder.glob("progress-*.json"):
        done.update(json.loads(marker.read_text())["done"])
    return done


class TeacherCache:
    """Read side, used by rpp.train: `lookup(indices [B]) -> (class ids [B, k] int64, probs [B, k] fp32)`."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.indices = np.load(folder / "indices.npy", mmap_mode="r")
        self.probs = np.load(folder / "probs.npy", mmap_mode="r")

    @classmethod
    def open(cls, folder: str, spec: data.DataSpec) -> TeacherCache:
        path = Path(folder)
        if spec.source is None:
            raise UserError("--teacher-cache needs a map-style dataset (imagefolder, imagenet21k, builtin)")
        if not (path / "meta.json").is_file():
            raise UserError(f"--teacher-cache: no meta.json in {folder} (build it with python -m rpp.teacher_cache)")
        meta = json.loads((path / "meta.json").read_text())
        if meta["fingerprint"] != spec.fingerprint():
            raise UserError(f"--teacher-cache {folder} was built for different images or classes than --data")
        missing = math.ceil(meta["n"] / meta["chunk"]) - len(_done_chunks(path))
        if missing:
            raise UserError(f"--teacher-cache {folder} is incomplete ({missing} chunks left): rerun rpp.teacher_cache")
        return cls(path, meta)

    def lookup(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.numpy()
        return torch.from_numpy(self.indices[idx].astype(np.int64)), torch.from_numpy(
            self.probs[idx].astype(np.float32)
        )


@dataclass
class CacheConfig:
    data: str | None = field(default=None, metadata={"help": "dataset path; none = the built-in shapes dataset"})
    data_format: str | None = field(
        default=None, metadata={"help": "data layout; none = infer from --data", "choices": CACHE_FORMATS}
    )
    classnames: str | None = field(default=None, metadata={"help": "class names file, as for rpp.train"})
    output: str = field(default="runs/teacher-cache", metadata={"help": "cache directory (created or resumed)"})
    topk: int = field(default=32, metadata={"help": "teacher classes kept per image"})
    chunk: int = field(default=4096, metadata={"help": "images per progress marker update"})
    batch_size: int = field(default=128, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=4, metadata={"help": "data-loading worker processes per rank"})
    seed: int = field(default=0, metadata={"help": "seed for random teacher weights (tiny test models only)"})
    max_chunks: int | None = field(
        default=None, metadata={"help": "stop after this many chunks (a time-boxed partial build); none = all"}
    )


def build(cfg: CacheConfig, method, spec: data.DataSpec, info: distributed.DistInfo) -> int:
    """Fill the cache; returns the number of chunks this rank wrote."""
    folder = Path(cfg.output)
    n, k = len(spec.source), min(cfg.topk, len(spec.classnames))
    meta = {
        "n": n, "k": k, "chunk": cfg.chunk, "classes": len(spec.classnames), "fingerprint": spec.fingerprint(),
        "teacher": method.cfg.teacher, "teacher_pretrained": method.cfg.teacher_pretrained,
        "temperature": method.cfg.temperature,
        # Random (test) teachers differ by seed; resuming a partial cache with another would mix two teachers.
        "seed": None if method.cfg.teacher_pretrained else cfg.seed,
    }  # fmt: skip
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "meta.json").is_file():
            old = json.loads((folder / "meta.json").read_text())
            if old != meta:
                changed = sorted(key for key in meta if old.get(key) != meta[key])
                raise UserError(f"{folder} holds a cache with different {', '.join(changed)}: use another --output")
        else:
            np.lib.format.open_memmap(folder / "indices.npy", "w+", np.int32, (n, k)).flush()
            np.lib.format.open_memmap(folder / "probs.npy", "w+", np.float16, (n, k)).flush()
            _write_json(folder / "meta.json", meta)  # last: its presence means the arrays exist
    distributed.barrier()
    indices = np.load(folder / "indices.npy", mmap_mode="r+")
    probs = np.load(folder / "probs.npy", mmap_mode="r+")
    done = _done_chunks(folder)
    chunks = math.ceil(n / cfg.chunk)
    mine = [c for c in range(chunks) if c % info.world == info.rank and c not in done]
    if cfg.max_chunks is not None:
        mine = mine[: cfg.max_chunks]
    marker = folder / f"progress-{info.rank}.json"
    bar = tqdm(total=chunks, initial=len(done), desc="teacher cache", disable=not info.is_main)
    for c in mine:
        positions = list(range(c * cfg.chunk, min(n, (c + 1) * cfg.chunk)))
        dataset = data.ViewsDataset(spec.source, method.preprocess_val, indices=positions)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            collate_fn=data.collate_single_view)  # fmt: skip
        for images, _, idx, _ in loader:
            top_idx, top_probs = method.teacher_topk(images, k)
            # idx is the image actually loaded: a corrupt file's row stays empty, training never asks for it
            indices[idx.numpy()] = top_idx.cpu().numpy().astype(np.int32)
            probs[idx.numpy()] = top_probs.float().cpu().numpy().astype(np.float16)
        indices.flush()
        probs.flush()
        done.add(c)
        _write_json(marker, {"done": sorted(done)})
        bar.update(1)
    bar.close()
    return len(mine)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(f"rpp.teacher_cache: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def run(argv: list[str] | None = None) -> int:
    from rpp.method import MethodConfig, RPPMethod, register_tiny_models

    cfg, mcfg = parse([CacheConfig, MethodConfig], argv, prog="python -m rpp.teacher_cache",
                      description=__doc__.splitlines()[0])  # fmt: skip
    for name in ("topk", "chunk", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if mcfg.teacher is None:
        raise UserError("--teacher is required to build a teacher cache")
    register_tiny_models()
    info = distributed.init()
    fmt = cfg.data_format or data.infer_format(cfg.data)
    if fmt == "webdataset":
        raise UserError("rpp.teacher_cache needs a map-style dataset (imagefolder, imagenet21k, builtin)")
    spec = data.resolve(cfg.data, fmt, cfg.classnames, cfg.seed)
    torch.manual_seed(cfg.seed)
    method = RPPMethod(mcfg, spec.classnames, info.device)
    wrote = build(cfg, method, spec, info)
    distributed.barrier()
    if info.is_main:
        left = math.ceil(len(spec.source) / cfg.chunk) - len(_done_chunks(Path(cfg.output)))
        state = "complete" if left == 0 else f"{left} chunks left (run again to continue)"
        print(f"rpp.teacher_cache: {cfg.output}: {len(spec.source)} images, top-{min(cfg.topk, len(spec.classnames))}"
              f"; wrote {wrote} chunk(s) on rank 0; {state}; config {json.dumps(asdict(cfg))}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
