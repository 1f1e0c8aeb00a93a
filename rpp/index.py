"""A compact image index for map-style datasets at ImageNet-21K scale (13.2M images): `python -m rpp.index DATA
--output INDEX`, then train with `--data INDEX`.

An index is a folder of arrays, never one Python object per image:
  INDEX/names.npy          uint8 [bytes]   the relative paths of all images (file-system encoding), concatenated
  INDEX/offsets.npy        int64 [N + 1]   image i's path is names[offsets[i]:offsets[i + 1]]
  INDEX/labels.npy         int32 [N]       class positions into meta["classes"]
  INDEX/class_mtimes.npy   int64 [C]       modification times (ns) of the class folders (tree indices): the staleness
                                           check on load (adding, removing or renaming an image changes them)
  INDEX/meta.json          format, version, layout, root (absolute), classes (folder names / synsets / list labels),
                           n, fingerprint, source ("tree" or "filelist", with the list file's size and mtime)
Every rank and every data worker memory-maps the arrays (`np.load(mmap_mode="r")`): the pages are the page cache's,
shared by all processes of a node, and reading them touches no reference counts, so forked DataLoader workers never
copy them (the copy-on-read of Python lists, pytorch/pytorch#13246). At 13.2M images of `nXXXXXXXX/nXXXXXXXX_N.JPEG`
that is about 30 + 8 + 4 = 42 bytes per image.

Sources:
  a folder tree     imagefolder (`root/<class>/**/<image>`, labels follow the sorted class folders) or imagenet21k
                    (`root/nXXXXXXXX/<image>`, or `root/train/nXXXXXXXX/`), walked once with os.scandir;
  a file list       `relative/path.JPEG<TAB>label` per line (a space also separates when a line has no tab), paths
                    relative to `--root` (default: the list's folder); labels are class ids (0, 1, ...: class names
                    then come from --classnames in id order) or class names such as synsets (sorted, then numbered).
                    Parsed with vectorised numpy, so a 13.2M-line list needs no per-line Python work.

Fingerprint (checked by teacher caches): sha256 of the layout, the class list, the relative paths (so a moved tree
still matches), the labels and, for trees, every image's size and modification time (from the walk's stat calls);
for file lists, the list's content. It is computed while building and stored, so checking it later costs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate, islice
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rpp.errors import UserError

__all__ = [
    "ImageIndex", "build_index", "cached_index", "index_layout", "is_index", "load_index", "parse_file_list",
    "scan_tree",
]  # fmt: skip

FORMAT = "rpp.image_index"
VERSION = 1
LAYOUTS = ("imagefolder", "imagenet21k")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
SYNSET = re.compile(r"^n\d{8}$")
MAX_LABEL_BYTES = 256
MAX_CLASS_IDS = 1 << 24  # class ids of a file list: a larger id is a mistake, not 16M+ classes


class ImageIndex:
    """N images as arrays: `path(i)`, `labels[i]`, `load(i)`; the interface of rpp.data's map-style sources.

    names: uint8 [bytes] concatenated relative paths; offsets: int64 [N + 1]; labels: int32 [N] positions into
    ``classes`` (the class folders / synsets / list labels, in label order). Equivalent plain-Python form::

        samples = [(os.path.join(root, bytes(names[offsets[i]:offsets[i + 1]]).decode()), int(labels[i]))
                   for i in range(N)]
    """

    def __init__(
        self,
        root: str,
        layout: str,
        classes: list[str],
        names: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        fingerprint: str,
        *,
        source: dict | None = None,
        class_mtimes: np.ndarray | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if offsets.ndim != 1 or len(offsets) != len(labels) + 1:
            raise ValueError(f"offsets must be [N + 1] = [{len(labels) + 1}], got shape {tuple(offsets.shape)}")
        self.root, self.layout, self.classes = str(root), layout, list(classes)
        self.names, self.offsets, self.labels = names, offsets, labels
        self.fingerprint = fingerprint
        self.source = source or {"kind": "arrays"}
        self.class_mtimes = class_mtimes

    @classmethod
    def from_arrays(cls, root: str, layout: str, classes: list[str], names, offsets, labels, **kw) -> ImageIndex:
        """An index over given arrays (names uint8, offsets int64 [N + 1], labels int32 [N]); fingerprint of them."""
        names = np.ascontiguousarray(names, dtype=np.uint8)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        h = _content_hash(layout, classes, names, offsets, labels)
        return cls(root, layout, classes, names, offsets, labels, h.hexdigest()[:16], **kw)

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, i: int) -> str:
        return os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1]].tobytes())

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpath(i))

    def describe(self, i: int) -> str:
        return self.path(i)

    def load(self, i: int) -> Image.Image:
        with Image.open(self.path(i)) as img:
            return img.convert("RGB")

    @property
    def nbytes(self) -> int:
        """Bytes of the per-image arrays (names + offsets + labels)."""
        return self.names.nbytes + self.offsets.nbytes + self.labels.nbytes

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically (a temporary folder renamed into place); returns its path."""
        folder = Path(folder)
        if folder.exists() and not is_index(folder) and (not folder.is_dir() or any(folder.iterdir())):
            raise UserError(f"index output {folder} exists and is not an rpp index: choose another --output")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name in ("names", "offsets", "labels"):
                np.save(tmp / f"{name}.npy", getattr(self, name))
            if self.class_mtimes is not None:
                np.save(tmp / "class_mtimes.npy", self.class_mtimes)
            meta = {
                "format": FORMAT, "version": VERSION, "layout": self.layout, "root": self.root, "n": len(self),
                "classes": self.classes, "fingerprint": self.fingerprint, "source": self.source,
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = folder.with_name(f".{folder.name}.old{os.getpid()}")
            if folder.exists():
                os.replace(folder, old)  # processes that mapped the old files keep reading them
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write index {folder}: {e}") from e
        return folder

    def stale_reason(self, progress: bool = False) -> str | None:
        """Why the files may no longer match (cheap: the class folders' or the list file's stat), or None. With
        `progress`, a bar over the class folders when their stats take long (network storage)."""
        if not os.path.isdir(self.root):
            return f"its image root {self.root} does not exist"
        if self.source.get("kind") == "filelist":
            try:
                st = os.stat(self.source["path"])
            except OSError:
                return f"its file list {self.source['path']} is gone"
            if [st.st_size, st.st_mtime_ns] != [self.source["size"], self.source["mtime_ns"]]:
                return f"its file list {self.source['path']} changed"
        elif self.class_mtimes is not None:
            folders = tqdm(self.classes, desc="checking the index's class folders", unit="class", delay=2,
                           disable=not progress, dynamic_ncols=True)  # fmt: skip
            try:
                mtimes = [os.stat(os.path.join(self.root, c)).st_mtime_ns for c in folders]
            except OSError as e:
                return f"a class folder is gone ({e.filename})"
            finally:
                folders.close()
            if not np.array_equal(np.asarray(mtimes, dtype=np.int64), self.class_mtimes):
                return "images were added, removed or renamed in its class folders"
            if _class_folders(Path(self.root), self.layout) != self.classes:
                return "its class folders changed"
        return None


def is_index(path: str | os.PathLike) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_index(folder: str | os.PathLike, *, check: bool = True, progress: bool = False) -> ImageIndex:
    """Memory-map an index folder; with `check`, a stale index (see `ImageIndex.stale_reason`) is a UserError."""
    folder = Path(folder)
    if not is_index(folder):
        raise UserError(f"{folder} is not an image index (build one with python -m rpp.index DATA --output {folder})")
    meta = json.loads((folder / "meta.json").read_text())
    if meta["version"] != VERSION:
        raise UserError(f"index {folder} has version {meta['version']}, this code reads {VERSION}: rebuild it")
    arrays = {}
    for name, dtype in (("names", np.uint8), ("offsets", np.int64), ("labels", np.int32)):
        arr = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if arr.dtype != dtype or arr.ndim != 1:
            raise UserError(f"index {folder}: {name}.npy holds {arr.dtype} {arr.shape}, expected 1-d {np.dtype(dtype)}")
        arrays[name] = arr
    if len(arrays["offsets"]) != meta["n"] + 1 or len(arrays["labels"]) != meta["n"]:
        raise UserError(f"index {folder}: arrays do not hold the {meta['n']} images meta.json lists: rebuild it")
    mtimes = folder / "class_mtimes.npy"
    class_mtimes = np.load(mtimes, allow_pickle=False) if mtimes.is_file() else None
    index = ImageIndex(
        meta["root"], meta["layout"], meta["classes"], arrays["names"], arrays["offsets"], arrays["labels"],
        meta["fingerprint"], source=meta["source"], class_mtimes=class_mtimes,
    )  # fmt: skip
    if check:
        reason = index.stale_reason(progress)
        if reason is not None:
            raise UserError(f"index {folder} is out of date: {reason}; rebuild it with python -m rpp.index")
    return index


# ---------------------------------------------------------------------------------------------------------------- trees


def _class_folders(base: Path, layout: str) -> list[str]:
    with os.scandir(base) as it:
        dirs = [e.name for e in it if e.is_dir()]
    if layout == "imagenet21k":
        return sorted(d for d in dirs if SYNSET.match(d))
    return sorted(d for d in dirs if not d.startswith("."))


def tree_base(root: str | os.PathLike, layout: str) -> Path:
    """The folder holding the class folders: `root`, or `root/train` for an imagenet21k tree that has one."""
    base = Path(root)
    if not base.exists():
        raise UserError(f"data path not found: {root}")
    if not base.is_dir():
        raise UserError(f"data path is not a directory: {root}")
    if layout == "imagenet21k" and not _class_folders(base, layout) and (base / "train").is_dir():
        base = base / "train"
    return base


def _is_image(name: str) -> bool:
    return name.endswith(IMAGE_EXTENSIONS) or name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(folder: str, prefix: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of every image under `folder` (recursive, following links), sorted by path.
    A file whose stat fails (a broken link) keeps size -1: loading it later is a skipped corrupt image."""
    out = []
    stack = [(folder, prefix)]
    while stack:
        directory, rel = stack.pop()
        with os.scandir(directory) as it:
            for e in it:
                if e.is_dir():
                    stack.append((e.path, f"{rel}{e.name}/"))
                elif _is_image(e.name):
                    try:
                        st = e.stat()
                        out.append((rel + e.name, st.st_size, st.st_mtime_ns))
                    except OSError:
                        out.append((rel + e.name, -1, 0))
    out.sort()
    return out


def _scan_class(folder: str, prefix: str) -> tuple[int, list[bytes], array]:
    """(folder mtime ns, encoded relative paths sorted, [size, mtime] per image) of one class folder."""
    mtime = os.stat(folder).st_mtime_ns
    entries = _scan_folder(folder, prefix)
    return mtime, [os.fsencode(rel) for rel, _, _ in entries], array("q", [v for e in entries for v in e[1:]])


def _in_order(pool: ThreadPoolExecutor, fn, items: list[tuple], window: int):
    """fn(*item) for each item, run `window` at a time on `pool`, yielded in item order (bounded memory)."""
    pending: deque = deque()
    rest = iter(items)
    for item in islice(rest, window):
        pending.append(pool.submit(fn, *item))
    while pending:
        result = pending.popleft().result()
        item = next(rest, None)
        if item is not None:
            pending.append(pool.submit(fn, *item))
        yield result


def scan_tree(
    root: str | os.PathLike, layout: str = "imagefolder", *, progress: bool = True, threads: int = 8
) -> ImageIndex:
    """Walk a class-folder tree once (os.scandir; one stat per image for the fingerprint) into an index.

    Class folders are listed by `threads` threads (directory reads and stats release the GIL: on network storage the
    walk is latency-bound) and consumed in order; per-class lists are transient, the index itself is three arrays.
    Images of a class are ordered by relative path, classes by folder name (labels = class positions), as
    torchvision's ImageFolder orders them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    base = tree_base(root, layout)
    classes = _class_folders(base, layout)
    if not classes:
        what = "synset folders (nXXXXXXXX)" if layout == "imagenet21k" else "class folders"
        raise UserError(f"no {what} in {root}: expected {root}/<class>/<image files>")
    names = bytearray()
    offsets = array("q", [0])
    labels = array("i")
    mtimes = array("q")
    h = hashlib.sha256(json.dumps([layout, classes]).encode())
    bar = tqdm(total=len(classes), desc=f"indexing {root}", unit="class", disable=not progress, dynamic_ncols=True,
               delay=1)  # fmt: skip
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            work = [(str(base / c), f"{c}/") for c in classes]
            for label, (mtime, rels, stats) in enumerate(_in_order(pool, _scan_class, work, 4 * max(1, threads))):
                mtimes.append(mtime)
                start = len(names)
                names += b"".join(rels)
                offsets.extend(start + end for end in accumulate(map(len, rels)))
                labels.extend([label] * len(rels))
                h.update(b"\0".join(rels) + b"\1" + stats.tobytes())
                h.update(label.to_bytes(4, "little") + len(rels).to_bytes(8, "little"))
                bar.update(1)
                if progress and label % 256 == 0:
                    bar.set_postfix(images=len(labels), refresh=False)
    except OSError as e:
        raise UserError(f"cannot read {e.filename or root} while indexing: {e.strerror or e}") from None
    finally:
        bar.close()
    if not labels:
        raise UserError(f"no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
    return ImageIndex(
        str(base.resolve()), layout, classes, np.frombuffer(names, dtype=np.uint8), np.frombuffer(offsets, np.int64),
        np.frombuffer(labels, dtype=np.int32), h.hexdigest()[:16], source={"kind": "tree"},
        class_mtimes=np.frombuffer(mtimes, dtype=np.int64),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------- file lists


def _content_hash(layout: str, classes: list[str], names, offsets, labels) -> hashlib._Hash:
    h = hashlib.sha256(json.dumps([layout, classes]).encode())
    for arr in (names, offsets, labels):
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        for start in range(0, len(view), 1 << 26):  # 64 MiB at a time: no full copy of a memory-mapped array
            h.update(view[start : start + (1 << 26)])
    return h


def _line_error(path: str, buf: np.ndarray, starts: np.ndarray, line_numbers: np.ndarray, bad: np.ndarray, why: str):
    i = int(np.flatnonzero(bad)[0])
    text = buf[starts[i] : starts[i] + 120].tobytes().split(b"\n")[0].decode("utf-8", "replace")
    raise UserError(f"{path}:{int(line_numbers[i])}: {why}: {text!r} (expected 'relative/path.JPEG<TAB>label')")


def _last_before(positions: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per line: the last of the sorted `positions` before the line's end, or -1."""
    k = np.searchsorted(positions, ends) - 1
    return np.where(k >= 0, positions[np.maximum(k, 0)] if len(positions) else -1, -1)


def parse_file_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None, *, progress: bool = False
) -> ImageIndex:
    """An index from a file list: `relative/path<TAB>label` per line (see the module docstring), in file order.

    Blank lines are skipped; CRLF line ends and surrounding blanks are accepted. Labels that are all integers are
    class ids; otherwise each distinct label is a class name. A line without a separator, path or label, or with an
    absolute path, is a UserError naming the line. With `progress`, a bar over the parse's stages (about 40 s at
    13.2M lines on a loaded 2-core machine).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"file list not found: {path}")
    root = os.path.dirname(os.path.abspath(path)) if root is None else str(root)
    if not os.path.isdir(root):
        raise UserError(f"--root {root} is not a directory")
    st = os.stat(path)
    bar = tqdm(total=6, desc=f"parsing {path}", unit="stage", disable=not progress, dynamic_ncols=True, delay=1)
    try:
        return _parse(path, root, st, bar)
    finally:
        bar.close()


def _parse(path: str, root: str, st: os.stat_result, bar: tqdm) -> ImageIndex:
    buf = np.fromfile(path, dtype=np.uint8)
    bar.update(1)
    nl = np.flatnonzero(buf == ord("\n"))
    ends = np.append(nl, len(buf)) if len(buf) and buf[-1] != ord("\n") else nl
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    line_numbers = np.arange(1, len(ends) + 1)
    del nl
    blank = np.zeros(256, dtype=bool)
    blank[[ord(" "), ord("\t"), ord("\r")]] = True
    starts, ends = _strip(buf, blank, starts, ends)
    keep = ends > starts
    starts, ends, line_numbers = starts[keep], ends[keep], line_numbers[keep]
    if not len(starts):
        raise UserError(f"file list {path} lists no images")
    bar.update(1)
    sep = _last_before(np.flatnonzero(buf == ord("\t")), ends)
    no_tab = sep < starts
    if no_tab.any():  # a space separates the lines without a tab
        sep[no_tab] = _last_before(np.flatnonzero(buf == ord(" ")), ends[no_tab])
    _check(path, buf, starts, line_numbers, sep < starts, "no path and label separated by a tab")
    _check(path, buf, starts, line_numbers, buf[starts] == ord("/"), "absolute path (paths are relative to the root)")
    starts, path_ends = _strip(buf, blank, starts, sep)
    label_starts, ends = _strip(buf, blank, sep + 1, ends)
    lengths = ends - label_starts
    _check(path, buf, starts, line_numbers, lengths > MAX_LABEL_BYTES, f"label longer than {MAX_LABEL_BYTES} bytes")
    bar.update(1)

    # Paths: every byte in [start, path end) of some line, in order: a mask of alternating runs (gap, path, gap, ...).
    runs = np.empty(2 * len(starts) + 1, dtype=np.int64)
    runs[0:-1:2] = starts - np.concatenate([[0], path_ends[:-1]])
    runs[1::2] = path_ends - starts
    runs[-1] = len(buf) - path_ends[-1]
    names = buf[np.repeat(np.arange(len(runs)) % 2 == 1, runs)]
    offsets = np.concatenate([[0], np.cumsum(path_ends - starts)]).astype(np.int64)
    bar.update(1)

    # Labels: one column per label byte (at most MAX_LABEL_BYTES), zero past each label's end.
    width = int(lengths.max())
    field = np.zeros((len(starts), width), dtype=np.uint8)
    for k in range(width):
        has = k < lengths
        field[has, k] = buf[label_starts[has] + k]
    digits = (field >= ord("0")) & (field <= ord("9"))
    within = np.arange(width) < lengths[:, None]
    if bool((digits | ~within).all()) and width <= 9:
        values = np.zeros(len(starts), dtype=np.int64)
        for k in range(width):
            values = np.where(k < lengths, values * 10 + (field[:, k].astype(np.int64) - ord("0")), values)
        _check(path, buf, starts, line_numbers, values >= MAX_CLASS_IDS, f"class id of {MAX_CLASS_IDS} or more")
        labels = values.astype(np.int32)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    else:
        uniq, inverse = np.unique(field.view(f"S{width}").ravel(), return_inverse=True)
        labels = inverse.astype(np.int32)
        classes = [u.decode("utf-8", "replace") for u in uniq.tolist()]
    bar.update(1)
    layout = "imagenet21k" if all(SYNSET.match(c) for c in classes) else "imagefolder"
    source = {"kind": "filelist", "path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "label_ids": classes == [str(c) for c in range(len(classes))]}  # fmt: skip
    index = ImageIndex.from_arrays(os.path.abspath(root), layout, classes, names, offsets, labels, source=source)
    bar.update(1)
    return index


def _strip(buf: np.ndarray, blank: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields [starts, ends) without leading and trailing blanks (spaces, tabs, '\\r'); a blank field becomes empty."""
    copied = False
    while True:
        nonempty = starts < ends
        lead = nonempty & blank[buf[np.minimum(starts, len(buf) - 1)]]
        trail = nonempty & blank[buf[np.maximum(ends - 1, 0)]]
        if not (lead.any() or trail.any()):
            return starts, ends
        if not copied:
            starts, ends, copied = starts.copy(), ends.copy(), True
        trail &= ~(lead & (ends - starts == 1))  # a one-blank field: drop that blank once
        starts += lead
        ends -= trail


def _check(path, buf, starts, line_numbers, bad: np.ndarray, why: str) -> None:
    if bad.any():
        _line_error(path, buf, starts, line_numbers, bad, why)


# ---------------------------------------------------------------------------------------------------------- builders


def build_index(
    data: str | os.PathLike,
    *,
    layout: str | None = None,
    root: str | None = None,
    progress: bool = True,
    threads: int = 8,
) -> ImageIndex:
    """An index of `data`: a file list (a regular file) or a folder tree (`layout`: imagefolder or imagenet21k; none =
    imagenet21k when it holds synset folders, directly or under train/)."""
    p = Path(data)
    if p.is_file():
        return parse_file_list(p, root, progress=progress)
    if root is not None:
        raise UserError("--root applies to file lists only; a folder tree is its own root")
    if layout is None:
        layout = "imagenet21k" if _class_folders(tree_base(p, "imagenet21k"), "imagenet21k") else "imagefolder"
    return scan_tree(p, layout, progress=progress, threads=threads)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def cached_index(
    data: str | os.PathLike,
    layout: str | None,
    cache_dir: str | os.PathLike,
    *,
    progress: bool = True,
    wait_s: float = 6 * 3600.0,
    log=print,
) -> ImageIndex:
    """The index of `data` (a tree of `layout`, or a file list) from `cache_dir` when it is there and current, else
    built and saved there.

    Under torch.distributed, rank 0 builds and saves while the other ranks wait for the saved index (a file poll,
    not a collective: a long walk cannot hit a collective's timeout) and then map it: one walk per job."""
    p = Path(data)
    kind = "filelist" if p.is_file() else layout
    where = p.resolve() if p.is_file() else tree_base(p, layout).resolve()
    key = hashlib.sha256(f"{kind}:{where}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"index-{kind}-{key}"
    if is_index(folder):
        index = load_index(folder, check=False)
        if index.stale_reason(progress) is None:
            return index
    if _rank() == 0:
        t0 = time.perf_counter()
        index = build_index(p, layout=layout, progress=progress)
        index.save(folder)
        log(f"rpp.index: indexed {len(index):,} images of {data} in {time.perf_counter() - t0:.1f} s -> {folder}")
        return load_index(folder, check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if is_index(folder):
            index = load_index(folder, check=False)
            if index.stale_reason() is None:
                return index
        time.sleep(1.0)
    raise UserError(f"waited {wait_s:.0f} s for rank 0 to write the index {folder}")


def index_layout(path: str | os.PathLike) -> str | None:
    """The layout of the index folder `path`, or None when it is not an index."""
    return json.loads((Path(path) / "meta.json").read_text())["layout"] if is_index(path) else None


# --------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rpp.index",
        description="Build a compact image index (arrays, memory-mapped by every rank and worker) for --data INDEX.",
    )
    parser.add_argument("data", help="a class-folder tree, or a file list ('relative/path.JPEG<TAB>label' per line)")
    parser.add_argument("--output", required=True, help="index folder to write (replaced atomically if it is one)")
    parser.add_argument("--layout", choices=LAYOUTS, help="tree layout; none = imagenet21k if synset folders, else "
                        "imagefolder (file lists: from their labels)")  # fmt: skip
    parser.add_argument("--root", help="file lists: the folder their paths are relative to (default: the list's)")
    parser.add_argument("--threads", type=int, default=8, help="trees: threads listing class folders (more help on "
                        "network storage, where each directory read and stat waits on the server)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        t0 = time.perf_counter()
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        index = build_index(args.data, layout=args.layout, root=args.root, threads=args.threads)
        built = time.perf_counter() - t0
        index.save(args.output)
    except UserError as e:
        print(f"rpp.index: error: {e}", file=sys.stderr)
        return 2
    n = len(index)
    print(f"rpp.index: {n:,} images, {len(index.classes):,} classes ({index.layout}), {index.nbytes / n:.1f} bytes "
          f"per image, fingerprint {index.fingerprint}, built in {built:.1f} s -> {args.output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
