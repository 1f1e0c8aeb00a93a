"""rpp.spt reproduces SPT (WangYZ1608/Self-Prompt-Tuning): head, optimiser groups, schedule, data, init options,
recipes and the report, each checked against an independent transcription of SPT's code on small synthetic data."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from rpp.recipes import list_recipes, load_recipe
from rpp.spt import data as spt_data
from rpp.spt import init_prompts
from rpp.spt.report import main as report_main
from rpp.spt.train import (
    STATE_FILE,
    SPTConfig,
    build_model_and_data,
    fill_defaults,
    main,
    resolve_config,
    spt_lr,
)
from rpp_kernels.integrations.timm import add_prompts


def _image(path, colour, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def vtab_dir(tmp_path_factory):
    """A VTAB-1k style folder: train800val200.txt + test.txt, two classes, 4 + 2 images."""
    root = tmp_path_factory.mktemp("vtab")
    lines = []
    for c, colour in enumerate([(200, 20, 20), (20, 20, 200)]):
        for i in range(3):
            _image(root / "images" / f"{c}_{i}.png", tuple(min(255, v + 15 * i) for v in colour))
            lines.append(f"{c}_{i}.png {c}")
    (root / "train800val200.txt").write_text("\n".join(lines[:2] + lines[3:5]) + "\n")
    (root / "test.txt").write_text("\n".join([lines[2], lines[5]]) + "\n")
    return root


def _backbone_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    # A final norm that is not the identity, so that "pretrained norm kept" and "fresh norm" give different outputs.
    state["norm.weight"] = 0.5 + torch.rand_like(state["norm.weight"])
    state["norm.bias"] = torch.randn_like(state["norm.bias"])
    return state


@pytest.fixture(scope="module")
def mae_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("mae") / "mae_pretrain.pth"
    torch.save({"model": _backbone_state() | {"decoder_pred.weight": torch.zeros(4, 4)}}, path)
    return path


@pytest.fixture(scope="module")
def moco_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("moco") / "linear-vit.pth.tar"
    state = {f"module.{k}": v for k, v in _backbone_state(1).items()}
    torch.save({"state_dict": state, "epoch": 300}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The MAE head: SPT averages prompts + patches, then applies the *pretrained* final norm.


def spt_mae_logits(state, prompts, head, images, deep: bool):
    """SPT's Models/MAE_vpt_deep.py (deep) / MAE_vpt.py (shallow) forward, transcribed on timm's blocks."""
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0)
    ref.load_state_dict(state, strict=False)
    batch, n_prompts = images.shape[0], prompts.shape[1]
    x = ref.patch_embed(images)
    x = x.reshape(batch, -1, x.shape[-1])  # test_vit's patch_embed returns NHWC (dynamic image size)
    x = torch.cat((ref.cls_token.expand(batch, -1, -1), x), dim=1) + ref.pos_embed
    x = torch.cat((x[:, :1], prompts[0].expand(batch, -1, -1), x[:, 1:]), dim=1)
    for i, blk in enumerate(ref.blocks):
        if i > 0 and deep:
            x = torch.cat((x[:, :1], prompts[i].expand(batch, -1, -1), x[:, 1 + n_prompts :]), dim=1)
        x = blk(x)
    x = x[:, 1:, :].mean(dim=1)  # global pool without cls token (prompts included)
    x = ref.norm(x)  # the pretrained norm
    return F.linear(x, head["weight"], head["bias"])


@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_mae_head_matches_spt(vtab_dir, mae_weights, mode):
    cfg = SPTConfig(model="test_vit", weights=str(mae_weights), data=str(vtab_dir), mode=mode)
    setup = build_model_and_data(cfg)
    model = setup.model.eval()
    assert setup.backbone == "mae" and cfg.pool == "avg" and setup.kept_norm
    state = torch.load(mae_weights, weights_only=True)["model"]
    torch.testing.assert_close(model.fc_norm.weight, state["norm.weight"], rtol=0, atol=0)
    depth = len(model.blocks) if mode == "deep" else 1
    gen = torch.Generator().manual_seed(0)
    add_prompts(model, 3, mode, init=torch.randn(depth, 3, model.embed_dim, generator=gen))
    torch.nn.init.normal_(model.head.weight, std=0.5, generator=gen)
    torch.nn.init.normal_(model.head.bias, std=0.5, generator=gen)
    images = torch.randn(2, 3, 160, 160, generator=gen)
    with torch.no_grad():
        ours = model(images)
        expected = spt_mae_logits(state, model.prompt_tokens, model.head.state_dict(), images, mode == "deep")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # A fresh (identity) norm would give different logits: the check above can fail.
    with torch.no_grad():
        model.fc_norm.reset_parameters()
        assert (model(images) - expected).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Optimiser groups, schedule and head init, as SPT's utils.py / train_*.py.


def spt_adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    """SPT's utils.adjust_learning_rate, transcribed."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_schedule_is_spts():
    cfg = SPTConfig(lr=5e-2, min_lr=1e-8, warmup_epochs=10, epochs=100)
    for epoch in (0.0, 0.03, 5.5, 9.99, 10.0, 10.5, 50.0, 99.97):
        assert spt_lr(epoch, cfg) == pytest.approx(spt_adjust_learning_rate(epoch, 5e-2, 1e-8, 10, 100), rel=1e-12)


@pytest.mark.parametrize(
    "weights, lr, wd_head, std, pool", [("mae", 5e-2, 0.5, 0.02, "avg"), ("moco", 1e-3, 3.0, 0.01, "token")]
)
def test_param_groups_lr_and_head_init(tmp_path, vtab_dir, mae_weights, moco_weights, weights, lr, wd_head, std, pool):
    path = mae_weights if weights == "mae" else moco_weights
    out = tmp_path / "run"
    argv = ["--model", "test_vit", "--weights", str(path), "--data", str(vtab_dir), "--init", "vpt", "--epochs", "2"]
    argv += [
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--max-steps",
        "1",
        "--weight-decay",
        "0.03",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    state = torch.load(out / STATE_FILE, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    # SPT: biases / 1-D without decay, the prompts with weight_decay, the head's weight with wd_head.
    assert [g["weight_decay"] for g in groups] == [0.0, 0.03, wd_head]
    assert [len(g["params"]) for g in groups] == [1, 1, 1]
    assert state["args"]["lr"] == lr and state["args"]["pool"] == pool and state["args"]["head_init_std"] == std
    assert state["args"]["num_prompts"] == 20 and state["args"]["warmup_epochs"] == 2  # SPT's 10, cut to --epochs
    # The first step runs at lr 0 (warm-up from 0), so the saved head is still its initialisation.
    head = torch.load(out / "prompts_head.pt", weights_only=True)["head"]
    assert head["bias"].abs().max() == 0
    assert head["weight"].std().item() == pytest.approx(std, rel=0.25)


def test_shallow_defaults_to_100_prompts():
    cfg = SPTConfig(mode="shallow")
    fill_defaults(cfg, "mae")
    assert cfg.num_prompts == 100 and cfg.lr == 5e-2 and cfg.wd_head == 0.5
    cfg = SPTConfig(mode="deep")
    fill_defaults(cfg, "mocov3")
    assert cfg.num_prompts == 20 and cfg.lr == 1e-3 and cfg.wd_head == 3.0 and cfg.head_init_std == 0.01


# ----------------------------------------------------------------------------------------------------------------
# Data: layout detection, SPT's preprocessing per benchmark.


def test_fgvc_lists_are_not_taken_for_vtab(tmp_path):
    fgvc = tmp_path / "fgvc"
    for name in ("a.png", "b.png"):
        _image(fgvc / name, (10, 200, 10))
    (fgvc / "train.txt").write_text("a.png 0\nb.png 1\n")
    (fgvc / "test.txt").write_text("b.png 1\n")
    layout = spt_data.detect_layout(fgvc)
    assert (layout.format, layout.benchmark, layout.train.name) == ("filelist", "fgvc", "train.txt")
    # SPT's own list names (cub200_train.txt / cub200_test.txt) with images under images/.
    cub = tmp_path / "cub"
    _image(cub / "images" / "001.Albatross" / "x.jpg", (1, 2, 3))
    (cub / "cub200_train.txt").write_text("001.Albatross/x.jpg 0\n")
    (cub / "cub200_test.txt").write_text("001.Albatross/x.jpg 0\n")
    layout = spt_data.detect_layout(cub)
    assert (layout.format, layout.benchmark, layout.image_roots[0]) == ("filelist", "fgvc", cub / "images")
    train, _, classes = spt_data.load_splits(layout)
    assert train.paths == [str(cub / "images" / "001.Albatross" / "x.jpg")] and classes == ["0"]
    # Lists whose paths already start with images/ resolve against DIR.
    (cub / "cub200_test.txt").write_text("images/001.Albatross/x.jpg 0\n")
    assert spt_data.load_splits(layout)[1].paths == [str(cub / "images" / "001.Albatross" / "x.jpg")]
    # VTAB-1k: train800val200.txt; --eval-split val reads val200.txt.
    vtab = tmp_path / "vtab"
    _image(vtab / "x.png", (0, 0, 0))
    for name in ("train800val200.txt", "test.txt", "val200.txt"):
        (vtab / name).write_text("x.png 0\n")
    assert spt_data.detect_layout(vtab).benchmark == "vtab"
    assert spt_data.detect_layout(vtab, eval_split="val").eval.name == "val200.txt"
    assert spt_data.detect_layout(vtab, benchmark="fgvc").benchmark == "fgvc"  # explicit choice wins


def test_vpt_json_layout_relabels_like_vpt(tmp_path):
    root = tmp_path / "json"
    for name in ("p.png", "q.png", "r.png"):
        _image(root / "images" / name, (5, 5, 5))
    (root / "train.json").write_text(json.dumps({"p.png": 7, "q.png": 3}))
    (root / "test.json").write_text(json.dumps({"r.png": 7}))
    layout = spt_data.detect_layout(root)
    assert layout.format == "vpt-json" and layout.benchmark == "fgvc"
    train, test, classes = spt_data.load_splits(layout)
    assert train.labels == [1, 0] and test.labels == [1] and classes == ["3", "7"]


def test_preprocessing_per_benchmark():
    mean, std = (0.5,) * 3, (0.5,) * 3
    train, test = spt_data.build_transforms("fgvc", 32, mean, std)
    kinds = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert kinds(train)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert kinds(test)[:2] == ["Resize", "CenterCrop"] and test.transforms[0].size == round(32 * 256 / 224)
    assert kinds(spt_data.build_transforms("fgvc", 32, mean, std, "random")[0])[:3] == [
        "Resize",
        "RandomCrop",
        "RandomHorizontalFlip",
    ]
    train, test = spt_data.build_transforms("vtab", 32, mean, std)
    assert train is test and kinds(train)[:2] == ["Resize", "CenterCrop"]
    # Resize(S) keeps the aspect ratio (shorter side S), then the centre crop: not a square resize.
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 32))  # the left quarter is white: cropped away by the centre crop
    out = train(image)
    assert out.shape == (3, 32, 32) and out.max() < -0.9


# ----------------------------------------------------------------------------------------------------------------
# Prototype-init options: layer-0 tokens without positions, a single random image.


def test_layer0_patch_embed_tokens_exclude_positions():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
    ).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    add_prompts(model, 4, "deep")
    images = torch.randn(3, 3, 32, 32)
    rows = lambda x: {tuple(r) for r in x.reshape(-1, x.shape[-1]).tolist()}  # noqa: E731
    with torch.no_grad():
        patch = model.patch_embed(images)
        block0 = model.norm_pre(model._pos_embed(patch))[:, 1:]
    bare = init_prompts(model, [images], "random", layer0="patch-embed")
    assert rows(bare[0]) <= rows(patch) and not rows(bare[0]) & rows(block0)
    with_pos = init_prompts(model, [images], "random", layer0="block-input")
    assert rows(with_pos[0]) <= rows(block0)
    torch.testing.assert_close(with_pos[1], bare[1])  # deeper layers do not depend on the option
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    shallow = add_prompts(vit, 4, "shallow")
    with torch.no_grad():
        assert rows(init_prompts(shallow, [images], "random", layer0="patch-embed")[0]) <= rows(
            shallow.patch_embed(images)
        )


def test_single_random_image_init(tmp_path):
    out = tmp_path / "one"
    argv = ["--init", "random", "--init-images", "1", "--init-layer0", "patch-embed", "--max-steps", "1"]
    assert main([*argv, "--epochs", "2", "--output", str(out)]) == 0
    prompts = torch.load(out / "prompts_head.pt", weights_only=True)["prompt_tokens"]  # lr 0 at step 1: the init
    setup = build_model_and_data(SPTConfig(seed=0))
    model, images = setup.model.eval(), setup.train_source.images
    with torch.no_grad():
        tokens = model.patch_embed(images)  # [n, N, C]
    sources = set()
    for row in prompts[0]:
        hits = (tokens == row).all(-1).any(-1).nonzero().flatten().tolist()
        assert hits, "a layer-0 prompt is not a patch embedding of a training image"
        sources.update(hits)
    assert len(sources) == 1 and sources != {0}  # one image, drawn at random (not simply the first)


# ----------------------------------------------------------------------------------------------------------------
# Recipes.


def test_spt_recipes_resolve():
    names = [n for n in list_recipes("rpp.spt")]
    assert sorted(names) == sorted(
        f"spt-{b}-{m}-{d}" for b in ("mae", "mocov3") for m in ("deep", "shallow") for d in ("fgvc", "vtab")
    )
    for name in names:
        options = load_recipe(name, "rpp.spt")
        cfg, state, _ = resolve_config(["--recipe", name])
        assert state is None
        backbone, mode, bench = name.split("-")[1:]
        assert cfg.mode == mode and cfg.benchmark == bench and cfg.num_prompts == (20 if mode == "deep" else 100)
        expected = (5e-2, 0.5, 0.02, "avg", None) if backbone == "mae" else (1e-3, 3.0, 0.01, "token", 1)
        assert (cfg.lr, cfg.wd_head, cfg.head_init_std, cfg.pool, cfg.init_images) == expected, name
        assert (cfg.epochs, cfg.batch_size, cfg.warmup_epochs, cfg.min_lr, cfg.weight_decay) == (
            100,
            32,
            10,
            1e-8,
            1e-2,
        )
        assert cfg.init_layer0 == "patch-embed" and cfg.eval_split == "test" and cfg.drop_last and cfg.ema == 0
        assert set(options) <= set(SPTConfig.__dataclass_fields__)
    cfg, _, _ = resolve_config(["--recipe", "spt-mae-deep-fgvc", "--lr", "0.1"])
    assert cfg.lr == 0.1 and cfg.wd_head == 0.5  # the command line overrides the recipe


def test_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "spt-mocov3-shallow-vtab", "--seed", "3", "--print-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "recipe spt-mocov3-shallow-vtab" in text and "num_prompts: 100" in text and "seed: 3" in text
    assert "wd_head: 3.0" in text and "benchmark: vtab" in text


# ----------------------------------------------------------------------------------------------------------------
# python -m rpp.spt.report.


def _result(folder, dataset, benchmark, best, last, backbone="mae", mode="deep"):
    folder.mkdir(parents=True)
    result = {"dataset": dataset, "benchmark": benchmark, "backbone": backbone, "mode": mode, "finished": True}
    result |= {"best": {"epoch": 5, "acc": best}, "last": {"epoch": 10, "acc": last}}
    (folder / "result.json").write_text(json.dumps(result))


def test_report_group_means(tmp_path, capsys):
    fgvc = {"CUB200": 0.80, "NABirds555": 0.70, "Flowers102": 0.90, "DOG120": 0.60, "CAR196": 0.50}
    for name, acc in fgvc.items():
        _result(tmp_path / "runs" / name, name, "fgvc", acc, acc - 0.1)
    natural = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
    for i, name in enumerate(natural):
        _result(tmp_path / "runs" / f"v{name}", name, "vtab", 0.5 + 0.01 * i, 0.5)
    _result(tmp_path / "runs" / "eurosat", "eurosat", "vtab", 0.9, 0.8)
    _result(tmp_path / "runs" / "m1", "Clevr_Count", "vtab", 0.4, 0.3, backbone="mocov3")
    _result(tmp_path / "runs" / "odd", "imagenet", "fgvc", 0.1, 0.1)
    assert report_main([str(tmp_path / "runs"), "--per-dataset", "--json", str(tmp_path / "t.json")]) == 0
    text = capsys.readouterr().out
    best_row = next(line for line in text.splitlines() if line.startswith("MAE deep (best epoch)"))
    assert f"{100 * sum(fgvc.values()) / 5:.2f}" in best_row and "53.00" in best_row  # FGVC mean, Natural mean
    assert "90.00 (1/4)" in best_row and best_row.rstrip().endswith("-")  # incomplete Specialized, no Structured
    last_row = next(line for line in text.splitlines() if line.startswith("MAE deep (last epoch)"))
    assert f"{100 * (sum(fgvc.values()) - 0.5) / 5:.2f}" in last_row
    assert "MoCo v3 deep (best epoch)" in text and "40.00 (1/8)" in text
    assert "SPT paper: MoCo v3 deep" in text and "76.20" in text and "83.26" in text
    assert "imagenet (fgvc)" in text and "Oxford Flowers" in text
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["runs"]["MAE deep"]["best"]["datasets"]["Flowers102"] == pytest.approx(53.0)


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text("{")
    assert report_main([str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpp.spt.report: error: cannot read") and err.count("\n") == 1
