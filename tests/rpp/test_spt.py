"""rpp.spt: prototype initialisation with known answers, init_prompts on a tiny ViT, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from rpp.spt import PrototypeBuilder, init_prompts, kmeans, pool_windows
from rpp.spt.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE, main
from rpp_kernels.integrations.timm import add_prompts


def rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.reshape(-1, x.shape[-1]).tolist()}


# ----------------------------------------------------------------------------------------------------------------
# Window pooling, reservoir, k-means on synthetic tokens.


@pytest.mark.parametrize("op", ["mean", "max"])
def test_pool_windows_known_sequence(op):
    # N = 10, P = 4: window ceil(10 / 4) = 3 -> [0:3], [3:6], [6:9], [9:10] (the last one shorter).
    tokens = torch.randn(2, 10, 5)
    windows = [(0, 3), (3, 6), (6, 9), (9, 10)]
    reduce = (lambda t: t.mean(1)) if op == "mean" else (lambda t: t.amax(1))
    expected = torch.stack([reduce(tokens[:, a:b]) for a, b in windows], 1)
    torch.testing.assert_close(pool_windows(tokens, 4, op), expected)


def test_pool_windows_vit_b_partition_matches_spt():
    # ViT-B/16 (N = 196) with 20 prompts: 19 windows of 10 tokens and one of 6, as in SPT's code.
    tokens = torch.arange(196.0)[None, :, None]
    means = pool_windows(tokens, 20, "mean")[0, :, 0]
    assert means.shape == (20,)
    assert means[:19].tolist() == [10 * j + 4.5 for j in range(19)] and means[19].item() == 192.5


@pytest.mark.parametrize("op", ["mean", "max"])
def test_builder_pooling_prompts_are_the_window_prototypes(op):
    tokens = torch.randn(1, 12, 6)  # one image, 12 tokens, 4 prompts: windows of 3
    builder = PrototypeBuilder(op, num_prompts=4, seed=0)
    builder.add(tokens)
    prompts = builder.build()
    assert prompts.shape == (4, 6)
    windows = tokens.view(4, 3, 6)
    expected = windows.mean(1) if op == "mean" else windows.amax(1)
    assert rows_of(prompts) == rows_of(expected)


def test_builder_random_picks_distinct_actual_tokens_deterministically():
    stream = [torch.randn(4, 16, 8) for _ in range(5)]

    def build(seed, capacity=1000):
        b = PrototypeBuilder("random", num_prompts=10, capacity=capacity, seed=seed)
        for t in stream:
            b.add(t)
        return b.build()

    prompts = build(0)
    assert rows_of(prompts) <= rows_of(torch.cat(stream))
    assert len(rows_of(prompts)) == 10
    torch.testing.assert_close(build(0), prompts, rtol=0, atol=0)
    assert not torch.equal(build(1), prompts)
    assert rows_of(build(0, capacity=37)) <= rows_of(torch.cat(stream))  # bounded reservoir, still real tokens


def test_reservoir_is_bounded_and_uniform_over_the_stream():
    first_half = 0
    for seed in range(200):
        b = PrototypeBuilder("random", num_prompts=1, capacity=50, seed=seed)
        for start in range(0, 1000, 100):  # token value = its position in the stream
            b.add(torch.arange(start, start + 100, dtype=torch.float32).view(1, 100, 1))
        assert b.rows.shape == (50, 1)
        first_half += int((b.rows < 500).sum())
    assert abs(first_half / (200 * 50) - 0.5) < 0.03, first_half  # keeping the first (or last) items would give 1 (0)


def test_kmeans_recovers_well_separated_centres():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [10.0] * 8, [-10.0] + [0.0] * 7, [0.0] * 7 + [10.0]])
    sizes = [120, 80, 60, 30]  # unbalanced, so that uniform seeding would often miss the small cluster
    points = torch.cat([c + 0.2 * torch.randn(n, 8, generator=gen) for c, n in zip(centres, sizes, strict=True)])
    found = kmeans(points[torch.randperm(len(points), generator=gen)], k=4, seed=0)
    dist = torch.cdist(centres, found)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3], dist
    assert dist.min(1).values.max() < 0.15, dist
    for seed in range(1, 8):
        again = kmeans(points, 4, seed=seed)
        assert torch.cdist(centres, again).min(1).values.max() < 0.15, seed
        torch.testing.assert_close(kmeans(points, 4, seed=seed), again, rtol=0, atol=0)


@pytest.mark.gpu
def test_kmeans_on_gpu():
    gen = torch.Generator().manual_seed(2)
    centres = 5 * torch.eye(4, 16)
    points = centres[torch.randint(4, (400,), generator=gen)] + 0.1 * torch.randn(400, 16, generator=gen)
    found = kmeans(points.cuda(), 4, seed=0)
    assert found.is_cuda and torch.cdist(centres, found.cpu()).min(1).values.max() < 0.1


def test_kmeans_builder_through_the_reservoir():
    gen = torch.Generator().manual_seed(1)
    centres = 5 * torch.eye(3, 6)
    tokens = (centres[torch.randint(3, (8, 50), generator=gen)] + 0.1 * torch.randn(8, 50, 6, generator=gen)).float()
    b = PrototypeBuilder("kmeans", num_prompts=3, capacity=200, seed=0)
    for t in tokens.split(2):
        b.add(t)
    assert torch.cdist(centres, b.build()).min(1).values.max() < 0.1


def test_builder_errors():
    with pytest.raises(ValueError, match="mode"):
        PrototypeBuilder("median", 4)
    with pytest.raises(ValueError, match="capacity"):
        PrototypeBuilder("random", 4, capacity=3)
    b = PrototypeBuilder("random", 5)
    b.add(torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="needs at least that many candidates, got 3"):
        b.build()
    with pytest.raises(ValueError, match="num_prompts <= tokens per image"):
        pool_windows(torch.randn(1, 3, 2), 4, "mean")
    with pytest.raises(ValueError, match="k <= number of points"):
        kmeans(torch.randn(3, 2), 4)


# ----------------------------------------------------------------------------------------------------------------
# init_prompts on a tiny timm ViT.


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3)
    return VisionTransformer(**{**kw, **kwargs}).eval()


def block_inputs(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input tokens without the prefix rows, computed by hand."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    out = []
    for blk in model.blocks:
        out.append(x[:, model.num_prefix_tokens :])
        x = blk(x)
    return out


def test_init_prompts_deep_random_picks_each_layers_own_tokens():
    model = add_prompts(tiny_vit(reg_tokens=2), num_prompts=5, mode="deep")
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:4], torch.zeros(4)), (images[4:], torch.zeros(2))]
    before = model.prompt_tokens.detach().clone()
    result = init_prompts(model, loader, "random", seed=0)
    assert result.shape == (3, 5, 32)
    torch.testing.assert_close(model.prompt_tokens.detach(), result)
    assert not torch.equal(before, result)
    with torch.no_grad():
        inputs = block_inputs(model, images)
    for layer, tokens in enumerate(inputs):
        assert rows_of(result[layer]) <= rows_of(tokens), f"layer {layer}: a prompt is not one of its input tokens"
        others = set().union(*(rows_of(t) for i, t in enumerate(inputs) if i != layer))
        assert not rows_of(result[layer]) & others
    assert all(not blk._forward_pre_hooks for blk in model.blocks)
    assert not model.training


def test_init_prompts_shallow_uses_block0_and_max_images():
    deep = add_prompts(tiny_vit(), 4, "deep")
    shallow = add_prompts(tiny_vit(), 4, "shallow")
    images = torch.randn(8, 3, 32, 32)
    loader = [images[:3], images[3:]]
    shallow.train()
    result = init_prompts(shallow, loader, "kmeans", max_images=5, seed=7)
    assert result.shape == (1, 4, 32) and shallow.training
    # Layer 0's prompts do not depend on whether the deeper layers are built too (per-layer seeds).
    torch.testing.assert_close(init_prompts(deep, loader, "kmeans", max_images=5, seed=7)[0], result[0])
    # max_images: random picks come from the first 5 images only.
    picked = init_prompts(shallow, loader, "random", max_images=5, seed=0)[0]
    with torch.no_grad():
        first5 = block_inputs(shallow, images[:5])[0]
    assert rows_of(picked) <= rows_of(first5)


def test_init_prompts_without_prompts_and_errors():
    model = tiny_vit()
    loader = [torch.randn(2, 3, 32, 32)]
    assert init_prompts(model, loader, "mean", num_prompts=4).shape == (3, 4, 32)
    with pytest.raises(ValueError, match="num_prompts is required"):
        init_prompts(model, loader, "mean")
    with pytest.raises(ValueError, match="mode"):
        init_prompts(model, loader, "median", num_prompts=4)
    add_prompts(model, 4, "deep")
    with pytest.raises(ValueError, match="holds 4 prompts"):
        init_prompts(model, loader, "mean", num_prompts=5)
    with pytest.raises(ValueError, match="no images"):
        init_prompts(model, [], "mean")


# ----------------------------------------------------------------------------------------------------------------
# CLI.


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def test_cli_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--epochs", "3", "--init", "mean", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-class accuracy" in text and "red horizontal stripes" in text and str(out) in text
    rows = read_metrics(out)
    losses = [row["train_loss"] for row in rows]
    assert len(losses) == 3 and losses[2] < 0.7 * losses[0], losses
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["prompt_tokens"].shape == (4, 8, 64) and ckpt["head"]["weight"].shape == (6, 64)
    assert set(ckpt) >= {"classes", "prompt_mode", "args", "step", "epoch", "eval_acc"}
    # Best and last epoch, both on the test split, in the log and in result.json.
    result = json.loads((out / RESULT_FILE).read_text())
    best = max(rows, key=lambda r: r["eval_acc"])
    assert result["best"] == {"epoch": best["epoch"], "acc": best["eval_acc"]}
    assert result["last"] == {"epoch": 3, "acc": rows[-1]["eval_acc"]}
    assert result["eval_split"] == "test" and result["finished"]
    assert f"test top-1: best {100 * best['eval_acc']:.2f}% (epoch {best['epoch']})" in text
    assert torch.load(out / BEST_FILE, weights_only=True)["epoch"] == best["epoch"]
    assert not list(out.glob(".*.tmp"))


def test_cli_refuses_a_used_output_and_stops_on_a_non_finite_loss(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--epochs", "1", "--max-steps", "2", "--init", "vpt", "--output", str(out)]) == 0
    saved = (out / CHECKPOINT_FILE).read_bytes()
    capsys.readouterr()
    assert main(["--epochs", "1", "--max-steps", "1", "--init", "vpt", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err, err
    assert main(["--output", str(out / CHECKPOINT_FILE)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (out / CHECKPOINT_FILE).read_bytes() == saved
    nan = tmp_path / "nan"
    assert main(["--epochs", "2", "--lr", "1e30", "--init", "vpt", "--output", str(nan)]) == 3
    assert "rpp.spt: error: loss is nan" in capsys.readouterr().err
    if (nan / CHECKPOINT_FILE).exists():
        ckpt = torch.load(nan / CHECKPOINT_FILE, weights_only=True)
        assert ckpt["prompt_tokens"].isfinite().all() and ckpt["head"]["weight"].isfinite().all()


def test_cli_demo_shallow_kmeans_ema_max_steps(tmp_path, capsys):
    out = tmp_path / "short"
    argv = ["--mode", "shallow", "--ema", "0.9", "--max-steps", "3", "--init-capacity", "100", "--output", str(out)]
    assert main(argv) == 0
    assert "(EMA weights)" in capsys.readouterr().out
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["partial"]
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["prompt_tokens"].shape == (1, 8, 64)


def _write_images(folder, n, colour):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 24), tuple(min(255, c + 10 * i) for c in colour)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """A test_vit backbone saved the way MAE does: {"model": encoder + decoder weights}."""
    path = tmp_path_factory.mktemp("weights") / "mae.pth"
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.")} | {"decoder_pred.weight": torch.zeros(4, 4)}
    torch.save({"model": state, "epoch": 1}, path)
    return path


def test_cli_filelist_and_imagefolder_with_local_weights(tmp_path, mae_checkpoint, capsys):
    vtab = tmp_path / "vtab"
    for c, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        _write_images(vtab / "images" / str(c), 3, colour)
    lines = [f"{c}/{i}.png {c}" for c in range(2) for i in range(3)]
    (vtab / "train800val200.txt").write_text("\n".join(lines) + "\n")
    (vtab / "test.txt").write_text("\n".join(lines[::2]) + "\n")
    common = ["--model", "test_vit", "--weights", str(mae_checkpoint), "--num-prompts", "4", "--batch-size", "4"]
    common += ["--num-workers", "0", "--epochs", "2"]
    assert main([*common, "--data", str(vtab), "--max-steps", "2", "--output", str(tmp_path / "o1")]) == 0
    text = capsys.readouterr().out
    assert "test_vit (mae weights), vtab preprocessing" in text and "per-class accuracy" in text
    assert "head: mean of prompts + patches, then the pretrained norm" in text

    folder = tmp_path / "fgvc"
    for split in ("train", "test"):
        _write_images(folder / split / "cardinal", 2, (200, 30, 30))
        _write_images(folder / split / "jay", 2, (30, 30, 200))
    args = [*common, "--data", str(folder), "--init", "random", "--max-steps", "1", "--output", str(tmp_path / "o2")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "cardinal" in text and "fgvc preprocessing" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "{tmp}", "--weights", "{tmp}/missing.pth"], "--weights: file not found"),
        (["--data", "{tmp}/nowhere", "--weights", "{ckpt}"], "--data: directory not found"),
        (["--data", "", "--weights", "{ckpt}"], "--data: directory not found"),
        (["--data", "{tmp}"], "--weights is required"),
        (["--model", "vit_base_patch16_224"], "--data is required"),
        (["--data", "{tmp}", "--weights", "{ckpt}", "--model", "no_such_vit"], "unknown timm model"),
        (["--data", "{tmp}", "--weights", "{ckpt}", "--model", "test_vit"], "--data {tmp}: expected train800val200"),
        (
            ["--data", "{tmp}", "--weights", "{ckpt}", "--model", "resnet18"],
            "--model resnet18: SPT needs a timm VisionTransformer",
        ),
        (["--lr", "-1"], "invalid value -1.0 for --lr: must be > 0"),
        (["--lr", "nan"], "for --lr: must be a finite number"),
        (["--weight-decay", "inf"], "for --weight-decay: must be a finite number"),
        (["--wd-head=-inf"], "for --wd-head: must be a finite number"),
        (["--warmup-epochs", "inf"], "for --warmup-epochs: must be a finite number"),
        (["--warmup-epochs", "20", "--epochs", "5"], "invalid value 20.0 for --warmup-epochs: must be at most"),
        (["--head-init-std", "0"], "invalid value 0.0 for --head-init-std"),
        (["--device", "tpu"], "invalid value 'tpu' for --device: expected cpu, cuda or cuda:N"),
        (["--device", "cuda:zero"], "invalid value 'cuda:zero' for --device"),
        (["--num-prompts", "0"], "invalid value 0 for --num-prompts: must be positive"),
        (["--ema", "1.5"], "invalid value 1.5 for --ema"),
        (["--init-capacity", "5"], "invalid value 5 for --init-capacity: must be at least --num-prompts (8)"),
        (["--init", "median"], "invalid value 'median' for --init"),
        (["--epochs", "two"], "invalid value 'two' for --epochs"),
        (["--num-prompts", "17", "--init", "max"], "max pooling needs at most 16"),
        (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
        (["--recipe", "pomp-in21k"], "configures python -m rpp.train, not rpp.spt"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, mae_checkpoint, capsys, argv, message):
    fill = lambda s: s.format(tmp=tmp_path, ckpt=mae_checkpoint)  # noqa: E731
    assert main([fill(a) for a in argv] + ["--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rpp.spt: error: ") and fill(message) in err, err


def test_cli_module_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rpp.spt", "--data", str(tmp_path), "--weights", str(tmp_path / "none.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"rpp.spt: error: --weights: file not found: {tmp_path / 'none.pth'}"]
