"""Training configuration: a dataclass whose field metadata is the CLI documentation.

Precedence: dataclass defaults < YAML file (`--config FILE`) < command-line options. The parser is generated from
the fields of one or more dataclasses (here `TrainConfig` and the method's `MethodConfig`), so `--help` always lists
every option with its help text and default. Field names map to options as `batch_size` -> `--batch-size`; YAML keys
may use either spelling.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rpp.errors import UserError

DATA_FORMATS = ("builtin", "imagefolder", "imagenet21k", "imagenet21k-p", "imagenet1k", "imagenet-v2", "webdataset")
_NONE_WORDS = ("none", "null", "all")


@dataclass
class TrainConfig:
    # data
    data: str | None = field(
        default=None,
        metadata={
            "help": "dataset path: image folder, ImageNet-21K synset tree, or webdataset shards (brace pattern, "
            "directory of .tar files or one .tar); none = the built-in shapes dataset"
        },
    )
    data_format: str | None = field(
        default=None,
        metadata={
            "help": "data layout; none = infer from --data (builtin when --data is not given)",
            "choices": DATA_FORMATS,
        },
    )
    classnames: str | None = field(
        default=None,
        metadata={
            "help": "class names file: one name per line in label order, or class-description lines "
            "'nXXXXXXXX<tab>name, synonym' (ImageNet-21K words.txt); required for webdataset"
        },
    )
    shots: int | None = field(default=None, metadata={"help": "few-shot: keep N images per class (none = all)"})
    shots_seed: int = field(default=0, metadata={"help": "seed choosing the few-shot subset"})
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "held-out image folder / synset tree evaluated after training (same classes as --data); "
            "the built-in dataset uses its own held-out split"
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "directory written by `python -m rpp.teacher_cache` for this --data (any format, webdataset "
            "shards included, in the same order): use its top-k teacher labels instead of running the teacher online"
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where image indices of folder trees / file lists and teacher class embeddings are cached, shared "
            "by runs that name the same folder (none = OUTPUT/cache)"
        },
    )
    # run
    output: str = field(
        default="runs/rpp-default",
        metadata={
            "help": "output directory (checkpoints, logs); one that holds a checkpoint is only continued (--resume), "
            "never overwritten by a new run"
        },
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps to run (none = --epochs passes over the data)"}
    )
    epochs: int = field(default=8, metadata={"help": "passes over the training data when --max-steps is none"})
    batch_size: int = field(default=32, metadata={"help": "images per process per step (before --views)"})
    views: int = field(default=1, metadata={"help": "augmented views per image (the batch holds batch_size*views)"})
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "optimizer of the prompts: adamw, or sgd with --momentum (POMP)",
            "choices": ("adamw", "sgd"),
        },
    )
    lr: float = field(default=5e-3, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (--optimizer sgd only)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (decoupled for AdamW, L2 for SGD)"})
    warmup: int = field(default=5, metadata={"help": "warmup steps, then cosine decay to zero"})
    warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "warmup length in epochs of the training data (overrides --warmup; POMP: 1); none = --warmup"
        },
    )
    warmup_lr: float | None = field(
        default=None,
        metadata={
            "help": "constant learning rate during warmup (POMP/Dassl 'constant' warmup: 1e-5); none = linear "
            "warmup from 0 to --lr"
        },
    )
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "after warmup: cosine (per step, to zero at the end) or epoch-cosine (Dassl's, as POMP trains: "
            "constant within an epoch, epoch e after W warmup epochs at lr * (1 + cos(pi * (e - W) / epochs)) / 2)",
            "choices": ("cosine", "epoch-cosine"),
        },
    )
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this (none = off)"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes per rank"})
    decode_on_device: bool = field(
        default=False,
        metadata={
            "help": "data workers only read file bytes; JPEGs are decoded on the training device (nvJPEG through "
            "torchvision's decode_jpeg on a GPU) and augmented there with the same random draws as the PIL path "
            "(torch's resampling); for image folders, ImageNet-21K trees, indices and file lists"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling, augmentation, class sampling"})
    # logging and checkpoints
    log_every: int = field(default=5, metadata={"help": "write a JSON-lines metrics record every N steps"})
    save_every: int = field(default=50, metadata={"help": "write checkpoints every N steps (and at the end)"})
    resume: str | None = field(
        default=None,
        metadata={
            "help": "continue from a training state: a train_state.pt file or run directory; "
            "`--resume` alone = the --output directory",
            "const": "latest",
        },
    )
    tensorboard: bool = field(default=True, metadata={"help": "also log to TensorBoard when it is installed"})
    eval_batch_size: int = field(default=64, metadata={"help": "images per process per evaluation step"})
    # reliability
    stall_timeout: float = field(
        default=1800.0,
        metadata={
            "help": "seconds without a finished training step (a stalled or dead torchrun rank, a hung collective) "
            "after which every rank stops cleanly, keeping the last checkpoint for --resume; 0 = never"
        },
    )
    trust_torchscript: str | None = field(
        default=None,
        metadata={
            "help": "a TorchScript archive (OpenAI's CLIP .pt release) you trust: only this file may be loaded with "
            "torch.jit.load, which can run code stored in it; every other file is read as plain tensors"
        },
    )


def _unwrap(tp: Any) -> tuple[Any, bool, tuple | None]:
    """(base type, accepts None, Literal choices) of a field annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), optional, choices
    return tp, optional, None


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(value: Any, f: dataclasses.Field, tp: Any) -> Any:
    """Convert a CLI string or YAML value to the field's type; UserError naming the option if it does not fit."""
    base, optional, choices = _unwrap(tp)
    choices = f.metadata.get("choices", choices)
    bad = UserError(f"invalid value {value!r} for {_option(f.name)}: expected {_describe(base, optional, choices)}")
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS and base is not str):
        if optional:
            return None
        raise bad
    if isinstance(value, str) and optional and base is str and value.strip().lower() in ("none", "null"):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad
    elif base is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(out):  # inf/nan are never a meaningful setting: reject them before anything runs
            raise UserError(f"invalid value {value!r} for {_option(f.name)}: must be a finite number")
    elif base is str:
        if isinstance(value, (dict, list)):
            raise bad
        out = str(value)
    else:
        out = value
    if choices is not None and out not in choices:
        raise bad
    return out


def _describe(base: Any, optional: bool, choices: tuple | None) -> str:
    text = "one of " + ", ".join(map(str, choices)) if choices else getattr(base, "__name__", str(base))
    return text + (" or none" if optional else "")


def _fields(classes: list[type]) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    out: dict[str, tuple[type, dataclasses.Field, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise TypeError(f"option {f.name!r} is defined by both {out[f.name][0].__name__} and {cls.__name__}")
            out[f.name] = (cls, f, hints[f.name])
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, no multi-line usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see --help)")


def build_parser(
    classes: list[type],
    prog: str,
    description: str,
    defaults: dict | None = None,
    tool: str | None = None,
    recipe_from: str | None = None,
) -> _Parser:
    """argparse parser with one option per dataclass field; values stay unset (SUPPRESS) unless given. With ``tool``
    (e.g. ``"rpp.train"``) it also takes ``--recipe NAME`` and ``--print-config`` (see :mod:`rpp.recipes`)."""
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of options (keys as the option names); command-line options override it",
    )
    if tool is not None:
        from rpp.recipes import list_recipes

        parser.add_argument(
            "--recipe",
            metavar="NAME",
            help="start from a published recipe shipped in rpp/recipes (then --config, then command-line options "
            f"override it): {', '.join(list_recipes(recipe_from or tool)) or 'none'}"
            + (f" (recipes of python -m {recipe_from}: the options this command has)" if recipe_from else ""),
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved options (a YAML file --config accepts) and exit",
        )
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base, optional, choices = _unwrap(hints[f.name])
            choices = f.metadata.get("choices", choices)
            default = (defaults or {}).get(f.name, _default(f))
            help_text = f.metadata.get("help", "")
            help_text += f" (default: {default})" if default is not None else " (default: none)"
            if choices:
                help_text += f" [{', '.join(map(str, choices))}{', none' if optional else ''}]"
            kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "dest": f.name}
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                if base in (int, float):
                    kwargs["metavar"] = "N"
                if "const" in f.metadata:
                    kwargs.update(nargs="?", const=f.metadata["const"])
            group.add_argument(_option(f.name), **kwargs)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"cannot parse config file {path}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse(
    classes: list[type],
    argv: list[str] | None,
    prog: str,
    description: str,
    defaults: dict[str, Any] | None = None,
    tool: str | None = None,
    recipe_from: str | None = None,
) -> list[Any]:
    """Instances of `classes` from defaults < `defaults` < `--recipe` < YAML `--config` < CLI options, all
    type-checked. With ``tool``, ``--recipe NAME`` loads that tool's recipe and ``--print-config`` prints the
    resolved options as YAML and exits (SystemExit(0), like ``--help``). ``recipe_from``: take the recipes of that
    tool instead (e.g. rpp.teacher_cache uses rpp.train's), keeping only the options this command has."""
    parser = build_parser(classes, prog, description, defaults, tool, recipe_from)
    ns = parser.parse_args(argv)
    fields = _fields(classes)
    values: dict[str, Any] = dict(defaults or {})
    recipe = getattr(ns, "recipe", None)
    if recipe is not None:
        from rpp.recipes import load_recipe

        for key, value in load_recipe(recipe, recipe_from or tool).items():
            if key not in fields and recipe_from is not None:
                continue
            if key not in fields:
                raise UserError(f"--recipe {recipe}: unknown option {key!r} for python -m {tool}")
            values[key] = value
    config_file = getattr(ns, "config", None)
    if config_file:
        for key, value in load_yaml(config_file).items():
            if key not in fields:
                raise UserError(f"unknown option {key!r} in config file {config_file}")
            values[key] = value
    values.update({k: v for k, v in vars(ns).items() if k not in ("config", "recipe", "print_config")})
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in values.items():
        cls, f, tp = fields[key]
        kwargs[cls][key] = _convert(value, f, tp)
    out = [cls(**kwargs[cls]) for cls in classes]
    if getattr(ns, "print_config", False):
        sources = (
            ["defaults"] + [f"recipe {recipe}"] * (recipe is not None) + [f"--config {config_file}"] * bool(config_file)
        )
        print(f"# python -m {tool}: resolved options ({' < '.join(sources + ['command line'])})")
        resolved = {k: v for obj in out for k, v in dataclasses.asdict(obj).items()}
        print(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False), end="")
        raise SystemExit(0)
    return out


def validate(cfg: TrainConfig) -> None:
    """Range checks the type system does not express; UserError names the option and the value."""
    positive = ["epochs", "batch_size", "views", "log_every", "save_every", "eval_batch_size"]
    for name in positive + ["max_steps", "shots"]:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"invalid value {value} for {_option(name)}: must be positive")
    for name in ["num_workers", "warmup"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"invalid value {getattr(cfg, name)} for {_option(name)}: must be >= 0")
    if math.isnan(cfg.lr) or cfg.lr <= 0:
        raise UserError(f"invalid value {cfg.lr} for --lr: must be positive")
    if math.isnan(cfg.weight_decay) or cfg.weight_decay < 0:
        raise UserError(f"invalid value {cfg.weight_decay} for --weight-decay: must be >= 0")
    if cfg.stall_timeout < 0:
        raise UserError(f"invalid value {cfg.stall_timeout} for --stall-timeout: must be >= 0 (0 = no watchdog)")
    if cfg.data is not None and not cfg.data.strip():
        raise UserError("invalid value '' for --data: expected a dataset path (omit --data for the built-in data)")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise UserError(f"invalid value {cfg.grad_clip} for --grad-clip: must be positive or none")
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise UserError(f"invalid value {cfg.momentum} for --momentum: must be in [0, 1)")
    if cfg.warmup_epochs is not None and not (math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0):
        raise UserError(f"invalid value {cfg.warmup_epochs} for --warmup-epochs: must be >= 0 or none")
    if cfg.warmup_lr is not None and not (math.isfinite(cfg.warmup_lr) and cfg.warmup_lr > 0):
        raise UserError(f"invalid value {cfg.warmup_lr} for --warmup-lr: must be positive or none")
    if cfg.data is None and cfg.data_format not in (None, "builtin"):
        raise UserError(f"--data-format {cfg.data_format} needs --data PATH")
