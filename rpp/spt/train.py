"""``python -m rpp.spt``: Self-Prompt Tuning of a frozen timm ViT: prompts + a linear head, as SPT's code trains them.

Pipeline (SPT's ``train_MAE.py`` / ``train_MoCo.py``): build the backbone (timm model + local weights: timm, MAE or
MoCo v3), freeze it, add deep or shallow prompts (:func:`rpp_kernels.integrations.timm.add_prompts`; deep prompts
replace the prompt rows before every block and the last block's prompt outputs stay in the sequence, VPT's semantics),
initialise them from the training set's token prototypes (:func:`rpp.spt.init_prompts`), then train prompts + a fresh
linear head with AdamW in SPT's three parameter groups (biases and 1-D tensors without weight decay, prompts with
``--weight-decay``, the head's weight with ``--wd-head``) under SPT's schedule (linear warm-up from 0 over
``--warmup-epochs``, then half-cosine to ``--min-lr``, set every step from the fractional epoch). The head reads the CLS
token (``--pool token``) or, for MAE (``--pool avg``), the mean of prompt and patch outputs followed by the backbone's
pretrained final norm, as SPT's MAE models do. Every epoch is evaluated on the test split; the best and the last
epoch's top-1 are both reported (SPT reports the best).

``--recipe NAME`` starts from a shipped recipe (``rpp/recipes/spt-*.yaml``: SPT's published settings for MAE /
MoCo v3, deep / shallow, FGVC / VTAB-1k); ``--print-config`` prints the resolved options. With no ``--data`` /
``--weights`` it runs a built-in demo on CPU in well under two minutes: a tiny random-weight ViT on generated
coloured patterns.

Output directory (``--output``, which must be new or empty): ``prompts_head.pt`` (last epoch's prompts and head),
``prompts_head_best.pt`` (best epoch's), ``spt_state.pt`` (the full training state, for ``--resume``), ``metrics.jsonl``
(one JSON object per epoch) and, when the run ends, ``result.json`` (best and last epoch, read by
``python -m rpp.spt.report``). Files are written atomically and read back with ``torch.load(weights_only=True)``.

Faults: a corrupt image is skipped with a warning and counted. The first SIGINT/SIGTERM finishes the current step (or
stops the evaluation), saves the training state and exits 128 + signal, saying where it saved; ``--resume`` continues
bit-for-bit (data order and augmentation depend only on the seed and the position). A second signal ends the run at
once, data workers included (the last saved state is kept). Exit codes: 0 done, 2 user error (one line), 3 non-finite
loss or weights (the last checkpoint written is kept), 130/143 stopped by SIGINT/SIGTERM after saving.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from rpp import checkpoint, config
from rpp.distributed import cli_main, stop_now
from rpp.errors import UserError
from rpp.spt import data as spt_data
from rpp.spt.prototypes import DEFAULT_CAPACITY, LAYER0_SOURCES, MODES, init_prompts
from rpp_kernels.integrations.timm import add_prompts, load_backbone_weights, read_backbone_checkpoint

PROG = "rpp.spt"
CHECKPOINT_FILE = "prompts_head.pt"
BEST_FILE = "prompts_head_best.pt"
STATE_FILE = "spt_state.pt"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
STATE_FORMAT, PROMPTS_FORMAT, SCHEMA_VERSION = "rpp.spt_state", "rpp.spt_prompts", 1
EXIT_NON_FINITE = 3
INIT_CHOICES = ("vpt", *MODES)
# What a real run uses when neither a recipe nor the command line sets it. Num prompts: SPT's README (20 deep, 100
# shallow); the rest: SPT's train_MAE.py / train_MoCo.py / train.py defaults and README commands.
REAL_DEFAULTS = dict(epochs=100, batch_size=32, warmup_epochs=10.0, min_lr=1e-8, num_workers=4)
NUM_PROMPTS = {"deep": 20, "shallow": 100}
# By backbone format: lr / wd_head from the README commands (MAE; MoCo v3 and supervised), head init std from the
# scripts (MAE and supervised 0.02, MoCo v3 0.01), pooling from the models (MAE: global average; others: CLS).
BACKBONE_DEFAULTS = {
    "mae": dict(lr=5e-2, wd_head=0.5, head_init_std=0.02, pool="avg"),
    "mocov3": dict(lr=1e-3, wd_head=3.0, head_init_std=0.01, pool="token"),
    "timm": dict(lr=1e-3, wd_head=3.0, head_init_std=0.02, pool="token"),
}
# The demo: tiny ViT, 16 tokens per image, 384 training images.
DEMO_DEFAULTS = dict(
    epochs=8, batch_size=32, warmup_epochs=1.0, min_lr=0.0, num_workers=0, num_prompts=8, lr=1e-2, wd_head=1e-2,
    head_init_std=0.02, pool="token",
)  # fmt: skip
DEMO_PER_CLASS = {"train": 64, "val": 32}
# Options a --resume may change: they do not alter the trajectory.
RESUME_MAY_CHANGE = ("resume", "output", "num_workers", "device", "max_steps")
PATH_OPTIONS = ("data", "weights", "image_root")
DESCRIPTION = (
    "Self-Prompt Tuning: train prototype-initialised visual prompts + a linear head on a frozen timm ViT, with SPT's "
    "optimiser, schedule and preprocessing. Options: defaults < --recipe < --config FILE < command line. Without "
    "--data/--weights: a built-in CPU demo (tiny random-weight ViT, generated images)."
)


def _opt(help_text: str, default=None, choices: tuple | None = None, **meta):
    metadata = {"help": help_text, **meta}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class SPTConfig:
    # backbone and data
    model: str | None = _opt("timm model name, e.g. vit_base_patch16_224 (none: vit_base_patch16_224 with --weights)")
    weights: str | None = _opt("local backbone checkpoint: timm state dict, MAE or MoCo v3 checkpoint")
    data: str | None = _opt("dataset directory (layouts: see --data-format); none = the built-in demo")
    data_format: str = _opt(
        "filelist: VTAB-1k train800val200.txt + test.txt, or FGVC train.txt / *_train.txt + test.txt; vpt-json: "
        "VPT's train.json + test.json; imagefolder: train/<class>/ + test/<class>/; auto: the first that exists",
        "auto",
        spt_data.DATA_FORMATS,
    )
    image_root: str | None = _opt("folder the list paths are relative to (none: DATA/images if it exists, else DATA)")
    benchmark: str = _opt(
        "preprocessing: fgvc = RandomResizedCrop + flip / Resize + CenterCrop, vtab = Resize + CenterCrop (SPT); "
        "auto = vtab when DATA/train800val200.txt exists",
        "auto",
        spt_data.BENCHMARKS,
    )
    fgvc_crop: str = _opt(
        "FGVC training crop: random-resized (SPT) or random (VPT: Resize + RandomCrop)",
        "random-resized",
        spt_data.FGVC_CROPS,
    )
    eval_split: str = _opt("split evaluated every epoch (SPT reports the test split)", "test", spt_data.EVAL_SPLITS)
    dataset_name: str | None = _opt("name recorded for rpp.spt.report (none: the --data folder's name)")
    # prompts
    mode: str = _opt("prompt mode", "deep", ("deep", "shallow"))
    num_prompts: int | None = _opt("prompts per layer (none: 20 deep, 100 shallow as SPT; demo 8)")
    init: str = _opt("prompt init; vpt = VPT's uniform random init", "kmeans", INIT_CHOICES)
    init_images: int | None = _opt(
        "images drawn at random from the training set for the prototype init (none: all; SPT's MoCo v3 script uses 1)"
    )
    init_capacity: int = _opt(
        "candidates kept per layer for the init, a uniform sample of the token stream", DEFAULT_CAPACITY
    )
    init_layer0: str = _opt(
        "layer 0's prototype tokens: block-input (with positional embedding) or patch-embed (without, as SPT)",
        "block-input",
        LAYER0_SOURCES,
    )
    pool: str | None = _opt("head input: token (CLS) or avg (mean of prompts + patches, then the pretrained norm); "
                            "none: avg for MAE, token otherwise", None, ("token", "avg"))  # fmt: skip
    # optimisation
    epochs: int | None = _opt("epochs (none: 100; demo 8)")
    batch_size: int | None = _opt("images per step (none: 32)")
    lr: float | None = _opt("peak learning rate (none: by backbone: MAE 0.05, MoCo v3 and timm 0.001; demo 0.01)")
    min_lr: float | None = _opt("learning rate at the end of the cosine (none: 1e-8; demo 0)")
    warmup_epochs: float | None = _opt("linear warm-up from 0, in epochs (none: 10; demo 1)")
    weight_decay: float = _opt("AdamW weight decay of the prompts (biases and 1-D tensors get none)", 1e-2)
    wd_head: float | None = _opt("AdamW weight decay of the head's weight (none: by backbone: MAE 0.5, others 3.0)")
    head_init_std: float | None = _opt("std of the head's truncated-normal init (none: MoCo v3 0.01, others 0.02)")
    ema: float = _opt("EMA decay of prompts + head used for evaluation, 0 = off (SPT evaluates the live weights)", 0.0)
    drop_last: bool = _opt("drop the last incomplete training batch of each epoch (as SPT)", True)
    max_steps: int | None = _opt("stop after this many optimizer steps (none: all epochs)")
    # run
    num_workers: int | None = _opt("data loader worker processes (none: 4; demo 0)")
    output: str = _opt("output directory: new or empty (a run is continued only with --resume)", "runs/spt")
    resume: str | None = _opt(
        "continue an interrupted run: its directory or spt_state.pt; --resume alone = the --output directory",
        const="latest",
    )
    seed: int = _opt("seed for the head init, prototype init, data order and augmentation", 0)
    device: str | None = _opt("cpu, cuda or cuda:N (none: cuda when available)")


class NonFiniteError(RuntimeError):
    """The loss or the trained weights stopped being finite: the run stops, the last saved checkpoint stays."""


class _Stopped(Exception):
    """A first SIGINT/SIGTERM arrived: save where we are and exit."""


# ----------------------------------------------------------------------------------------------------------------
# Options.


def _check(cfg: SPTConfig) -> None:
    """Range checks; UserError naming the option and the value. Every float must be finite."""

    def bad(name: str, why: str) -> UserError:
        return UserError(f"invalid value {getattr(cfg, name)!r} for --{name.replace('_', '-')}: {why}")

    for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "wd_head", "head_init_std", "ema"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise bad(name, "must be a finite number")
    positive = ("num_prompts", "epochs", "batch_size", "init_images", "init_capacity", "max_steps")
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise bad(name, "must be positive")
    for name in ("num_workers",):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    for name in ("lr", "head_init_std"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise bad(name, "must be > 0")
    for name in ("min_lr", "weight_decay", "wd_head", "warmup_epochs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    if not 0 <= cfg.ema < 1:
        raise bad("ema", "must be in [0, 1)")
    if cfg.epochs is not None and cfg.warmup_epochs is not None and cfg.warmup_epochs > cfg.epochs:
        raise bad("warmup_epochs", f"must be at most --epochs ({cfg.epochs})")
    if cfg.lr is not None and cfg.min_lr is not None and cfg.min_lr > cfg.lr:
        raise bad("min_lr", f"must be at most --lr ({cfg.lr})")
    if cfg.num_prompts is not None and cfg.init_capacity < cfg.num_prompts:
        raise bad("init_capacity", f"must be at least --num-prompts ({cfg.num_prompts})")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"invalid value {name!r} for --device: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_demo(cfg: SPTConfig) -> bool:
    return cfg.data is None and cfg.weights is None and cfg.model is None


def fill_defaults(cfg: SPTConfig, backbone: str) -> None:
    """Set every option still None to its default for this run (demo, or the backbone format's SPT values)."""
    table = DEMO_DEFAULTS if backbone == "random" else {**REAL_DEFAULTS, **BACKBONE_DEFAULTS[backbone]}
    table = {"num_prompts": NUM_PROMPTS[cfg.mode], **table}
    for key, value in table.items():
        if getattr(cfg, key) is None:
            # The default warm-up (10 epochs, SPT's) is cut to a shorter run's length rather than refused.
            setattr(cfg, key, min(value, cfg.epochs) if key == "warmup_epochs" else value)
    _check(cfg)


def check_paths(cfg: SPTConfig) -> None:
    if is_demo(cfg):
        return
    if cfg.data is None:
        raise UserError("--data is required with --model/--weights (the downstream dataset directory)")
    if cfg.weights is None:
        raise UserError("--weights is required with --data: a local backbone checkpoint (timm, MAE or MoCo v3)")
    cfg.model = cfg.model or "vit_base_patch16_224"
    if cfg.data == "" or not Path(cfg.data).is_dir():
        raise UserError(f"--data: directory not found: {cfg.data}")
    if not Path(cfg.weights).is_file():
        raise UserError(f"--weights: file not found: {cfg.weights}")
    if not timm.is_model(cfg.model):
        raise UserError(f"--model: unknown timm model {cfg.model!r}")
    # Absolute paths, so that --resume from another working directory finds the same files.
    for key in PATH_OPTIONS:
        if getattr(cfg, key) is not None:
            setattr(cfg, key, str(Path(getattr(cfg, key)).resolve()))


def check_fresh_output(out: Path) -> None:
    """A new run writes only into a new or empty directory: never over another run (ours or another tool's)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory")
    if out.is_dir():
        # Ignore only the temporary files a killed save of ours leaves (".<file>.<random>.tmp").
        entries = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            hint = "; continue it with --resume" if STATE_FILE in entries else ""
            raise UserError(f"--output {out} is not empty ({shown}): choose a new directory{hint}")


def resolve_state_path(resume: str, output: str | None) -> Path:
    path = Path(output or SPTConfig.output if resume == "latest" else resume)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume: no rpp.spt training state at {path} (expected the {STATE_FILE} a run wrote)")
    return path


def read_state(path: Path) -> dict:
    state = checkpoint.load(path, "rpp.spt training state")
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: {path} is not an rpp.spt training state (format {state.get('format')!r})")
    if state.get("version") != SCHEMA_VERSION:
        raise UserError(
            f"--resume: {path} has schema version {state.get('version')!r}; this rpp reads {SCHEMA_VERSION}"
        )
    expected = {
        "args": dict, "classes": list, "epoch": int, "batch": int, "step": int, "prompt_tokens": torch.Tensor,
        "head": dict, "optimizer": dict, "sums": dict, "history": list, "rng": torch.Tensor,
    }  # fmt: skip
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind):
            raise UserError(f"--resume: {path} is malformed: {key!r} must be a {kind.__name__}")
    known = {f.name for f in fields(SPTConfig)}
    if set(state["args"]) != known:
        raise UserError(f"--resume: {path} was written with other options ({sorted(set(state['args']) ^ known)[:3]})")
    return state


def resolve_config(argv: list[str] | None) -> tuple[SPTConfig, dict | None, Path | None]:
    """(config, training state to resume or None, its path). Fresh run: defaults < recipe < --config < command line.
    Resume: the interrupted run's options; command-line options may repeat them, or change RESUME_MAY_CHANGE only."""
    parser = config.build_parser([SPTConfig], f"python -m {PROG}", DESCRIPTION, tool=PROG)
    explicit = vars(parser.parse_args(argv))
    (cfg,) = config.parse([SPTConfig], argv, f"python -m {PROG}", DESCRIPTION, tool=PROG)
    if cfg.resume is None:
        _check(cfg)
        return cfg, None, None
    for source in ("recipe", "config"):
        if source in explicit:
            raise UserError(f"--{source} cannot be combined with --resume: the run continues with its own options")
    path = resolve_state_path(cfg.resume, explicit.get("output"))
    state = read_state(path)
    saved = state["args"]

    def same(key: str) -> bool:
        now, before = getattr(cfg, key), saved[key]
        if key in PATH_OPTIONS and now is not None and before is not None:
            return Path(now).resolve() == Path(before).resolve()
        return now == before

    for key in explicit:
        if key in saved and key not in RESUME_MAY_CHANGE and not same(key):
            raise UserError(
                f"--resume: --{key.replace('_', '-')} was {saved[key]!r} in {path}, now {getattr(cfg, key)!r}; "
                "a resumed run continues with its own options (start a new run to change them)"
            )
    if "output" in explicit and Path(cfg.output).resolve() != path.parent.resolve():
        raise UserError(f"--resume: the run in {path.parent} continues there, not in --output {cfg.output}")
    resumed = SPTConfig(**saved)
    for key in RESUME_MAY_CHANGE:
        if key in explicit:
            setattr(resumed, key, getattr(cfg, key))
    resumed.output, resumed.resume = str(path.parent), str(path)
    _check(resumed)
    return resumed, state, path


# ----------------------------------------------------------------------------------------------------------------
# Model and data.


@dataclass
class Setup:
    model: VisionTransformer
    train_source: object
    eval_source: object
    train_transform: object
    eval_transform: object
    classes: list[str]
    backbone: str  # "random" (demo), "timm", "mae" or "mocov3"
    benchmark: str  # "demo", "fgvc" or "vtab"
    kept_norm: bool  # the pretrained final norm runs after the average pooling (SPT's MAE head)


def build_model_and_data(cfg: SPTConfig) -> Setup:
    """The backbone with a fresh head, the data and the transforms; fills the backbone-dependent defaults of ``cfg``."""
    if is_demo(cfg):
        fill_defaults(cfg, "random")
        images, labels = spt_data.synthetic_patterns("train", DEMO_PER_CLASS["train"], seed=cfg.seed)
        eval_images, eval_labels = spt_data.synthetic_patterns("val", DEMO_PER_CLASS["val"], seed=cfg.seed)
        classes = list(spt_data.SYNTHETIC_CLASSES)
        torch.manual_seed(cfg.seed)
        model = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=len(classes),
            global_pool=cfg.pool,
        )  # fmt: skip
        train, ev = spt_data.TensorSource(images, labels), spt_data.TensorSource(eval_images, eval_labels)
        return Setup(model, train, ev, None, None, classes, "random", "demo", False)
    try:
        state, backbone = read_backbone_checkpoint(cfg.weights)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--weights: {e}") from None
    fill_defaults(cfg, backbone)
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=1, global_pool=cfg.pool, drop_path_rate=0.0)
    except Exception as e:  # noqa: BLE001 - e.g. a CNN rejecting global_pool='token': the model is the user's choice
        raise UserError(f"--model {cfg.model}: cannot build it as a ViT ({type(e).__name__}: {e})") from None
    if not isinstance(model, VisionTransformer):
        raise UserError(f"--model {cfg.model}: SPT needs a timm VisionTransformer, got {type(model).__name__}")
    # SPT's MAE head: mean of the prompt + patch outputs, then the backbone's *pretrained* final norm. timm's 'avg'
    # pooling puts a fresh fc_norm after the pool (and no norm before it): give it the pretrained norm's weights.
    kept_norm = (
        isinstance(model.norm, nn.Identity)
        and isinstance(model.fc_norm, nn.LayerNorm)
        and "norm.weight" in state
        and "fc_norm.weight" not in state
    )
    if kept_norm:
        state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()}
    try:
        load_backbone_weights(model, (state, backbone))
    except ValueError as e:
        raise UserError(f"--weights: {e}") from None
    # MAE and MoCo v3 were pre-trained on ImageNet-normalised inputs; timm models carry their own statistics.
    if backbone in ("mae", "mocov3"):
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        mean, std = model.pretrained_cfg.get("mean", (0.5,) * 3), model.pretrained_cfg.get("std", (0.5,) * 3)
    layout = spt_data.detect_layout(cfg.data, cfg.data_format, cfg.benchmark, cfg.eval_split, cfg.image_root)
    train, ev, classes = spt_data.load_splits(layout)
    size = model.patch_embed.img_size[0]
    train_t, eval_t = spt_data.build_transforms(layout.benchmark, size, mean, std, cfg.fgvc_crop)
    model.reset_classifier(len(classes))
    return Setup(model, train, ev, train_t, eval_t, classes, backbone, layout.benchmark, kept_norm)


def param_groups(named: dict[str, nn.Parameter], weight_decay: float, wd_head: float) -> list[dict]:
    """SPT's ``param_groups_weight_decay``: 1-D tensors and biases without decay, the head with ``wd_head``, the rest
    (the prompts) with ``weight_decay``."""
    no_decay, decay, head = [], [], []
    for name, p in named.items():
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        elif "head" in name:
            head.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
        {"params": head, "weight_decay": wd_head},
    ]


def spt_lr(epoch: float, cfg: SPTConfig) -> float:
    """SPT's ``adjust_learning_rate`` at fractional ``epoch``: linear warm-up from 0, then half-cosine to min_lr."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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


# ----------------------------------------------------------------------------------------------------------------
# Loaders.


class EpochOrder:
    """Batches of ``(epoch, image)`` keys for one epoch from batch ``start`` on: a permutation seeded by (seed, epoch)
    only, so a resumed run draws the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.drop_last, self.seed, self.epoch, self.start = (
            n,
            batch_size,
            drop_last,
            seed,
            epoch,
            start,
        )

    @staticmethod
    def batches(n: int, batch_size: int, drop_last: bool) -> int:
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self.batches(self.n, self.batch_size, self.drop_last) - self.start

    def __iter__(self):
        gen = torch.Generator().manual_seed(spt_data.sample_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, self.batches(self.n, self.batch_size, self.drop_last)):
            yield [(self.epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


def _ignore_stop_signals(_worker_id: int) -> None:
    """Data workers ignore SIGINT/SIGTERM sent to the whole process group: the main process decides (it saves and
    exits; on a second signal it kills them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(dataset, cfg: SPTConfig, device: torch.device, **kwargs) -> DataLoader:
    workers = dict(worker_init_fn=_ignore_stop_signals) if cfg.num_workers > 0 else {}
    return DataLoader(
        dataset, num_workers=cfg.num_workers, pin_memory=device.type == "cuda", collate_fn=spt_data.collate,
        **workers, **kwargs,
    )  # fmt: skip


@contextmanager
def stop_on_signals():
    """Yields a dict whose "signal" is set by the first SIGINT/SIGTERM; a second one ends the process at once, after
    killing this process's data workers (they ignore both signals)."""
    state: dict = {"signal": None}
    previous = {}

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if state["signal"] is not None:
            stop_now(128 + signum, f"{PROG}: second signal ({name}): stopping now; the last saved state is kept")
        state["signal"] = signum
        print(f"{PROG}: got {name}: finishing this step, saving, then exiting (a second signal stops at once)")
        sys.stdout.flush()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and reporting.


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, stop: dict | None = None) -> dict:
    """Loss, top-1 accuracy, per-class correct/total counts and skipped (corrupt) images. Raises _Stopped when
    ``stop["signal"]`` gets set."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long)
    loss_sum, skipped = 0.0, 0
    try:
        for images, labels, bad in loader:
            skipped += bad
            if stop is not None and stop["signal"] is not None:
                raise _Stopped
            if len(labels) == 0:
                continue
            logits = model(images.to(device))
            labels = labels.to(device)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            hit = (logits.argmax(1) == labels).long().cpu()
            correct.index_add_(0, labels.cpu(), hit)
            total.index_add_(0, labels.cpu(), torch.ones_like(hit))
    finally:
        model.train(was_training)
    n = int(total.sum())
    acc = float(correct.sum()) / max(n, 1)
    return {"loss": loss_sum / max(n, 1), "acc": acc, "correct": correct, "total": total, "skipped": skipped}


def per_class_report(result: dict, classes: list[str]) -> str:
    width = max(len(c) for c in classes)
    lines, accs = [], []
    for name, c, t in zip(classes, result["correct"].tolist(), result["total"].tolist(), strict=True):
        if t:
            accs.append(c / t)
            lines.append(f"  {name:<{width}}  {100 * c / t:5.1f}%  ({c}/{t})")
        else:
            lines.append(f"  {name:<{width}}      -   (no eval images)")
    mean = 100 * sum(accs) / max(len(accs), 1)
    lines.append(f"  mean per-class accuracy {mean:.1f}%, overall {100 * result['acc']:.1f}%")
    return "\n".join(lines)


def _prompts_file(model, cfg: SPTConfig, classes: list[str], row: dict) -> dict:
    return {
        "format": PROMPTS_FORMAT,
        "version": SCHEMA_VERSION,
        "prompt_tokens": model.prompt_tokens.detach().cpu().clone(),
        "head": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()},
        "prompt_mode": cfg.mode,
        "model": cfg.model or "demo-tiny-vit",
        "global_pool": model.global_pool,
        "classes": classes,
        "args": asdict(cfg),
        "epoch": row["epoch"],
        "step": row["step"],
        "eval_acc": row["eval_acc"],
    }


def _write_metrics(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Training.


def run(cfg: SPTConfig, state: dict | None = None, on_step=None) -> int:
    """Train (or continue ``state``); returns the exit code. ``on_step(step)`` runs after each optimizer step."""
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    check_paths(cfg)
    if state is None:
        check_fresh_output(out)
    else:
        _remove_stale(out)
    torch.manual_seed(cfg.seed)
    setup = build_model_and_data(cfg)
    model, classes = setup.model, setup.classes
    model.to(device).requires_grad_(False)
    what = "built-in demo: tiny random-weight ViT on generated patterns" if setup.backbone == "random" else (
        f"{cfg.model} ({setup.backbone} weights), {setup.benchmark} preprocessing, eval on the {cfg.eval_split} split"
    )  # fmt: skip
    print(
        f"{PROG}: {what}; {len(setup.train_source)} train / {len(setup.eval_source)} eval images, "
        f"{len(classes)} classes"
    )
    n_tokens = model.patch_embed.num_patches
    if cfg.init in ("mean", "max") and cfg.num_prompts > n_tokens:
        raise UserError(f"--num-prompts {cfg.num_prompts}: {cfg.init} pooling needs at most {n_tokens} (tokens/image)")
    try:
        add_prompts(model, cfg.num_prompts, cfg.mode)
    except (TypeError, ValueError) as e:
        raise UserError(f"--mode {cfg.mode}: {e}") from None
    nn.init.trunc_normal_(model.head.weight, std=cfg.head_init_std)
    nn.init.zeros_(model.head.bias)
    trained = {"prompt_tokens": model.prompt_tokens, **{f"head.{k}": v for k, v in model.head.named_parameters()}}
    for p in trained.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(trained, cfg.weight_decay, cfg.wd_head), lr=cfg.lr)
    ema = EMA(trained, cfg.ema) if cfg.ema > 0 else None

    train_set = spt_data.SPTDataset(setup.train_source, setup.train_transform, cfg.seed, substitute=True)
    eval_loader = _loader(
        spt_data.SPTDataset(setup.eval_source, setup.eval_transform, cfg.seed), cfg, device, batch_size=cfg.batch_size
    )
    per_epoch = EpochOrder.batches(len(train_set), cfg.batch_size, cfg.drop_last)
    if per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size}: more than the {len(train_set)} training images (--drop-last)")
    ckpt_path, best_path, state_path = out / CHECKPOINT_FILE, out / BEST_FILE, out / STATE_FILE
    metrics_path = out / METRICS_FILE

    with stop_on_signals() as stop:
        if state is None:
            epoch, batch, step, history = 0, 0, 0, []
            sums = {"loss": 0.0, "seen": 0, "skipped": 0, "time": 0.0}
            t0 = time.perf_counter()
            if cfg.init != "vpt":
                init_set = spt_data.SPTDataset(setup.train_source, setup.train_transform, cfg.seed)
                keys = list(range(len(init_set)))
                if cfg.init_images is not None:
                    gen = torch.Generator().manual_seed(spt_data.sample_seed(cfg.seed, "init images"))
                    keys = sorted(torch.randperm(len(init_set), generator=gen)[: cfg.init_images].tolist())
                init_loader = _loader(
                    init_set, cfg, device, batch_size=cfg.batch_size, sampler=[("init", i) for i in keys]
                )
                try:
                    init_prompts(
                        model, init_loader, cfg.init, seed=cfg.seed, capacity=cfg.init_capacity, layer0=cfg.init_layer0
                    )
                except ValueError as e:
                    raise UserError(f"--init {cfg.init}: {e}") from None
                if ema is not None:
                    ema = EMA(trained, cfg.ema)
            print(
                f"prompts: {cfg.mode}, {tuple(model.prompt_tokens.shape)}, init {cfg.init} "
                f"({time.perf_counter() - t0:.1f}s); head: "
                + (
                    "mean of prompts + patches, then the pretrained norm"
                    if setup.kept_norm
                    else repr(model.global_pool)
                )
            )
            checkpoint.make_output_dir(out)
        else:
            epoch, batch, step = state["epoch"], state["batch"], state["step"]
            history, sums = [r for r in state["history"] if not r.get("partial")], dict(state["sums"])
            if ema is not None and not isinstance(state.get("ema"), dict):
                raise UserError(f"--resume: {cfg.resume} holds no EMA weights although --ema {cfg.ema}")
            try:
                with torch.no_grad():
                    if state["prompt_tokens"].shape != model.prompt_tokens.shape:
                        raise ValueError(f"prompt_tokens {list(state['prompt_tokens'].shape)}")
                    model.prompt_tokens.copy_(state["prompt_tokens"])
                    model.head.load_state_dict(state["head"])
                    for name, t in (state["ema"] or {}).items() if ema is not None else ():
                        ema.shadow[name].copy_(t)
                optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"--resume: {cfg.resume} does not fit this run: {first}") from None
            print(f"{PROG}: resuming from {cfg.resume} at epoch {epoch + 1}, batch {batch} (step {step})")
        n_trained = sum(p.numel() for p in trained.values())
        n_total = sum(p.numel() for p in model.parameters())
        print(f"trainable parameters: {n_trained} ({100 * n_trained / n_total:.2f}% of {n_total})")

        def save_state(e: int, b: int) -> None:
            atomic = {
                "format": STATE_FORMAT,
                "version": SCHEMA_VERSION,
                "args": asdict(cfg) | {"resume": None},
                "classes": classes,
                "epoch": e,
                "batch": b,
                "step": step,
                "prompt_tokens": model.prompt_tokens.detach().cpu().clone(),
                "head": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "ema": None if ema is None else {k: v.cpu().clone() for k, v in ema.shadow.items()},
                "sums": dict(sums),
                "history": history,
                "rng": torch.get_rng_state(),
            }
            checkpoint.atomic_save(atomic, state_path)

        def stopped(e: int, b: int) -> int:
            save_state(e, b)
            signum = stop["signal"]
            print(
                f"{PROG}: stopped by {signal.Signals(signum).name} at epoch {e + 1}, batch {b} (step {step}); "
                f"training state saved to {state_path}; continue with: python -m {PROG} --resume {out}"
            )
            return 128 + signum

        if state is None and stop["signal"] is not None:  # arrived during the prototype pass
            return stopped(0, 0)
        _write_metrics(metrics_path, history)
        model.train()
        result, best = None, max(history, key=lambda r: r["eval_acc"], default=None)
        if best is not None:
            best = next(r for r in history if r["eval_acc"] == best["eval_acc"])  # SPT keeps the first best epoch
        while epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps):
            t_start = time.perf_counter()
            if batch < per_epoch:
                order = EpochOrder(len(train_set), cfg.batch_size, cfg.drop_last, cfg.seed, epoch, batch)
                for images, labels, skipped in _loader(train_set, cfg, device, batch_sampler=order):
                    if cfg.max_steps is not None and step >= cfg.max_steps:
                        break
                    for group in optimizer.param_groups:
                        group["lr"] = spt_lr(epoch + batch / per_epoch, cfg)
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    loss = F.cross_entropy(model(images).float(), labels)
                    loss_value = loss.item()  # the step's one host sync
                    if not math.isfinite(loss_value):
                        raise NonFiniteError(f"loss is {loss_value} at step {step + 1} (epoch {epoch + 1})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if ema is not None:
                        ema.update()
                    step, batch = step + 1, batch + 1
                    sums["loss"] += loss_value * len(labels)
                    sums["seen"] += len(labels)
                    sums["skipped"] += skipped
                    if on_step is not None:
                        on_step(step)
                    if stop["signal"] is not None:
                        sums["time"] += time.perf_counter() - t_start
                        return stopped(epoch, batch)
            sums["time"] += time.perf_counter() - t_start
            if ema is not None:
                ema.swap()
            try:
                result = evaluate(model, eval_loader, len(classes), device, stop)
            except _Stopped:
                if ema is not None:
                    ema.swap()
                return stopped(epoch, batch)
            partial = batch < per_epoch
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": sums["loss"] / max(sums["seen"], 1),
                "eval_loss": result["loss"],
                "eval_acc": result["acc"],
                "eval_split": cfg.eval_split,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": sums["seen"] / max(sums["time"], 1e-9),
                "skipped_images": sums["skipped"] + result["skipped"],
            }
            if partial:
                row["partial"] = True
            history.append(row)
            print(
                f"epoch {epoch + 1:3d}  step {step:5d}  train loss {row['train_loss']:.4f}  {cfg.eval_split} loss "
                f"{row['eval_loss']:.4f}  {cfg.eval_split} acc {100 * row['eval_acc']:5.2f}%{' (EMA)' if ema else ''}  "
                f"{row['samples_per_s']:.0f} img/s"
                + (f"  {row['skipped_images']} corrupt images skipped" * bool(row["skipped_images"]))
            )
            if not all(torch.isfinite(p).all() for p in trained.values()):
                raise NonFiniteError(f"prompts or head became non-finite by step {step} (epoch {epoch + 1})")
            checkpoint.atomic_save(_prompts_file(model, cfg, classes, row), ckpt_path)
            if best is None or row["eval_acc"] > best["eval_acc"]:
                best = row
                checkpoint.atomic_save(_prompts_file(model, cfg, classes, row), best_path)
            if ema is not None:
                ema.swap()
            if not partial:
                epoch, batch = epoch + 1, 0
                sums = {"loss": 0.0, "seen": 0, "skipped": 0, "time": 0.0}
            save_state(epoch, batch)
            _write_metrics(metrics_path, history)
            if partial:
                break
            if stop["signal"] is not None:
                return stopped(epoch, batch)

    last = history[-1] if history else None
    if result is not None:
        print(f"per-class accuracy on the {cfg.eval_split} split, last epoch{' (EMA weights)' if ema else ''}:")
        print(per_class_report(result, classes))
    if last is not None:
        print(
            f"{cfg.eval_split} top-1: best {100 * best['eval_acc']:.2f}% (epoch {best['epoch']}), "
            f"last {100 * last['eval_acc']:.2f}% (epoch {last['epoch']})"
        )
        skipped = sum(r["skipped_images"] for r in history)
        if skipped:
            print(f"{PROG}: skipped {skipped} corrupt image(s) in all (see the warnings above)")
        summary = {
            "dataset": cfg.dataset_name or (Path(cfg.data).resolve().name if cfg.data else "demo"),
            "benchmark": setup.benchmark,
            "backbone": setup.backbone,
            "model": cfg.model or "demo-tiny-vit",
            "mode": cfg.mode,
            "eval_split": cfg.eval_split,
            "epochs": cfg.epochs,
            "finished": epoch >= cfg.epochs,
            "best": {"epoch": best["epoch"], "acc": best["eval_acc"]},
            "last": {"epoch": last["epoch"], "acc": last["eval_acc"]},
            "args": asdict(cfg),
        }
        tmp = out / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / RESULT_FILE)
    print(f"checkpoints (prompts + head): {ckpt_path.resolve()} (last), {best_path.name} (best); state {STATE_FILE}")
    return 0


def _remove_stale(out: Path) -> None:
    """Temporary files a kill -9 left behind mid-save."""
    checkpoint.remove_stale_temp_files(out, (STATE_FILE, CHECKPOINT_FILE, BEST_FILE))
    for name in (METRICS_FILE, RESULT_FILE):
        (out / f".{name}.tmp").unlink(missing_ok=True)


def train(argv: list[str] | None = None, on_step=None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("rpp.spt runs in a single process (not under torchrun): start one process per run")
    cfg, state, _ = resolve_config(argv)
    threads = torch.get_num_threads()
    try:
        if is_demo(cfg) and resolve_device(cfg.device).type == "cpu":
            # The demo's matmuls are tiny: one thread beats the cost of synchronising several (25x on a busy 2-core
            # machine).
            torch.set_num_threads(1)
        return run(cfg, state, on_step)
    except NonFiniteError as e:
        print(f"{PROG}: error: {e}; stopping, the last checkpoint in {cfg.output} (if any) is kept", file=sys.stderr)
        return EXIT_NON_FINITE
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, train, argv)
