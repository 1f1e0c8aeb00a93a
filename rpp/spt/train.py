"""``python -m rpp.spt``: Self-Prompt Tuning of a frozen timm ViT: prompts + a linear head.

Pipeline: build the backbone (timm model + local weights: timm, MAE or MoCo v3), freeze it, add deep or shallow
prompts (:func:`rpp_kernels.integrations.timm.add_prompts`), initialise them from the training set's token prototypes
(:func:`rpp.spt.init_prompts`), then train prompts + a fresh linear head with AdamW under a linear warm-up + cosine
schedule, optionally evaluating an EMA of the trained weights, and report per-class accuracy on the eval split.

With no ``--data``/``--weights`` it runs a built-in demo on CPU in well under two minutes: a tiny random-weight ViT on
generated coloured patterns (:func:`rpp.spt.data.synthetic_patterns`).

Output directory (``--output``): ``prompts_head.pt`` (prompt tokens, head weights, class names, options; rewritten
atomically after every epoch) and ``metrics.jsonl`` (one JSON object per epoch). An ``--output`` that already holds a
checkpoint is refused rather than overwritten. Exit codes: 0 done, 2 user error (one line), 3 non-finite loss or weights
(the last checkpoint written is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from rpp.checkpoint import atomic_save, make_output_dir
from rpp.errors import UserError
from rpp.spt import data as spt_data
from rpp.spt.prototypes import DEFAULT_CAPACITY, MODES, init_prompts
from rpp_kernels.integrations.timm import add_prompts, load_backbone_weights, read_backbone_checkpoint

CHECKPOINT_FILE = "prompts_head.pt"
METRICS_FILE = "metrics.jsonl"
INIT_CHOICES = ("vpt", *MODES)
# Defaults that differ between a real run and the built-in demo (tiny ViT, 16 tokens per image, 384 images).
REAL_DEFAULTS = dict(num_prompts=20, epochs=100, batch_size=32, lr=1e-3, warmup_epochs=10.0, num_workers=4)
DEMO_DEFAULTS = dict(num_prompts=8, epochs=8, batch_size=32, lr=1e-2, warmup_epochs=1.0, num_workers=0)
DEMO_PER_CLASS = {"train": 64, "val": 32}


class NonFiniteError(RuntimeError):
    """The loss or the trained weights stopped being finite: the run stops, the last saved checkpoint stays."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{message} (see python -m rpp.spt --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m rpp.spt",
        description="Self-Prompt Tuning: train prototype-initialised visual prompts + a linear head on a frozen "
        "timm ViT. Without --data/--weights: a built-in CPU demo (tiny ViT, generated images).",
    )
    real, demo = REAL_DEFAULTS, DEMO_DEFAULTS
    both = lambda key: f"(default {real[key]}; demo {demo[key]})"  # noqa: E731
    p.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224 (needs --data and --weights)")
    p.add_argument("--weights", help="local backbone checkpoint: timm state dict, MAE or MoCo v3 checkpoint")
    p.add_argument("--data", help="dataset directory (layouts: see --data-format)")
    p.add_argument(
        "--data-format",
        choices=("auto", "imagefolder", "filelist"),
        default="auto",
        help="imagefolder: DATA/train/<class>/..., DATA/val|test/<class>/...; filelist (VTAB-1k): "
        "DATA/train800val200.txt + DATA/test.txt with 'path label' lines; auto: filelist if those lists exist",
    )
    p.add_argument(
        "--init",
        choices=INIT_CHOICES,
        default="kmeans",
        help="prompt init (default kmeans); vpt = VPT's uniform random init",
    )
    p.add_argument("--mode", choices=("deep", "shallow"), default="deep", help="default deep")
    p.add_argument("--num-prompts", type=int, help=f"prompts per layer {both('num_prompts')}")
    p.add_argument("--pool", choices=("auto", "token", "avg"), default="auto", help="head pooling; auto: avg for MAE")
    p.add_argument("--epochs", type=int, help=f"{both('epochs')}")
    p.add_argument("--batch-size", type=int, help=f"{both('batch_size')}")
    p.add_argument("--lr", type=float, help=f"peak learning rate {both('lr')}")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    p.add_argument(
        "--warmup-epochs", type=float, help=f"linear warm-up before the cosine decay {both('warmup_epochs')}"
    )
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of prompts + head for evaluation, 0 = off")
    p.add_argument("--init-images", type=int, help="images used for the prototype init (default: all)")
    p.add_argument(
        "--init-capacity",
        type=int,
        default=DEFAULT_CAPACITY,
        help=f"candidates kept per layer for the init, a uniform sample of the stream (default {DEFAULT_CAPACITY})",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--num-workers", type=int, help=f"data loader workers {both('num_workers')}")
    p.add_argument("--output", default="runs/spt", help="output directory (default runs/spt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.demo = args.data is None and args.weights is None and args.model is None
    if not args.demo:
        if args.data is None:
            raise UserError("--data is required with --model/--weights (the downstream dataset directory)")
        if args.weights is None:
            raise UserError("--weights is required with --data: a local backbone checkpoint (timm, MAE or MoCo v3)")
        args.model = args.model or "vit_base_patch16_224"
        if not Path(args.data).is_dir():
            raise UserError(f"--data: directory not found: {args.data}")
        if not Path(args.weights).is_file():
            raise UserError(f"--weights: file not found: {args.weights}")
        if not timm.is_model(args.model):
            raise UserError(f"--model: unknown timm model {args.model!r}")
    for key, value in (DEMO_DEFAULTS if args.demo else REAL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    checks = [
        ("--num-prompts", args.num_prompts, args.num_prompts >= 1),
        ("--epochs", args.epochs, args.epochs >= 1),
        ("--batch-size", args.batch_size, args.batch_size >= 1),
        ("--lr", args.lr, args.lr > 0),
        ("--weight-decay", args.weight_decay, args.weight_decay >= 0),
        ("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0),
        ("--ema", args.ema, 0 <= args.ema < 1),
        ("--num-workers", args.num_workers, args.num_workers >= 0),
        ("--max-steps", args.max_steps, args.max_steps is None or args.max_steps >= 1),
        ("--init-images", args.init_images, args.init_images is None or args.init_images >= 1),
        ("--init-capacity", args.init_capacity, args.init_capacity >= args.num_prompts),
    ]
    for name, value, ok in checks:
        if not ok:
            raise UserError(f"{name}: invalid value {value}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory")
    if (out / CHECKPOINT_FILE).exists():  # a new run would replace that run's checkpoint after its first epoch
        raise UserError(f"--output {out} already holds a checkpoint ({CHECKPOINT_FILE}): choose another --output")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    return args


def build_model_and_data(args: argparse.Namespace):
    """(backbone with a fresh head, train set, eval set, class names, checkpoint format)."""
    if args.demo:
        train = spt_data.synthetic_patterns("train", DEMO_PER_CLASS["train"], seed=args.seed)
        evaluation = spt_data.synthetic_patterns("val", DEMO_PER_CLASS["val"], seed=args.seed)
        classes = list(spt_data.SYNTHETIC_CLASSES)
        torch.manual_seed(args.seed)
        pool = "avg" if args.pool == "avg" else "token"
        model = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=len(classes), global_pool=pool
        )
        return model, train, evaluation, classes, "random"
    try:
        checkpoint = read_backbone_checkpoint(args.weights)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--weights: {e}") from e
    fmt = checkpoint[1]
    pool = args.pool if args.pool != "auto" else ("avg" if fmt == "mae" else "token")
    try:
        model = timm.create_model(args.model, pretrained=False, num_classes=1, global_pool=pool, drop_path_rate=0.0)
    except Exception as e:  # noqa: BLE001 - e.g. a CNN rejecting global_pool='token': the model is the user's choice
        raise UserError(f"--model {args.model}: cannot build it as a ViT ({type(e).__name__}: {e})") from e
    if not isinstance(model, VisionTransformer):
        raise UserError(f"--model {args.model}: SPT needs a timm VisionTransformer, got {type(model).__name__}")
    try:
        load_backbone_weights(model, checkpoint)
    except ValueError as e:
        raise UserError(f"--weights: {e}") from e
    # MAE and MoCo v3 were pre-trained on ImageNet-normalised inputs; timm models carry their own statistics.
    if fmt in ("mae", "mocov3"):
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        mean, std = model.pretrained_cfg.get("mean", (0.5,) * 3), model.pretrained_cfg.get("std", (0.5,) * 3)
    data_format = args.data_format
    if data_format == "auto":
        lists = ("train800val200.txt", "train.txt")
        data_format = "filelist" if any((Path(args.data) / n).is_file() for n in lists) else "imagefolder"
    reader = spt_data.file_list if data_format == "filelist" else spt_data.image_folder
    train, evaluation, classes = reader(args.data, model.patch_embed.img_size[0], mean, std)
    model.reset_classifier(len(classes))
    return model, train, evaluation, classes, fmt


class EMA:
    """Exponential moving average of the trained tensors only (prompts + head), swapped in for evaluation."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p, 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and EMA values (call again to swap back)."""
        for name, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(tmp)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> dict:
    """Loss, overall accuracy and per-class correct/total counts."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long)
    loss_sum = 0.0
    for images, labels in loader:
        logits = model(images.to(device))
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        hit = (logits.argmax(1) == labels).long().cpu()
        correct.index_add_(0, labels.cpu(), hit)
        total.index_add_(0, labels.cpu(), torch.ones_like(hit))
    model.train(was_training)
    n = int(total.sum())
    return {"loss": loss_sum / max(n, 1), "acc": float(correct.sum()) / max(n, 1), "correct": correct, "total": total}


def per_class_report(result: dict, classes: list[str]) -> str:
    width = max(len(c) for c in classes)
    lines = []
    accs = []
    for name, c, t in zip(classes, result["correct"].tolist(), result["total"].tolist(), strict=True):
        if t:
            accs.append(c / t)
            lines.append(f"  {name:<{width}}  {100 * c / t:5.1f}%  ({c}/{t})")
        else:
            lines.append(f"  {name:<{width}}      -   (no eval images)")
    mean = 100 * sum(accs) / max(len(accs), 1)
    lines.append(f"  mean per-class accuracy {mean:.1f}%, overall {100 * result['acc']:.1f}%")
    return "\n".join(lines)


def save_checkpoint(path: Path, model: nn.Module, args: argparse.Namespace, classes: list[str], extra: dict) -> None:
    atomic_save(
        {
            "prompt_tokens": model.prompt_tokens.detach().cpu(),
            "head": {k: v.cpu() for k, v in model.head.state_dict().items()},
            "prompt_mode": args.mode,
            "model": args.model or "demo-tiny-vit",
            "global_pool": model.global_pool,
            "classes": classes,
            "args": dict(vars(args)),
            **extra,
        },
        path,
    )


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, train_set, eval_set, classes, fmt = build_model_and_data(args)
    model.to(device).requires_grad_(False)
    what = "built-in demo: tiny random-weight ViT on generated patterns" if args.demo else f"{args.model} ({fmt})"
    print(f"rpp.spt: {what}; {len(train_set)} train / {len(eval_set)} eval images, {len(classes)} classes")

    loader_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, shuffle=True, generator=gen, **loader_kw)
    eval_loader = DataLoader(eval_set, shuffle=False, **loader_kw)

    n_tokens = model.patch_embed.num_patches
    if args.init in ("mean", "max") and args.num_prompts > n_tokens:
        raise UserError(
            f"--num-prompts {args.num_prompts}: {args.init} pooling needs at most {n_tokens} (tokens/image)"
        )
    add_prompts(model, args.num_prompts, args.mode)
    t0 = time.perf_counter()
    if args.init != "vpt":
        init_loader = DataLoader(train_set, shuffle=False, **loader_kw)
        try:
            init_prompts(
                model, init_loader, args.init, max_images=args.init_images, seed=args.seed, capacity=args.init_capacity
            )
        except ValueError as e:
            raise UserError(f"--init {args.init}: {e}") from e
    print(
        f"prompts: {args.mode}, {tuple(model.prompt_tokens.shape)}, init {args.init} "
        f"({time.perf_counter() - t0:.1f}s); head pooling {model.global_pool!r}"
    )
    nn.init.trunc_normal_(model.head.weight, std=0.02)
    nn.init.zeros_(model.head.bias)
    trained = {"prompt_tokens": model.prompt_tokens, **{f"head.{k}": v for k, v in model.head.named_parameters()}}
    for p in trained.values():
        p.requires_grad_(True)
    n_trained = sum(p.numel() for p in trained.values())
    n_total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {n_trained} ({100 * n_trained / n_total:.2f}% of {n_total})")

    steps_per_epoch = len(train_loader)
    total = (
        args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)
    )
    warmup = min(round(args.warmup_epochs * steps_per_epoch), total - 1)
    optimizer = torch.optim.AdamW(trained.values(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
    ema = EMA(trained, args.ema) if args.ema > 0 else None

    out = Path(args.output)
    make_output_dir(out)
    ckpt_path, metrics_path = out / CHECKPOINT_FILE, out / METRICS_FILE
    metrics_path.write_text("")
    model.train()
    step, history = 0, []
    for epoch in range(1, args.epochs + 1):
        t_epoch, loss_sum, seen = time.perf_counter(), 0.0, 0
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels)
            loss_value = loss.item()  # the step's one host sync
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"loss is {loss_value} at step {step + 1} (epoch {epoch})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            loss_sum, seen, step = loss_sum + loss_value * len(labels), seen + len(labels), step + 1
            if step >= total:
                break
        if ema is not None:
            ema.swap()
        result = evaluate(model, eval_loader, len(classes), device)
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / seen,
            "eval_loss": result["loss"],
            "eval_acc": result["acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen / (time.perf_counter() - t_epoch),
        }
        history.append(row)
        print(
            f"epoch {epoch:3d}  step {step:5d}  train loss {row['train_loss']:.4f}  eval loss {row['eval_loss']:.4f}  "
            f"eval acc {100 * row['eval_acc']:5.1f}%{' (EMA)' if ema else ''}  {row['samples_per_s']:.0f} img/s"
        )
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if not all(torch.isfinite(p).all() for p in trained.values()):
            raise NonFiniteError(f"prompts or head became non-finite by step {step} (epoch {epoch})")
        save_checkpoint(ckpt_path, model, args, classes, {"epoch": epoch, "step": step, "ema": ema is not None})
        if ema is not None:
            ema.swap()
        if step >= total:
            break
    if ema is not None:
        ema.swap()  # report with the weights that were saved
    print(f"per-class accuracy on {len(eval_set)} eval images{' (EMA weights)' if ema else ''}:")
    print(per_class_report(result, classes))
    print(f"checkpoint (prompts + head): {ckpt_path.resolve()}")
    return {"history": history, "final": result, "checkpoint": ckpt_path, "model": model}


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        args = resolve_args(argv)
        if args.demo and args.device == "cpu":
            # The demo's matmuls are tiny: one thread beats the cost of synchronising several (25x on a busy 2-core
            # machine).
            torch.set_num_threads(1)
        run(args)
    except UserError as e:
        print(f"rpp.spt: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"rpp.spt: error: {e}; stopping, the last checkpoint in {args.output} (if any) is kept", file=sys.stderr)
        return 3
    finally:
        torch.set_num_threads(threads)
    return 0
