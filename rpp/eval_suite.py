"""POMP's / CoOp's evaluation protocol: `python -m rpp.eval --suite pomp --checkpoint P --data-root DATA`.

Zero-shot top-1 of the learned prompts (and of CLIP's hand-written "a photo of a {}." on the same images) on every
dataset found under ``DATA`` in CoOp's layout (CoOp's docs/DATASETS.md, which POMP uses); a dataset that is not
there is skipped with a line saying what was expected where. Prints one table and writes JSON (``--output``).

==================  ============================================================  ================================
group / name        expected under DATA                                           classes
==================  ============================================================  ================================
imagenet21k-p       imagenet21k_resized/imagenet21k_val/nXXXXXXXX/ + its          semantic tree (POMP's IN-21K
                    imagenet21k_miil_tree.pth                                     number is on this split)
imagenet            imagenet/images/val/nXXXXXXXX/                                CLIP's curated names
cross-dataset (10)  caltech-101, oxford_pets, stanford_cars, oxford_flowers,      names of CoOp's split files
                    food-101, fgvc_aircraft, sun397, dtd, eurosat, ucf101 with    (``_`` read as a space, as
                    CoOp's ``split_zhou_*.json`` test split (FGVC-Aircraft:       CoOp's prompt learner does)
                    ``data/images_variant_test.txt`` + ``data/variants.txt``)
cross-domain (4)    imagenetv2/imagenetv2-matched-frequency-format-val/,          CLIP's curated names; V2
                    imagenet-sketch/images/, imagenet-adversarial/imagenet-a/,    folders sorted numerically,
                    imagenet-rendition/imagenet-r/                                A/R: their 200 classes
==================  ============================================================  ================================

Group means (cross-dataset over the 10 sets, cross-domain over the 4 ImageNet variants) are reported only when every
member was evaluated. POMP's published numbers for its released 4-token prompt (``python -m rpp.pomp_convert``):
ImageNet-21K 24.9, cross-dataset 66.7, cross-domain 60.4 (docs/MODELS.md of amazon-science/prompt-pretraining).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rpp import data, distributed
from rpp.datasets import imagenet1k_folder, imagenet21k_p_folder, imagenet_v2_folder
from rpp.errors import UserError
from rpp.index import ImageIndex

__all__ = ["PUBLISHED", "SUITES", "Entry", "format_table", "list_source", "load_entry", "run_suite"]

# POMP, docs/MODELS.md: the released ViT-B/16 prompts, 4 and 16 context tokens.
PUBLISHED = {
    "POMP nctx4 (5 ep)": {"imagenet21k-p": 24.9, "cross-dataset": 66.7, "cross-domain": 60.4},
    "POMP nctx16 (20 ep)": {"imagenet21k-p": 25.2, "cross-dataset": 65.1, "cross-domain": 60.0},
}


@dataclass(frozen=True)
class Entry:
    """One dataset of a suite: its name, group, folder under the data root and how to read it."""

    name: str
    group: str
    folder: str
    kind: str  # "tree" (a reader on a folder), "split" (CoOp split JSON), "aircraft"
    detail: str  # the reader's format for "tree", the JSON file for "split", the image folder for "aircraft"
    images: str = ""  # image folder of a split file, relative to `folder`


SUITES: dict[str, list[Entry]] = {
    "pomp": [
        Entry("imagenet21k-p", "imagenet21k-p", "imagenet21k_resized/imagenet21k_val", "tree", "imagenet21k-p"),
        Entry("imagenet", "imagenet", "imagenet/images/val", "tree", "imagenet1k"),
        Entry(
            "caltech101", "cross-dataset", "caltech-101", "split", "split_zhou_Caltech101.json", "101_ObjectCategories"
        ),
        Entry("oxford_pets", "cross-dataset", "oxford_pets", "split", "split_zhou_OxfordPets.json", "images"),
        Entry("stanford_cars", "cross-dataset", "stanford_cars", "split", "split_zhou_StanfordCars.json", ""),
        Entry("oxford_flowers", "cross-dataset", "oxford_flowers", "split", "split_zhou_OxfordFlowers.json", "jpg"),
        Entry("food101", "cross-dataset", "food-101", "split", "split_zhou_Food101.json", "images"),
        Entry("fgvc_aircraft", "cross-dataset", "fgvc_aircraft", "aircraft", "data/images"),
        Entry("sun397", "cross-dataset", "sun397", "split", "split_zhou_SUN397.json", "SUN397"),
        Entry("dtd", "cross-dataset", "dtd", "split", "split_zhou_DescribableTextures.json", "images"),
        Entry("eurosat", "cross-dataset", "eurosat", "split", "split_zhou_EuroSAT.json", "2750"),
        Entry("ucf101", "cross-dataset", "ucf101", "split", "split_zhou_UCF101.json", "UCF-101-midframes"),
        Entry(
            "imagenetv2", "cross-domain", "imagenetv2/imagenetv2-matched-frequency-format-val", "tree", "imagenet-v2"
        ),
        Entry("imagenet_sketch", "cross-domain", "imagenet-sketch/images", "tree", "imagenet1k"),
        Entry("imagenet_a", "cross-domain", "imagenet-adversarial/imagenet-a", "tree", "imagenet1k"),
        Entry("imagenet_r", "cross-domain", "imagenet-rendition/imagenet-r", "tree", "imagenet1k"),
    ]  # fmt: skip
}
GROUPS = ("cross-dataset", "cross-domain")
_TREE_READERS: dict[str, Callable] = {
    "imagenet21k-p": imagenet21k_p_folder,
    "imagenet1k": imagenet1k_folder,
    "imagenet-v2": imagenet_v2_folder,
}


def list_source(root: Path, items: list[tuple[str, int]], classes: list[str]) -> ImageIndex:
    """An index over ``(path relative to root, label)`` pairs (a split file's test list)."""
    encoded = [p.encode() for p, _ in items]
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    names = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    labels = np.array([label for _, label in items], dtype=np.int32)
    return ImageIndex.from_arrays(str(root), "imagefolder", classes, names, offsets, labels, source={"kind": "split"})


def _split_file(entry: Entry, base: Path) -> tuple[ImageIndex, list[str]]:
    """CoOp's ``split_zhou_*.json``: {"test": [[image path relative to the image folder, label, class name], ...]}."""
    path = base / entry.detail
    try:
        test = json.loads(path.read_text())["test"]
        items = [(str(p), int(label), str(name)) for p, label, name in test]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{entry.name}: cannot read the test split of {path}: {type(e).__name__}: {e}") from None
    if not items:
        raise UserError(f"{entry.name}: {path} has an empty test split")
    n = max(label for _, label, _ in items) + 1
    names: list[str | None] = [None] * n
    for _, label, name in items:
        names[label] = name
    if any(name is None for name in names):
        raise UserError(f"{entry.name}: {path} has labels without a test image (names of all {n} classes needed)")
    source = list_source(base / entry.images, [(p, label) for p, label, _ in items], names)
    return source, [name.replace("_", " ") for name in names]


def _aircraft(entry: Entry, base: Path) -> tuple[ImageIndex, list[str]]:
    """CoOp's FGVC-Aircraft: ``data/variants.txt`` (class names in label order), ``data/images_variant_test.txt``
    (``<image id> <variant name>`` per line), images ``data/images/<image id>.jpg``."""
    try:
        variants = [line.strip() for line in (base / "data/variants.txt").read_text().splitlines() if line.strip()]
        lines = (base / "data/images_variant_test.txt").read_text().splitlines()
    except OSError as e:
        raise UserError(f"{entry.name}: {e}") from None
    label_of = {name: i for i, name in enumerate(variants)}
    items = []
    for line in lines:
        if not line.strip():
            continue
        image, variant = line.strip().split(" ", 1)
        if variant not in label_of:
            raise UserError(f"{entry.name}: variant {variant!r} of image {image} is not in data/variants.txt")
        items.append((f"{image}.jpg", label_of[variant]))
    return list_source(base / entry.detail, items, variants), variants


def _present(entry: Entry, root: Path) -> str | None:
    """None when the entry's files exist under root, else what is missing."""
    base = root / entry.folder
    needed = [base] + {"split": [base / entry.detail], "aircraft": [base / "data/variants.txt"]}.get(entry.kind, [])
    missing = [p for p in needed if not p.exists()]
    return None if not missing else str(missing[0])


def load_entry(entry: Entry, root: Path) -> tuple[ImageIndex, list[str]]:
    """(images, class names) of one dataset of a suite under ``root``."""
    base = root / entry.folder
    if entry.kind == "tree":
        return _TREE_READERS[entry.detail](str(base))
    if entry.kind == "split":
        return _split_file(entry, base)
    return _aircraft(entry, base)


def group_means(rows: dict[str, dict], suite: str) -> dict[str, dict[str, float]]:
    """{group: {"learned": mean top-1, "template": ...}} over groups whose every member was evaluated."""
    out = {}
    for group in GROUPS:
        members = [e.name for e in SUITES[suite] if e.group == group]
        if members and all(m in rows for m in members):
            out[group] = {
                kind: sum(rows[m][kind]["top1"] for m in members) / len(members) for kind in ("learned", "template")
            }
    return out


def format_table(results: dict) -> str:
    """The suite's results as one plain-text table (datasets, then group means, then POMP's published numbers)."""
    lines = [f"{'dataset':<18} {'images':>8} {'classes':>8} {'learned top-1':>14} {'template top-1':>15}"]
    for name, row in results["datasets"].items():
        lines.append(
            f"{name:<18} {row['images']:>8} {row['classes']:>8} {row['learned']['top1']:>13.2f}% "
            f"{row['template']['top1']:>14.2f}%"
        )
    for group, means in results["groups"].items():
        lines.append(f"{group + ' mean':<36} {means['learned']:>13.2f}% {means['template']:>14.2f}%")
    for name, why in results["skipped"].items():
        lines.append(f"{name:<18} skipped: {why}")
    published = "; ".join(f"{k}: " + ", ".join(f"{g} {v}" for g, v in p.items()) for k, p in PUBLISHED.items())
    lines.append(f"published (POMP, docs/MODELS.md): {published}")
    return "\n".join(lines)


def run_suite(cfg, mcfg, ckpt: dict, path: Path, info: distributed.DistInfo) -> int:
    """``rpp.eval --suite``: evaluate the checkpoint's prompts on every dataset of ``cfg.suite`` found under
    ``cfg.data_root``; print the table (rank 0) and write JSON to ``cfg.output``."""
    from rpp.eval import evaluate
    from rpp.method import RPPMethod

    if cfg.data_root is None:
        raise UserError(f"--suite {cfg.suite} needs --data-root DIR (the datasets in CoOp's layout)")
    if cfg.data is not None:
        raise UserError(f"--suite {cfg.suite} reads its datasets under --data-root; --data is not used with it")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root}: not a directory")
    log = print if info.is_main else (lambda *a, **k: None)
    found, skipped = [], {}
    for entry in SUITES[cfg.suite]:
        missing = _present(entry, root)
        if missing is None:
            found.append(entry)
        else:
            skipped[entry.name] = f"not found ({missing})"
            log(f"rpp.eval: skipping {entry.name}: {missing} not found")
    if not found:
        raise UserError(f"--data-root {root}: none of the {cfg.suite} suite's datasets found (see --help)")
    torch.manual_seed(ckpt["seed"])  # a random-weight test student is rebuilt exactly
    method, results = None, {}
    for entry in found:
        source, names = load_entry(entry, root)
        if method is None:
            method = RPPMethod(mcfg, names, info.device)
            method.load_prompt_state_dict(ckpt["prompts"])
        loader = data.eval_loader(source, method.preprocess_val, cfg.batch_size, info.rank, info.world,
                                  cfg.num_workers)  # fmt: skip
        row = evaluate(method, loader, info.device, classnames=names)
        row.update(classes=len(names), group=entry.group)
        results[entry.name] = row
        log(f"rpp.eval: {entry.name}: learned top-1 {row['learned']['top1']:.2f}% ({row['images']} images)")
    out = {"checkpoint": str(path), "suite": cfg.suite, "data_root": str(root), "datasets": results,
           "groups": group_means(results, cfg.suite), "skipped": skipped, "published": PUBLISHED}  # fmt: skip
    if info.is_main:
        print(format_table(out))
        if cfg.output:
            Path(cfg.output).write_text(json.dumps(out, indent=2))
    return 0
