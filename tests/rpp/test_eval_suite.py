"""`python -m rpp.eval --suite pomp`: CoOp-layout datasets found under --data-root are evaluated, others skipped with
a line; split files, FGVC-Aircraft lists, numeric ImageNet-V2 folders and CLIP names are read as CoOp/POMP read them."""

import json

import pytest
import torch
from PIL import Image

from rpp import checkpoint
from rpp.datasets import clip_imagenet_classnames, imagenet_synsets
from rpp.eval import main as eval_main
from rpp.eval_suite import SUITES, group_means, load_entry
from rpp.method import MethodConfig, RPPMethod
from rpp.pomp_convert import main as convert_main


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), color).save(path)


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    pets = root / "oxford_pets"
    test = []
    for i, (name, label) in enumerate([("abyssinian", 0), ("american_bulldog", 1), ("american_bulldog", 1)]):
        _image(pets / "images" / f"{name}_{i}.jpg", (40 * i, 200, 30))
        test.append([f"{name}_{i}.jpg", label, name])
    (pets / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [], "val": [], "test": test}))
    air = root / "fgvc_aircraft" / "data"
    (air / "variants.txt").parent.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    (air / "images_variant_test.txt").write_text("0001 Cessna 172\n0002 707-320\n")
    _image(air / "images" / "0001.jpg", (1, 2, 3))
    _image(air / "images" / "0002.jpg", (9, 2, 3))
    for folder in ("0", "2", "10"):
        _image(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / folder / "a.jpeg", (5, 5, int(folder)))
    for synset in (imagenet_synsets()[6], imagenet_synsets()[1]):
        _image(root / "imagenet-adversarial/imagenet-a" / synset / "x.jpg", (100, 0, 0))
    return root


def test_suite_readers(data_root):
    entries = {e.name: e for e in SUITES["pomp"]}
    source, names = load_entry(entries["oxford_pets"], data_root)
    assert names == ["abyssinian", "american bulldog"] and source.labels.tolist() == [0, 1, 1]
    source, names = load_entry(entries["fgvc_aircraft"], data_root)
    assert names == ["707-320", "A300B4", "Cessna 172"] and source.labels.tolist() == [2, 0]
    assert source.path(0).endswith("fgvc_aircraft/data/images/0001.jpg")
    source, names = load_entry(entries["imagenetv2"], data_root)
    assert names == [clip_imagenet_classnames()[i] for i in (0, 2, 10)]
    assert sorted(zip(source.labels.tolist(), [source.relpath(i) for i in range(3)], strict=True)) == [
        (0, "0/a.jpeg"), (1, "2/a.jpeg"), (2, "10/a.jpeg")]  # fmt: skip
    _, names = load_entry(entries["imagenet_a"], data_root)
    assert names == [clip_imagenet_classnames()[1], clip_imagenet_classnames()[6]]


def test_group_means_need_every_member():
    rows = {e.name: {"learned": {"top1": 50.0}, "template": {"top1": 40.0}} for e in SUITES["pomp"]}
    assert group_means(rows, "pomp") == {"cross-dataset": {"learned": 50.0, "template": 40.0},
                                          "cross-domain": {"learned": 50.0, "template": 40.0}}  # fmt: skip
    del rows["dtd"]
    assert list(group_means(rows, "pomp")) == ["cross-domain"]


@pytest.mark.usefixtures("one_thread")
def test_eval_suite_cli(tmp_path, data_root, capsys):
    torch.save({"state_dict": {"ctx": torch.randn(4, 64) * 0.02}, "epoch": 5}, tmp_path / "pomp.pth.tar")
    prompts = tmp_path / "prompts.pt"
    assert convert_main(["--checkpoint", str(tmp_path / "pomp.pth.tar"), "--output", str(prompts),
                         "--model", "rpp-tiny"]) == 0  # fmt: skip
    out = tmp_path / "suite.json"
    code = eval_main(["--suite", "pomp", "--checkpoint", str(prompts), "--data-root", str(data_root),
                      "--output", str(out), "--num-workers", "0", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "rpp.eval: skipping caltech101" in printed and "published (POMP" in printed
    results = json.loads(out.read_text())
    assert set(results["datasets"]) == {"oxford_pets", "fgvc_aircraft", "imagenetv2", "imagenet_a"}
    assert "dtd" in results["skipped"] and results["groups"] == {}
    assert results["datasets"]["oxford_pets"]["images"] == 3

    # The suite's number for one dataset, recomputed image by image.
    ckpt = checkpoint.load_prompts(prompts)
    torch.manual_seed(ckpt["seed"])
    method = RPPMethod(MethodConfig(**ckpt["method_config"]), ["abyssinian", "american bulldog"], "cpu")
    method.load_prompt_state_dict(ckpt["prompts"])
    source, names = load_entry({e.name: e for e in SUITES["pomp"]}["oxford_pets"], data_root)
    images = torch.stack([method.preprocess_val(source.load(i)) for i in range(len(source))])
    hits = method.zero_shot_logits(images, names).argmax(-1) == torch.as_tensor(source.labels.astype("int64"))
    assert results["datasets"]["oxford_pets"]["learned"]["top1"] == pytest.approx(100.0 * hits.float().mean())

    assert eval_main(["--suite", "pomp", "--checkpoint", str(prompts)]) == 2  # no --data-root
    assert eval_main(["--suite", "pomp", "--checkpoint", str(prompts), "--data-root", str(tmp_path / "none")]) == 2
