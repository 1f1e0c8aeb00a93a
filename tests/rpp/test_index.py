"""rpp.index: trees and file lists into compact arrays, save/load, staleness, the CLI, and a full-scale ImageNet-21K
rehearsal (13.2M synthetic entries over 21,841 classes; only the images a run samples exist on disk)."""

import gc
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rpp import data, distributed
from rpp import index as ix
from rpp.errors import UserError

N_FULL, C_FULL = 13_200_000, 21_841  # ImageNet-21K winter21
REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, color=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format="PNG")


def _tree(root: Path) -> Path:
    for rel in ("n00000002/b.JPEG", "n00000002/sub/a.png", "n00000001/z.jpg", "n00000001/a.JPEG"):
        _png(root / rel)
    (root / "n00000001" / "notes.txt").write_text("not an image")
    (root / "n00000003").mkdir()  # an empty class keeps its label
    (root / "README").mkdir()  # not a synset folder
    return root


def test_tree_index_orders_like_imagefolder_and_fingerprints_stats(tmp_path):
    root = _tree(tmp_path / "in21k")
    index = ix.build_index(root, progress=False)
    assert index.layout == "imagenet21k" and index.classes == ["n00000001", "n00000002", "n00000003"]
    assert [index.relpath(i) for i in range(len(index))] == [
        "n00000001/a.JPEG", "n00000001/z.jpg", "n00000002/b.JPEG", "n00000002/sub/a.png",
    ]  # fmt: skip
    assert index.labels.dtype == np.int32 and index.labels.tolist() == [0, 0, 1, 1]
    assert index.path(3) == str(root.resolve() / "n00000002/sub/a.png") and index.load(3).size == (12, 10)
    assert index.nbytes == len(index.names) + 8 * 5 + 4 * 4

    moved = tmp_path / "moved"
    os.rename(root, moved)  # path-normalised: the same files elsewhere keep the fingerprint
    assert ix.build_index(moved, progress=False).fingerprint == index.fingerprint
    os.utime(moved / "n00000001/a.JPEG", ns=(1, 1))  # same paths, another mtime: another fingerprint
    assert ix.build_index(moved, progress=False).fingerprint != index.fingerprint
    folder = ix.scan_tree(moved, "imagefolder", progress=False)  # every non-hidden folder is a class
    assert folder.classes == ["README", "n00000001", "n00000002", "n00000003"]
    assert folder.labels.tolist() == [1, 1, 2, 2]


def test_save_load_memory_maps_and_detects_stale_trees(tmp_path):
    root = _tree(tmp_path / "in21k")
    index = ix.build_index(root, progress=False)
    out = index.save(tmp_path / "idx")
    loaded = ix.load_index(out)
    assert isinstance(loaded.names, np.memmap) and isinstance(loaded.labels, np.memmap)
    assert loaded.fingerprint == index.fingerprint and loaded.path(2) == index.path(2)
    assert np.array_equal(loaded.offsets, index.offsets) and ix.index_layout(out) == "imagenet21k"
    _png(root / "n00000002" / "new.JPEG")
    with pytest.raises(UserError, match="out of date: images were added, removed or renamed"):
        ix.load_index(out)
    index = ix.build_index(root, progress=False)
    index.save(out)  # replaces an index in place
    assert len(ix.load_index(out)) == 5
    (root / "n00000003").rmdir()
    with pytest.raises(UserError, match=r"out of date: a class folder is gone \(.*n00000003\)"):
        ix.load_index(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="is not an rpp index"):
        index.save(tmp_path / "other")
    with pytest.raises(UserError, match="not an image index"):
        ix.load_index(tmp_path / "other")


def test_file_list_formats_and_errors(tmp_path):
    (tmp_path / "list.txt").write_bytes(
        b"n00000001/a.JPEG\tn00000001\r\n\n  n00000002/d e.JPEG\t n00000002  \nn00000001/b.JPEG n00000001\n"
    )
    index = ix.parse_file_list(tmp_path / "list.txt")
    assert index.layout == "imagenet21k" and index.classes == ["n00000001", "n00000002"]
    assert [index.relpath(i) for i in range(3)] == ["n00000001/a.JPEG", "n00000002/d e.JPEG", "n00000001/b.JPEG"]
    assert index.labels.tolist() == [0, 1, 0] and index.root == str(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "ids.txt").write_text("x/1.jpg\t3\nx/2.jpg\t0\nx/3.jpg\t007")  # no final newline
    ids = ix.parse_file_list(tmp_path / "ids.txt", root=tmp_path / "x")
    assert ids.labels.tolist() == [3, 0, 7] and ids.classes == [str(c) for c in range(8)] and ids.source["label_ids"]
    assert ids.fingerprint == ix.parse_file_list(tmp_path / "ids.txt", root=tmp_path / "x").fingerprint
    saved = ids.save(tmp_path / "ids.index")
    assert ix.load_index(saved).labels.tolist() == [3, 0, 7]
    (tmp_path / "ids.txt").write_text("x/1.jpg\t3\n")
    with pytest.raises(UserError, match="out of date: its file list .*ids.txt changed"):
        ix.load_index(saved)

    for text, why in [
        ("ok.jpg\t1\nnolabel\n", r":2: no path and label separated by a tab: 'nolabel'"),
        ("ok.jpg\t1\n/abs/path.jpg\t2\n", r":2: absolute path"),
        ("ok.jpg\t1\n\tonly-label\n", r":2: no path and label separated by a tab: .only-label."),
        ("\n\n", r"lists no images"),
        ("ok.jpg\t1\nbig.jpg\t99999999\n", r":2: class id of 16777216 or more"),
    ]:
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(UserError, match=why):
            ix.parse_file_list(tmp_path / "bad.txt")


@pytest.mark.filterwarnings(r"ignore:1 class\(es\) of --data .* hold no images")  # the tree's empty synset
def test_data_resolve_reads_indices_and_caches_tree_indices(tmp_path):
    root = _tree(tmp_path / "in21k")
    (root / "words.txt").write_text("n00000001\tfish\nn00000002\tbird\nn00000003\tcrane\n")
    index_dir = ix.build_index(root, progress=False).save(tmp_path / "idx")
    assert data.infer_format(str(index_dir)) == "imagenet21k"
    spec = data.resolve(str(index_dir), None, None)
    assert spec.classnames == ["fish", "bird", "crane"] and isinstance(spec.source, ix.ImageIndex)
    views, label, position, skipped = data.ViewsDataset(spec.source, lambda im: torch.zeros(3, 2, 2))[2]
    assert (label, position, skipped) == (1, 2, 0) and isinstance(label, int)

    cache = tmp_path / "cache"
    first = data.resolve(str(root), None, None, index_cache=str(cache))
    assert first.fingerprint() == spec.fingerprint()  # same files, same classes: a teacher cache built on either fits
    saved = list(cache.glob("index-imagenet21k-*"))
    assert len(saved) == 1 and isinstance(data.resolve(str(root), None, None, index_cache=str(cache)).source.names,
                                          np.memmap)  # fmt: skip
    _png(root / "n00000003" / "new.png")  # stale: rebuilt in place
    assert len(data.resolve(str(root), None, None, index_cache=str(cache)).source) == 5

    (tmp_path / "ids.txt").write_text("n00000001/a.JPEG\t0\n")
    with pytest.raises(UserError, match="labels its classes by number: pass --classnames"):
        data.resolve(str(tmp_path / "ids.txt"), "imagefolder", None)
    (tmp_path / "names.txt").write_text("tench\n")
    assert data.resolve(str(tmp_path / "ids.txt"), "imagefolder", str(tmp_path / "names.txt")).classnames == ["tench"]


def test_few_shot_and_sampler_match_the_list_versions():
    labels = np.random.default_rng(0).integers(0, 7, size=500).astype(np.int32)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(i)
    import random

    rng = random.Random(data._seed("few-shot", 3))
    expected = sorted(i for c in sorted(by_class) for i in (by_class[c] if len(by_class[c]) <= 4
                                                            else rng.sample(by_class[c], 4)))  # fmt: skip
    assert data.few_shot(labels, 4, seed=3) == expected == data.few_shot(labels.tolist(), 4, seed=3)

    sampler = torch.utils.data.distributed.DistributedSampler(range(50), num_replicas=3, rank=2, seed=5)
    sampler.set_epoch(4)
    assert data.EpochBatchSampler(50, 4, rank=2, world=3, seed=5).order(4).tolist() == list(sampler)


def test_cli_builds_an_index_and_reports_errors_in_one_line(tmp_path):
    root = _tree(tmp_path / "in21k")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "rpp.index", str(root), "--output", str(tmp_path / "idx")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.search(r"rpp.index: 4 images, 3 classes \(imagenet21k\), [\d.]+ bytes per image", run.stdout)
    assert len(ix.load_index(tmp_path / "idx")) == 4
    bad = subprocess.run([sys.executable, "-m", "rpp.index", str(tmp_path / "nope"), "--output", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"rpp.index: error: data path not found: {tmp_path / 'nope'}"
    ]


# ------------------------------------------------------------------------------------------------ full-scale rehearsal


def _synsets(c: int) -> list[str]:
    return [f"n{1440764 + 37 * k:08d}" for k in range(c)]


def synthetic_index(root: Path, n: int = N_FULL, c: int = C_FULL) -> ix.ImageIndex:
    """n entries `nXXXXXXXX/nXXXXXXXX_NNNNN.JPEG` (30 bytes, ImageNet's naming) spread evenly over c synsets, built
    with array gathers (no per-image Python work)."""
    labels = (np.arange(n, dtype=np.int64) * c // n).astype(np.int32)
    prefix = np.frombuffer("".join(f"{s}/{s}_" for s in _synsets(c)).encode(), np.uint8).reshape(c, 20)
    digits = np.frombuffer("".join(f"{i:05d}" for i in range(100_000)).encode(), np.uint8).reshape(100_000, 5)
    rows = np.empty((n, 30), dtype=np.uint8)
    rows[:, :20] = prefix[labels]
    rows[:, 20:25] = digits[np.arange(n) % 100_000]
    rows[:, 25:] = np.frombuffer(b".JPEG", np.uint8)
    offsets = np.arange(n + 1, dtype=np.int64) * 30
    return ix.ImageIndex.from_arrays(str(root), "imagenet21k", _synsets(c), rows.reshape(-1), offsets, labels)


@pytest.fixture(scope="module")
def full_index(tmp_path_factory):
    """(saved index folder, image root, measurements) of a 13.2M-entry synthetic ImageNet-21K index."""
    base = tmp_path_factory.mktemp("in21k_full")
    root = base / "images"
    root.mkdir()
    (root / "words.txt").write_text("".join(f"{s}\tclass {k}\n" for k, s in enumerate(_synsets(C_FULL))))
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    index = synthetic_index(root)
    build_s = time.perf_counter() - t0
    retained = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    t0 = time.perf_counter()
    folder = index.save(base / "index")
    save_s = time.perf_counter() - t0
    stats = {"build_s": build_s, "save_s": save_s, "retained_bytes_per_image": retained / N_FULL,
             "array_bytes_per_image": index.nbytes / N_FULL, "fingerprint": index.fingerprint}  # fmt: skip
    del index
    gc.collect()
    return folder, root, stats


def _private_dirty_kb() -> dict[str, int]:
    """This process's resident, proportional and private-dirty (copied or written) memory in kB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private_dirty": fields["Private_Dirty"]}


class _RandomReads(Dataset):
    """Batch [-1] reports the worker's memory; other batches read each position's path and label."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, keys: list[int]):
        if keys == [-1]:
            return [_private_dirty_kb()]
        return [sum(len(self.source.describe(i)) + int(self.source.labels[i]) for i in keys)]


def _worker_growth_mb(source, reads: int, seed: int = 0) -> dict[str, float]:
    """Memory growth of one forked DataLoader worker over `reads` random (path, label) reads of `source`."""
    rng = np.random.default_rng(seed)
    batches = [[-1]] + [rng.integers(0, len(source), 1000).tolist() for _ in range(reads // 1000)] + [[-1]]
    loader = DataLoader(_RandomReads(source), batch_sampler=batches, num_workers=1, collate_fn=lambda b: b[0],
                        multiprocessing_context="fork")  # fmt: skip
    out = list(loader)
    before, after = out[0], out[-1]
    return {k: (after[k] - before[k]) / 1024 for k in before}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/self/smaps_rollup")
def test_full_scale_index_memory_time_and_worker_growth(full_index, capsys):
    folder, root, stats = full_index
    assert stats["array_bytes_per_image"] <= 64 and stats["retained_bytes_per_image"] <= 64

    tracemalloc.start()
    t0 = time.perf_counter()
    index = ix.load_index(folder)
    load_s = time.perf_counter() - t0
    mapped_heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(index) == N_FULL and len(index.classes) == C_FULL and index.fingerprint == stats["fingerprint"]
    assert mapped_heap < 200 * C_FULL  # memory-mapped: the heap holds the class list only, nothing per image
    assert load_s < 5 and index.relpath(N_FULL - 1) == f"{_synsets(C_FULL)[-1]}/{_synsets(C_FULL)[-1]}_99999.JPEG"

    growth = _worker_growth_mb(index, 100_000)
    assert growth["private_dirty"] <= 50, growth
    # The meter sees copy-on-read: the same reads of 300k Python (path, label) tuples copy most of their pages.
    listed = data.ImageFiles([(index.path(i), int(index.labels[i])) for i in range(0, 300_000)])
    baseline = _worker_growth_mb(listed, 100_000)
    assert baseline["private_dirty"] > 20 and baseline["private_dirty"] > 4 * growth["private_dirty"], baseline
    with capsys.disabled():
        print(f"\nfull-scale index: {json.dumps({**stats, 'load_s': load_s, 'mapped_heap_bytes': mapped_heap})}\n"
              f"worker growth over 100k random reads (MB): index {growth}, 300k-tuple list {baseline}")  # fmt: skip


def test_full_scale_sampling_fingerprint_and_tables(full_index, tmp_path, capsys, one_thread):
    from types import SimpleNamespace

    from rpp.losses import sample_classes
    from rpp.method import MethodConfig
    from rpp.teacher import encode_class_names
    from rpp.teacher_cache import CacheConfig, TeacherCache, build
    from rpp.teacher_cache import fingerprint as cache_fingerprint

    folder, root, _ = full_index
    times = {}
    t0 = time.perf_counter()
    spec = data.resolve(str(folder), None, None)
    times["resolve_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fingerprint = spec.fingerprint()
    times["fingerprint_s"] = time.perf_counter() - t0
    assert len(spec.classnames) == C_FULL and times["fingerprint_s"] < 0.5

    t0 = time.perf_counter()
    sampler = data.EpochBatchSampler(N_FULL, 256, rank=7, world=8, seed=0)
    first = next(iter(sampler))
    times["sampler_first_batch_s"] = time.perf_counter() - t0
    assert len(first) == 256 and sampler.batches_per_epoch == N_FULL // 8 // 256
    t0 = time.perf_counter()
    shots = data.few_shot(spec.source.labels, 16, seed=0)
    times["few_shot_s"] = time.perf_counter() - t0
    assert len(shots) == 16 * C_FULL and np.bincount(spec.source.labels[shots], minlength=C_FULL).min() == 16
    sample = sample_classes(torch.tensor([C_FULL - 1, 0]), C_FULL, 1000, torch.Generator().manual_seed(0))
    assert len(sample.classes) == 1000 and int(sample.classes.max()) < C_FULL

    # The teacher's class-embedding table at full size: 21,841 classes x 7 templates, batched, through a stand-in text
    # tower (a real one takes minutes on CPU: the one-time cost the 60 s launch target excludes).
    class Tower(torch.nn.Module):
        def encode_text(self, tokens):
            return torch.nn.functional.one_hot(tokens % 64, 64).float() + 0.1

    names = spec.classnames
    tokenizer = lambda texts: torch.tensor([len(t) for t in texts])  # noqa: E731
    t0 = time.perf_counter()
    table = encode_class_names(Tower(), tokenizer, names, tuple(f"{{}} {i}" for i in range(7)), torch.device("cpu"))
    times["class_table_s"] = time.perf_counter() - t0
    assert table.shape == (C_FULL, 64) and torch.allclose(table.norm(dim=-1), torch.ones(C_FULL))

    # The offline teacher cache laid out for 13.2M rows (sparse files) and looked up through the index's sample ids.
    method = SimpleNamespace(cfg=MethodConfig(teacher_pretrained="teacher.pt"), preprocess_val=None)
    t0 = time.perf_counter()
    build(CacheConfig(output=str(tmp_path / "tc"), topk=32, max_chunks=0), method, spec, distributed.DistInfo())
    times["teacher_cache_layout_s"] = time.perf_counter() - t0
    meta = json.loads((tmp_path / "tc" / "meta.json").read_text())
    assert meta["n"] == N_FULL and meta["fingerprint"] == cache_fingerprint(spec)
    with pytest.raises(UserError, match="incomplete"):  # the fingerprint matched; no chunk is written yet
        TeacherCache.open(str(tmp_path / "tc"), spec, temperature=1.0)
    ids, probs = TeacherCache(tmp_path / "tc", meta).lookup(torch.tensor([0, N_FULL - 1, 6_543_210]))
    assert ids.shape == probs.shape == (3, meta["k"])
    assert fingerprint == spec.fingerprint()
    with capsys.disabled():
        print(f"\nfull-scale startup pieces (s): {json.dumps({k: round(v, 3) for k, v in times.items()})}")


def test_full_scale_launch_to_first_step(full_index, tmp_path, capsys):
    """rpp.train on the 13.2M-entry index: launch -> first optimizer step within 60 s (no teacher class embeddings:
    --teacher none). The images the first batches sample are the only ones written."""
    folder, root, _ = full_index
    index = ix.load_index(folder)
    batch = 8
    order = data.EpochBatchSampler(N_FULL, batch, rank=0, world=1, seed=0).order(0)
    for i in order[: 4 * batch].tolist():
        _png(Path(index.path(i)), (i % 255, 40, 90))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rpp.train", "--data", str(folder), "--output", str(out), "--teacher", "none",
           "--kd-weight", "0", "--allow-random-weights", "--max-steps", "1", "--batch-size", str(batch),
           "--num-workers", "1", "--no-tensorboard", "--classes-per-step", "1000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, first_step = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if first_step is None and "first step done" in line:
            first_step = time.perf_counter() - t0
    assert proc.wait(timeout=600) == 0, "\n".join(lines[-30:])
    assert first_step is not None and first_step <= 60, "\n".join(lines)
    startup = [line[line.index("rpp.train: startup") :] for line in lines if "rpp.train: startup" in line]
    assert any("data index and class names took" in line for line in startup)
    with capsys.disabled():
        print(f"\nlaunch -> first step at {N_FULL:,} images: {first_step:.1f} s\n" + "\n".join(startup))
