"""rpp.teacher_cache: resumable build (partial then complete equals one full build), use from rpp.train, on
map-style data and on webdataset shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rpp import data, teacher_cache, train
from rpp.errors import UserError
from rpp.method import MethodConfig, RPPMethod, register_tiny_models

ARGS = ["--topk", "5", "--chunk", "64", "--batch-size", "64", "--num-workers", "0"]
SHARD_SIZES = (5, 7, 4)
CORRUPT = (1, 2)  # (shard, position) of a sample whose jpg does not decode


def test_resumable_build_matches_a_full_build_and_trains(tmp_path, capsys):
    partial, full = tmp_path / "partial", tmp_path / "full"
    assert teacher_cache.main([*ARGS, "--output", str(partial), "--max-chunks", "2"]) == 0
    assert "4 chunks left" in capsys.readouterr().out  # 384 images / 64 = 6 chunks
    assert json.loads((partial / "progress-0.json").read_text())["done"] == [0, 1]
    spec = data.resolve(None, None, None)
    with pytest.raises(UserError, match="incomplete"):
        teacher_cache.TeacherCache.open(str(partial), spec, temperature=1.0)
    assert teacher_cache.main([*ARGS, "--output", str(partial)]) == 0
    assert "complete" in capsys.readouterr().out
    assert teacher_cache.main([*ARGS, "--output", str(full)]) == 0
    for name in ("indices.npy", "probs.npy"):
        assert np.array_equal(np.load(partial / name), np.load(full / name))
    probs = np.load(full / "probs.npy").astype(np.float32)
    assert probs.shape == (384, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-2)
    assert teacher_cache.main([*ARGS, "--output", str(full), "--topk", "3"]) == 2  # different cache in that folder
    capsys.readouterr()
    assert teacher_cache.main([*ARGS, "--output", str(partial), "--seed", "1"]) == 2  # another random teacher
    assert "different images or class names, seed" in capsys.readouterr().err  # builtin images follow --seed

    out = tmp_path / "run"
    small = ["--batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--log-every", "1"]
    assert train.main([*small, "--teacher-cache", str(full), "--output", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert train.main([*small, "--teacher-cache", str(full), "--shots", "2", "--output", str(out / "fs")]) == 0
    assert train.main([*small, "--teacher-cache", str(tmp_path / "none"), "--output", str(tmp_path / "r2")]) == 2
    capsys.readouterr()
    assert (
        train.main([*small, "--teacher-cache", str(full), "--temperature", "2", "--output", str(tmp_path / "r3")]) == 2
    )
    assert "holds probabilities at temperature 1.0" in capsys.readouterr().err


def _shards(folder, sizes=SHARD_SIZES) -> list[str]:
    """Shards of 48x48 JPEGs with `cls` labels 0..2, each opening with a directory member (which is no sample)."""
    folder.mkdir(exist_ok=True)
    paths = []
    for s, size in enumerate(sizes):
        path = folder / f"train-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            directory = tarfile.TarInfo("samples")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for i in range(size):
                buf = io.BytesIO()
                Image.new("RGB", (48, 48), (40 * s + 20 * i, 255 - 30 * i, 60 * s)).save(buf, format="JPEG")
                jpg = b"not a jpeg" if (s, i) == CORRUPT else buf.getvalue()
                for ext, payload in (("jpg", jpg), ("cls", str((s + i) % 3).encode())):
                    info = tarfile.TarInfo(f"samples/{s}_{i:03d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def _teacher(classnames) -> RPPMethod:
    """The random tiny teacher rpp.teacher_cache builds with --seed 0."""
    register_tiny_models()
    torch.manual_seed(0)
    return RPPMethod(MethodConfig(), classnames, torch.device("cpu"))


@pytest.fixture
def wds(tmp_path):
    """(shard folder, class names file, common rpp.teacher_cache arguments)."""
    _shards(tmp_path / "wds")
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    args = ["--data", str(tmp_path / "wds"), "--classnames", str(tmp_path / "names.txt"), "--topk", "2",
            "--batch-size", "3", "--num-workers", "0"]  # fmt: skip
    return tmp_path / "wds", tmp_path / "names.txt", args


def test_webdataset_cache_resumes_per_shard_and_matches_the_teacher(tmp_path, capsys, wds):
    folder, names, args = wds
    partial, full = tmp_path / "partial", tmp_path / "full"
    with pytest.warns(UserWarning, match="corrupt webdataset sample samples/1_002"):
        assert teacher_cache.main([*args, "--output", str(partial), "--max-chunks", "2"]) == 0
    assert "16 images, top-2; wrote 2 shards on rank 0; 1 shards left" in capsys.readouterr().out
    assert json.loads((partial / "progress-0.json").read_text())["done"] == [0, 1]
    meta = json.loads((partial / "meta.json").read_text())
    assert meta["shards"] == ["train-0000.tar", "train-0001.tar", "train-0002.tar"] and meta["counts"] == [5, 7, 4]
    spec = data.resolve(str(folder), None, str(names))
    with pytest.raises(UserError, match=r"incomplete \(1 shards left\)"):
        teacher_cache.TeacherCache.open(str(partial), spec, temperature=1.0)
    assert teacher_cache.main([*args, "--output", str(partial)]) == 0
    assert "wrote 1 shards on rank 0; complete" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt sample, read again by a worker process
        assert teacher_cache.main([*args, "--output", str(full), "--num-workers", "2"]) == 0
    for name in ("indices.npy", "probs.npy"):
        assert np.array_equal(np.load(partial / name), np.load(full / name))

    # Row offset(shard) + position holds the teacher's top-k of that sample; the corrupt sample's row stays zero.
    method, cache = _teacher(spec.classnames), teacher_cache.TeacherCache.open(str(full), spec, temperature=1.0)
    offsets = np.cumsum((0, *SHARD_SIZES))
    for s, shard in enumerate(spec.shards):
        images = [method.preprocess_val(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
                  for position, _, sample in data.shard_samples(shard) if (s, position) != CORRUPT]  # fmt: skip
        top_idx, top_probs = method.teacher_topk(torch.stack(images), 2)
        rows = [offsets[s] + i for i in range(SHARD_SIZES[s]) if (s, i) != CORRUPT]
        assert np.array_equal(cache.indices[rows], top_idx.numpy())
        assert np.allclose(cache.probs[rows].astype(np.float32), top_probs.numpy(), atol=1e-3)
    corrupt_row = offsets[CORRUPT[0]] + CORRUPT[1]
    assert not cache.indices[corrupt_row].any() and not cache.probs[corrupt_row].any()

    # The training stream's sample ids look up the rows of the images it yields.
    stream = data.WebDatasetStream(spec.shards, method.preprocess_val, batch_size=5, buffer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one pass = 16 raw samples; the corrupt one is stood in for by the next readable one (skipped = 1 there)
        views, _, ids, skipped = next(iter(DataLoader(stream, batch_size=16)))
    assert sorted(set(cache.rows(ids).tolist())) == [r for r in range(16) if r != corrupt_row]
    assert skipped.sum() == 1
    top_idx, top_probs = method.teacher_topk(views[:, 0], 2)
    cached_idx, cached_probs = cache.lookup(ids)
    assert torch.equal(cached_idx, top_idx) and torch.allclose(cached_probs, top_probs, atol=1e-3)


def test_torchrun_build_and_training_from_a_webdataset_cache(tmp_path, monkeypatch, wds):
    folder, names, args = wds
    cache, single = tmp_path / "cache", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = subprocess.run([*torchrun, "rpp.teacher_cache", *args, "--output", str(cache), "--max-chunks", "1"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 1 shards on rank 0; 1 shards left" in proc.stdout
    assert [json.loads((cache / f"progress-{r}.json").read_text())["done"] for r in (0, 1)] == [[0], [1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert teacher_cache.main([*args, "--output", str(cache)]) == 0  # finished by one process
        assert teacher_cache.main([*args, "--output", str(single)]) == 0
    for name in ("indices.npy", "probs.npy"):
        assert np.array_equal(np.load(cache / name), np.load(single / name))

    small = ["--data", str(folder), "--classnames", str(names), "--batch-size", "4", "--num-workers", "0",
             "--max-steps", "2", "--log-every", "1", "--teacher-cache", str(cache)]  # fmt: skip
    looked_up = []
    lookup = teacher_cache.TeacherCache.lookup

    def spy(self, ids, *epoch_and_views):
        looked_up.append(ids)
        return lookup(self, ids, *epoch_and_views)

    monkeypatch.setattr(teacher_cache.TeacherCache, "lookup", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train.main([*small, "--views", "2", "--output", str(tmp_path / "run")]) == 0
    opened = teacher_cache.TeacherCache.open(str(cache), data.resolve(str(folder), None, str(names)), temperature=1.0)
    rows = np.concatenate([opened.rows(ids) for ids in looked_up])
    assert len(rows) == 8 and len(set(rows.tolist())) == 8 and rows.min() >= 0 and rows.max() < 16
    proc = subprocess.run([*torchrun, "rpp.train", *small, "--output", str(tmp_path / "ddp")], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["kd"]) for r in records)


def test_a_changed_shard_set_or_class_list_is_refused(tmp_path, capsys, wds):
    folder, names, args = wds
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert teacher_cache.main([*args, "--output", str(cache), "--max-chunks", "1"]) == 0
    capsys.readouterr()
    run = ["--classnames", str(names), "--batch-size", "4", "--num-workers", "0", "--max-steps", "1",
           "--teacher-cache", str(cache)]  # fmt: skip
    two = str(folder / "train-{0000..0001}.tar")
    assert teacher_cache.main([*args, "--data", two, "--output", str(cache)]) == 2  # a shard fewer
    expected = f"{cache} holds a cache with different images or class names: use another --output"
    assert capsys.readouterr().err.strip() == f"rpp.teacher_cache: error: {expected}"
    assert train.main([*run, "--data", two, "--output", str(tmp_path / "r1")]) == 2
    assert "was built for different images or classes than --data" in capsys.readouterr().err
    os.utime(folder / "train-0002.tar", ns=(0, 0))  # a shard rewritten in place
    assert teacher_cache.main([*args, "--output", str(cache)]) == 2
    assert "different images or class names" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text("red\ngreen\nteal\n")
    assert teacher_cache.main([*args, "--classnames", str(tmp_path / "other.txt"), "--output", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different images or class names" in err[0]
