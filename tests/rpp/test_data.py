"""rpp.data: every format on tiny generated files, few-shot determinism, corrupt images, resume positions."""

import io
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from rpp import data
from rpp.errors import UserError

TO_TENSOR = T.Compose([T.Resize((16, 16)), T.ToTensor()])
AUGMENT = T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def _image(color, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            (root / name / f"{i}.{ext}").write_bytes(_image((40 * c, 10 * i, 100), fmt))
    return root


def _shards(root: Path, n_shards: int, per_shard: int, corrupt: int | None = None) -> list[str]:
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                jpg = b"not a jpeg" if corrupt == s * per_shard + i else _image((s * 30, i * 10, 0), "JPEG")
                for ext, payload in (("jpg", jpg), ("cls", str((s * per_shard + i) % 3).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def test_builtin_is_deterministic_and_labelled():
    a, b = data.BuiltinShapes("train"), data.BuiltinShapes("train")
    assert len(data.BuiltinShapes.classnames) == 12 and "red circle" in data.BuiltinShapes.classnames
    assert a.load(5).tobytes() == b.load(5).tobytes()
    assert a.load(5).tobytes() != data.BuiltinShapes("val").load(5).tobytes()
    assert len(a) == 12 * data.BUILTIN_SPLITS["train"] and a.labels[13] == 1


def test_image_folder_labels_and_classnames(tmp_path):
    root = _folder(tmp_path / "imgs", ["dog_house", "cat"])
    source, names = data.image_folder(str(root))
    assert names == ["cat", "dog house"] and len(source) == 6
    assert source.labels.tolist() == [0, 0, 0, 1, 1, 1] and source.load(1).size == (20, 20)
    (tmp_path / "names.txt").write_text("a cat\na dog house\n")
    assert data.image_folder(str(root), str(tmp_path / "names.txt"))[1] == ["a cat", "a dog house"]
    (tmp_path / "bad.txt").write_text("one\n")
    with pytest.raises(UserError, match="1 names but"):
        data.image_folder(str(root), str(tmp_path / "bad.txt"))


def test_imagenet21k_tree_with_description_file_and_plain_names(tmp_path):
    root = _folder(tmp_path / "in21k", ["n00000002", "n00000001"], per_class=2)
    (root / "words.txt").write_text("n00000001\tfish, Tinca tinca\nn00000002\tbird\nn09999999\tunused\n")
    source, names = data.imagenet21k_folder(str(root))
    assert names == ["fish", "bird"] and source.labels.tolist() == [0, 0, 1, 1]
    assert data.infer_format(str(root)) == "imagenet21k"
    (tmp_path / "plain.txt").write_text("first\nsecond\n")
    assert data.imagenet21k_folder(str(root), str(tmp_path / "plain.txt"))[1] == ["first", "second"]
    (root / "words.txt").unlink()
    with pytest.raises(UserError, match="class-description file"):
        data.imagenet21k_folder(str(root))


def test_duplicate_class_names_warn(tmp_path):
    root = _folder(tmp_path / "imgs", ["a", "b", "c"], per_class=1)
    (tmp_path / "names.txt").write_text("crane\ncrane\nheron\n")
    with pytest.warns(UserWarning, match=r"1 class name\(s\) occur more than once \('crane' x2\)"):
        spec = data.resolve(str(root), "imagefolder", str(tmp_path / "names.txt"))
    assert spec.classnames == ["crane", "crane", "heron"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.resolve(str(root), "imagefolder", None)


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        data.resolve(str(tmp_path / "nope"), "imagefolder", None)
    with pytest.raises(UserError, match="shard not found"):
        data.resolve(str(tmp_path / "x-{000..001}.tar"), "webdataset", None)
    with pytest.raises(UserError, match="class names file not found"):
        data.read_classnames(tmp_path / "none.txt")


def test_few_shot_subset_is_deterministic():
    labels = [i % 5 for i in range(100)]
    a, b, c = data.few_shot(labels, 3, seed=1), data.few_shot(labels, 3, seed=1), data.few_shot(labels, 3, seed=2)
    assert a == b and a != c and len(a) == 15
    assert sorted(labels[i] for i in a) == sorted(list(range(5)) * 3)
    assert data.few_shot([0, 0, 1], 2, seed=0) == [0, 1, 2]  # a class with fewer images keeps all of them


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "imgs", ["a", "b"], per_class=2)
    (root / "a" / "0.png").write_bytes(b"garbage")
    source, _ = data.image_folder(str(root))
    dataset = data.ViewsDataset(source, TO_TENSOR)
    with pytest.warns(UserWarning, match="corrupt image"):
        views, label, index, skipped = dataset[0]
    assert skipped == 1 and index == 1 and label == 0 and views.shape == (1, 3, 16, 16)
    assert dataset[1][3] == 0
    loader = DataLoader(dataset, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert int(next(iter(loader))[3].sum()) == 1


def test_views_are_seeded_per_epoch_and_index_not_by_worker():
    source = data.BuiltinShapes("val")
    dataset = data.ViewsDataset(source, AUGMENT, views=2, seed=3)
    torch.manual_seed(0)
    a = dataset[(0, 7)][0]
    torch.manual_seed(1)  # the caller's RNG state does not matter
    assert torch.equal(a, dataset[(0, 7)][0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, dataset[(1, 7)][0])


def test_epoch_batch_sampler_resumes_and_splits_ranks():
    full = iter(data.EpochBatchSampler(50, 4, rank=0, world=2, seed=0))
    first = [next(full) for _ in range(9)]  # 25 per rank -> 6 batches per epoch: crosses into epoch 1
    resumed = iter(data.EpochBatchSampler(50, 4, rank=0, world=2, seed=0, start=5))
    assert [next(resumed) for _ in range(4)] == first[5:]
    assert first[6][0][0] == 1 and first[0] != first[6]
    other = iter(data.EpochBatchSampler(50, 4, rank=1, world=2, seed=0))
    rank0 = {p for b in first[:6] for _, p in b}
    rank1 = {p for _ in range(6) for _, p in next(other)}
    assert not rank0 & rank1
    with pytest.raises(UserError, match="too small"):
        data.EpochBatchSampler(3, 4, rank=0, world=1, seed=0)


def test_webdataset_splits_nodes_and_workers_and_resumes(tmp_path):
    shards = _shards(tmp_path, n_shards=4, per_shard=6)
    assert data.expand_shards(str(tmp_path / "shard-{000..003}.tar")) == shards
    assert data.expand_shards(str(tmp_path)) == shards and data.infer_format(str(tmp_path)) == "webdataset"
    assert data.shard_sample_counts(shards) == [6, 6, 6, 6]

    def stream_labels(rank, world, workers, start, n_batches, few_shards=False):
        ds = data.WebDatasetStream(shards[:1] if few_shards else shards, TO_TENSOR, batch_size=2, rank=rank,
                                   world=world, start=start, buffer=4)  # fmt: skip
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        out = []
        for batch, _ in zip(loader, range(n_batches), strict=False):
            out.append(batch[0].flatten(1).sum(1).tolist())
        return out

    # 2 ranks x 2 workers over 4 shards: one pass (24 samples = 6 batches per rank) covers every sample once
    seen = [x for rank in (0, 1) for batch in stream_labels(rank, 2, 2, 0, 6) for x in batch]
    assert len(seen) == 24 and len({round(x, 3) for x in seen}) == 24
    # fewer shards than slots: sample-level split, still disjoint
    seen = [x for rank in (0, 1) for batch in stream_labels(rank, 2, 1, 0, 1, True) for x in batch]
    assert len({round(x, 3) for x in seen}) == 4
    # resuming at batch 3 gives what an uninterrupted stream gives from batch 3
    assert stream_labels(0, 2, 2, 3, 3) == stream_labels(0, 2, 2, 0, 6)[3:]


def test_webdataset_corrupt_sample_is_skipped_and_counted(tmp_path):
    shards = _shards(tmp_path, n_shards=1, per_shard=4, corrupt=0)
    stream = iter(data.WebDatasetStream(shards, TO_TENSOR, batch_size=1, buffer=1))
    with pytest.warns(UserWarning, match="corrupt webdataset sample"):
        items = [next(stream) for _ in range(3)]
    assert [item[3] for item in items] == [1, 0, 0] and items[0][0].shape == (1, 3, 16, 16)


def test_train_loader_every_format(tmp_path):
    folder = _folder(tmp_path / "imgs", ["a", "b", "c"], per_class=4)
    _shards(tmp_path / "wds", 2, 6) if (tmp_path / "wds").mkdir() is None else None
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    specs = [
        data.resolve(None, None, None),
        data.resolve(str(folder), "imagefolder", None),
        data.resolve(str(tmp_path / "wds"), None, str(tmp_path / "names.txt")),
    ]
    assert [s.format for s in specs] == ["builtin", "imagefolder", "webdataset"]
    for spec in specs:
        loader, per_epoch = data.train_loader(spec, AUGMENT, batch_size=4, views=2, seed=0, shots=None, shots_seed=0,
                                              rank=0, world=1, num_workers=0)  # fmt: skip
        views, labels, indices, skipped = next(iter(loader))
        assert views.shape == (4, 2, 3, 16, 16) and labels.shape == (4,) and int(skipped.sum()) == 0
        assert (per_epoch is None) == (spec.format == "webdataset")
    loader, per_epoch = data.train_loader(specs[1], AUGMENT, batch_size=2, views=1, seed=0, shots=2, shots_seed=0,
                                          rank=0, world=1, num_workers=0)  # fmt: skip
    assert per_epoch == 3  # 3 classes x 2 shots / batch 2
    with pytest.raises(UserError, match="--shots needs"):
        data.train_loader(specs[2], AUGMENT, batch_size=2, views=1, seed=0, shots=2, shots_seed=0, rank=0, world=1,
                          num_workers=0)  # fmt: skip
