"""Dataset readers for reproducing POMP/CoOp: ImageNet-21K-P, ImageNet-1K and its variants with CLIP's class names.

``--data-format`` values added to :mod:`rpp.data` (each returns a compact :class:`rpp.index.ImageIndex` and names):

* ``imagenet21k-p``: the processed ImageNet-21K release (Ridnik et al., "ImageNet-21K Pretraining for the Masses",
  winter21: 10,450 classes) as POMP reads it (``datasets/imagenet_21k.py``): ``ROOT/imagenet21k_train/nXXXXXXXX/``
  (``ROOT/imagenet21k_val/`` for evaluation), class names from the semantic-tree file
  ``ROOT/imagenet21k_miil_tree.pth`` (its ``class_description``), labels in sorted synset order. ``--data`` may be
  ROOT or one of the split folders (the tree file is then looked for beside it); ``--classnames`` overrides the names
  (words.txt format or one name per line).
* ``imagenet1k``: synset folders of ImageNet-1K (val), ImageNet-Sketch, ImageNet-A or ImageNet-R, labelled in sorted
  synset order, named with CLIP's curated ImageNet class names (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``,
  the names of the CLIP paper's zero-shot notebook, which CoOp and POMP use), looked up by synset through the standard
  1000-synset order (timm's ``imagenet_synsets.txt``). A/R hold 200 of the 1000 classes: only those are scored.
* ``imagenet-v2``: ImageNet-V2's folders ``0`` ... ``999`` (class ids), sorted numerically (a string sort puts "10"
  before "2" and mis-maps every name list), named with CLIP's curated names.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from rpp import data
from rpp.errors import UserError
from rpp.index import ImageIndex

__all__ = [
    "READERS",
    "clip_imagenet_classnames",
    "imagenet1k_folder",
    "imagenet21k_p_folder",
    "imagenet_synsets",
    "imagenet_v2_folder",
    "read_semantic_tree",
]

SEMANTIC_TREE = "imagenet21k_miil_tree.pth"
IN21K_P_SPLITS = {"train": "imagenet21k_train", "val": "imagenet21k_val"}
_NUMBER = re.compile(r"^\d+$")


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1K synsets in label order (sorted wnids), from timm's package data."""
    try:
        text = resources.files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text()
    except (ModuleNotFoundError, FileNotFoundError) as e:  # timm is a dependency; a broken install only
        raise UserError(f"cannot read timm's ImageNet synset list (timm/data/_info/imagenet_synsets.txt): {e}") from e
    synsets = text.split()
    if len(synsets) != 1000:
        raise UserError(f"timm's imagenet_synsets.txt has {len(synsets)} synsets, expected 1000")
    return synsets


def clip_imagenet_classnames() -> list[str]:
    """CLIP's curated ImageNet-1K class names (1000, label order), as open_clip ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def read_semantic_tree(path: str | Path) -> dict[str, str]:
    """{synset: name} from the ImageNet-21K-P semantic tree file (``imagenet21k_miil_tree.pth``).

    The file is a torch pickle of plain data, read with ``torch.load(weights_only=True)``; ``class_description`` is a
    {synset: name} mapping, or a list aligned with ``class_list``.
    """
    try:
        tree = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or holding code objects: the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read semantic tree {path}: {first}") from None
    description = tree.get("class_description") if isinstance(tree, dict) else None
    if isinstance(description, (list, tuple)) and isinstance(tree.get("class_list"), (list, tuple)):
        if len(description) != len(tree["class_list"]):
            raise UserError(f"semantic tree {path}: class_list and class_description differ in length")
        description = dict(zip(tree["class_list"], description, strict=True))
    if not isinstance(description, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in description.items()
    ):
        raise UserError(f"semantic tree {path} has no class_description mapping synsets to names")
    return description


def imagenet21k_p_folder(
    root: str, classnames_file: str | None = None, *, cache_dir: str | None = None
) -> tuple[ImageIndex, list[str]]:
    """ImageNet-21K-P (winter21 processed), see the module docstring. ``root``: the release folder (its training
    split is read) or a split folder."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"data path not found or not a directory: {root}")
    split = base / IN21K_P_SPLITS["train"] if (base / IN21K_P_SPLITS["train"]).is_dir() else base
    index = data._index(str(split), "imagenet21k", cache_dir)
    if classnames_file is not None:
        return index, data._names_for_folders(index.classes, classnames_file, root, "synset folders")
    tree_path = next((d / SEMANTIC_TREE for d in (base, base.parent) if (d / SEMANTIC_TREE).is_file()), None)
    if tree_path is None:
        raise UserError(
            f"no {SEMANTIC_TREE} in {base} or {base.parent}: ImageNet-21K-P class names come from its semantic tree "
            "(pass --classnames FILE to name the synsets otherwise)"
        )
    names = read_semantic_tree(tree_path)
    missing = [s for s in index.classes if s not in names]
    if missing:
        raise UserError(f"{len(missing)} synset folders of {split} are not in {tree_path}, e.g. {missing[0]}")
    return index, [names[s] for s in index.classes]


def _clip_names(classes: list[str], classnames_file: str | None, root: str) -> list[str]:
    if classnames_file is not None:
        return data._names_for_folders(classes, classnames_file, root, "class folders")
    names, synsets = clip_imagenet_classnames(), imagenet_synsets()
    position = {s: i for i, s in enumerate(synsets)}
    unknown = [c for c in classes if c not in position]
    if unknown:
        raise UserError(f"{len(unknown)} class folders of {root} are not ImageNet-1K synsets, e.g. {unknown[0]!r}")
    return [names[position[c]] for c in classes]


def imagenet1k_folder(
    root: str, classnames_file: str | None = None, *, cache_dir: str | None = None
) -> tuple[ImageIndex, list[str]]:
    """ImageNet-1K / -Sketch / -A / -R synset folders with CLIP's curated names (see the module docstring)."""
    index = data._index(root, "imagenet21k", cache_dir)
    return index, _clip_names(index.classes, classnames_file, root)


def imagenet_v2_folder(
    root: str, classnames_file: str | None = None, *, cache_dir: str | None = None
) -> tuple[ImageIndex, list[str]]:
    """ImageNet-V2 (``ROOT/<class id>/*.jpeg``): folders sorted numerically, CLIP's names by default (or
    ``classnames_file``: one name per line in class-id order)."""
    index = data._index(root, "imagefolder", cache_dir)
    bad = [c for c in index.classes if not _NUMBER.match(c)]
    if bad:
        raise UserError(f"{root}: ImageNet-V2 class folders are numbers 0..999, found {bad[0]!r}")
    ids = np.array([int(c) for c in index.classes])
    order = np.argsort(ids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    classes = [index.classes[i] for i in order]
    index = ImageIndex.from_arrays(
        index.root, index.layout, classes, index.names, index.offsets, rank[np.asarray(index.labels)],
        source={**index.source, "numeric_classes": True},
    )  # fmt: skip
    if classnames_file is not None:
        names, _ = data.read_classnames(classnames_file)
    else:
        names = clip_imagenet_classnames()
    if int(ids.max()) >= len(names):
        raise UserError(f"{root} has class folder {int(ids.max())} but the names list has {len(names)} names")
    return index, [names[i] for i in sorted(ids.tolist())]


READERS = {"imagenet21k-p": imagenet21k_p_folder, "imagenet1k": imagenet1k_folder, "imagenet-v2": imagenet_v2_folder}
