"""Readers for reproducing POMP/CoOp: ImageNet-21K-P (semantic-tree names), ImageNet-1K variants with CLIP's names,
ImageNet-V2 with numerically sorted class folders."""

import pytest
import torch
from PIL import Image

from rpp import data
from rpp.datasets import clip_imagenet_classnames, imagenet_synsets, read_semantic_tree
from rpp.errors import UserError


def _tree(root, folders, per_class=1):
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(root / folder / f"img{i}.png")


def _labels_by_folder(spec):
    source = spec.source
    return {source.relpath(i).split("/")[0]: int(source.labels[i]) for i in range(len(source))}


def test_imagenet21k_p_names_from_the_semantic_tree(tmp_path):
    root = tmp_path / "imagenet21k_resized"
    _tree(root / "imagenet21k_train", ["n00000003", "n00000001", "n00000002"])
    _tree(root / "imagenet21k_val", ["n00000003", "n00000001", "n00000002"])
    synsets = ["n00000001", "n00000002", "n00000003", "n00000009"]
    descriptions = ["entity", "physical thing", "crane", "unused"]
    torch.save({"class_list": synsets, "class_description": dict(zip(synsets, descriptions, strict=True)),
                "class_tree_list": [[0], [0, 1], [0, 1, 2], [0, 3]]}, root / "imagenet21k_miil_tree.pth")  # fmt: skip
    spec = data.resolve(str(root), "imagenet21k-p", None, eval_data=str(root / "imagenet21k_val"))
    assert spec.classnames == ["entity", "physical thing", "crane"]
    assert _labels_by_folder(spec) == {"n00000001": 0, "n00000002": 1, "n00000003": 2}
    assert len(spec.eval_source) == 3
    # A list-form description, aligned with class_list, reads the same.
    torch.save({"class_list": synsets, "class_description": descriptions}, tmp_path / "tree.pth")
    assert read_semantic_tree(tmp_path / "tree.pth")["n00000003"] == "crane"

    (root / "imagenet21k_miil_tree.pth").unlink()
    with pytest.raises(UserError, match="imagenet21k_miil_tree.pth"):
        data.resolve(str(root), "imagenet21k-p", None)
    names = tmp_path / "names.txt"
    names.write_text("n00000001\tthing\nn00000002\tobject\nn00000003\tbird\n")
    assert data.resolve(str(root), "imagenet21k-p", str(names)).classnames == ["thing", "object", "bird"]
    (tmp_path / "bad.pth").write_bytes(b"not a tree")
    with pytest.raises(UserError, match="cannot read semantic tree"):
        read_semantic_tree(tmp_path / "bad.pth")


def test_imagenet_v2_folders_sort_numerically(tmp_path):
    folders = [str(i) for i in range(12)]  # "10" and "11" sort before "2" as strings
    _tree(tmp_path / "v2", folders)
    spec = data.resolve(str(tmp_path / "v2"), "imagenet-v2", None)
    assert _labels_by_folder(spec) == {str(i): i for i in range(12)}
    assert spec.classnames == clip_imagenet_classnames()[:12]
    _tree(tmp_path / "bad", ["0", "cat"])
    with pytest.raises(UserError, match="numbers 0..999"):
        data.resolve(str(tmp_path / "bad"), "imagenet-v2", None)


def test_imagenet1k_variants_use_clips_curated_names(tmp_path):
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets == sorted(synsets)
    names = clip_imagenet_classnames()
    assert names[0] == "tench" and names[1] == "goldfish"
    chosen = [synsets[999], synsets[0], synsets[417]]  # an ImageNet-A/R-like subset
    _tree(tmp_path / "a", chosen)
    spec = data.resolve(str(tmp_path / "a"), "imagenet1k", None)
    assert spec.classnames == [names[0], names[417], names[999]]
    _tree(tmp_path / "odd", ["n99999999"])
    with pytest.raises(UserError, match="not ImageNet-1K synsets"):
        data.resolve(str(tmp_path / "odd"), "imagenet1k", None)


def test_imagenet_v2_layout_is_recognised(tmp_path):
    for i in range(1000):
        (tmp_path / "v2" / str(i)).mkdir(parents=True)
    assert data.infer_format(str(tmp_path / "v2")) == "imagenet-v2"
    (tmp_path / "v2" / "1000").mkdir()
    assert data.infer_format(str(tmp_path / "v2")) == "imagefolder"


def test_imagenet1k_layouts_are_recognised(tmp_path):
    for synset in imagenet_synsets()[:3]:
        (tmp_path / "a" / synset).mkdir(parents=True)
    assert data.infer_format(str(tmp_path / "a")) == "imagenet1k"
    (tmp_path / "a" / "n00000001").mkdir()  # a synset beyond ImageNet-1K: the 21K tree
    assert data.infer_format(str(tmp_path / "a")) == "imagenet21k"
