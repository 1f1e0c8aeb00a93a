"""Zero-shot evaluation: `python -m rpp.eval --checkpoint prompts.pt --data FOLDER [--classnames FILE]`.

Top-1/top-5 accuracy with the learned prompts next to the hand-written template ("a photo of a {}.") on the same
images. Distributed-safe under torchrun: every image is evaluated by exactly one rank and the counts are all-reduced.
The model configuration comes from the checkpoint; `--pretrained` points at the student weights when they moved.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from rpp import checkpoint, data, distributed
from rpp.config import DATA_FORMATS, parse
from rpp.errors import UserError

EVAL_FORMATS = tuple(f for f in DATA_FORMATS if f != "webdataset")


@torch.no_grad()
def evaluate(method, loader, device: torch.device, classnames: list[str] | None = None) -> dict:
    """{"images": N, "skipped_images": S, "learned": {"top1", "top5"}, "template": {"top1", "top5"}} (accuracies
    in %), summed over ranks; N counts the readable images, S the corrupt ones. `classnames` defaults to the
    method's classes."""
    # images, learned top1/top5, template top1/top5, corrupt images
    counts = torch.zeros(6, dtype=torch.float64, device=device)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for images, labels, _, skipped in tqdm(loader, desc="eval", disable=not rank0, leave=False):
        # An item with skipped > 0 stands in for a corrupt image with the next readable one, which is also evaluated
        # at its own position: drop it so every readable image counts exactly once.
        readable = skipped == 0
        counts[5] += (~readable).sum()
        if not readable.all():
            images, labels = images[readable], labels[readable]
        if not len(labels):
            continue
        labels = labels.to(device)
        counts[0] += len(labels)
        for j, learned in enumerate((True, False)):
            logits = method.zero_shot_logits(images, classnames, learned=learned)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top == labels[:, None]
            counts[1 + 2 * j] += hits[:, 0].sum()
            counts[2 + 2 * j] += hits.any(dim=-1).sum()
    distributed.all_reduce(counts)
    n = int(counts[0].item())
    pct = [100.0 * c / max(n, 1) for c in counts.tolist()]
    return {
        "images": n,
        "skipped_images": int(counts[5].item()),
        "learned": {"top1": pct[1], "top5": pct[2]},
        "template": {"top1": pct[3], "top5": pct[4]},
    }


def format_results(results: dict, what: str) -> str:
    learned, template = results["learned"], results["template"]
    skipped = f"\n  skipped {results['skipped_images']} corrupt image(s)" if results.get("skipped_images") else ""
    return (
        f"zero-shot on {what}:\n"
        f"  learned prompts     top-1 {learned['top1']:6.2f}%  top-5 {learned['top5']:6.2f}%\n"
        f"  'a photo of a {{}}.'  top-1 {template['top1']:6.2f}%  top-5 {template['top5']:6.2f}%" + skipped
    )


@dataclass
class EvalConfig:
    checkpoint: str | None = field(
        default=None, metadata={"help": "prompts-only checkpoint (prompts.pt) or a run directory holding one"}
    )
    data: str | None = field(
        default=None, metadata={"help": "image folder or ImageNet-21K synset tree; none = built-in held-out split"}
    )
    data_format: str | None = field(
        default=None, metadata={"help": "data layout; none = infer from --data", "choices": EVAL_FORMATS}
    )
    classnames: str | None = field(
        default=None, metadata={"help": "class names file (one per line, or words.txt lines); none = folder names"}
    )
    pretrained: str | None = field(
        default=None, metadata={"help": "student weights file; none = the path stored in the checkpoint"}
    )
    batch_size: int = field(default=64, metadata={"help": "images per process per step"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes per rank"})
    output: str | None = field(default=None, metadata={"help": "also write the results as JSON to this file"})
    suite: str | None = field(
        default=None,
        metadata={
            "help": "evaluate a protocol instead of --data: pomp = POMP's/CoOp's (ImageNet-21K-P val, ImageNet, 10 "
            "cross-dataset sets, ImageNet-V2/Sketch/A/R) from --data-root; see rpp/eval_suite.py",
            "choices": ("pomp",),
        },
    )
    data_root: str | None = field(
        default=None, metadata={"help": "--suite: folder holding the datasets in CoOp's layout (missing ones skipped)"}
    )
    trust_torchscript: str | None = field(
        default=None,
        metadata={
            "help": "a TorchScript archive (OpenAI's CLIP .pt release) you trust as --pretrained: only this file may "
            "be loaded with torch.jit.load, which can run code stored in it"
        },
    )


def main(argv: list[str] | None = None) -> int:
    return distributed.cli_main("rpp.eval", run, argv)


def run(argv: list[str] | None = None) -> int:
    from rpp.method import MethodConfig, RPPMethod, register_tiny_models

    (cfg,) = parse([EvalConfig], argv, prog="python -m rpp.eval", description=__doc__.split("\n\n")[0])
    if cfg.checkpoint is None:
        raise UserError("--checkpoint is required (the prompts.pt a training run wrote)")
    if cfg.batch_size <= 0:
        raise UserError(f"invalid value {cfg.batch_size} for --batch-size: must be positive")
    if cfg.num_workers < 0:
        raise UserError(f"invalid value {cfg.num_workers} for --num-workers: must be >= 0")
    if cfg.data is not None and not cfg.data.strip():
        raise UserError("invalid value '' for --data: expected an image folder (omit --data for the built-in data)")
    checkpoint.trust_torchscript(cfg.trust_torchscript)
    if cfg.output is not None and Path(cfg.output).is_dir():
        raise UserError(f"--output {cfg.output} is a directory: expected a JSON file path")
    if cfg.output is not None and not Path(cfg.output).parent.is_dir():
        raise UserError(f"--output {cfg.output}: directory {Path(cfg.output).parent} not found")
    try:
        path, ckpt = checkpoint.resolve_prompts(cfg.checkpoint)
    except UserError as e:
        raise UserError(f"--checkpoint: {e}") from None
    known = {f.name for f in dataclasses.fields(MethodConfig)}
    mcfg = MethodConfig(**{k: v for k, v in ckpt["method_config"].items() if k in known})
    mcfg.teacher = None  # evaluation needs no teacher
    mcfg.kd_weight, mcfg.ce_weight = 0.0, 1.0
    if cfg.pretrained is not None:
        mcfg.pretrained = cfg.pretrained
    try:
        mcfg.validate()
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: its method_config is invalid: {e}") from None
    register_tiny_models()
    info = distributed.init()
    if cfg.suite is not None:
        from rpp.eval_suite import run_suite

        return run_suite(cfg, mcfg, ckpt, path, info)

    fmt = cfg.data_format or data.infer_format(cfg.data)
    if fmt == "webdataset":
        raise UserError("rpp.eval reads image folders (imagefolder / imagenet21k layouts), not webdataset shards")
    spec = data.resolve(cfg.data, fmt, cfg.classnames, ckpt["seed"])  # built-in data: the training run's split
    source = spec.eval_source if fmt == "builtin" else spec.source
    # The training run's seed: a random-weight student (test models) is rebuilt exactly, so every evaluation of a
    # checkpoint gives the same accuracy.
    torch.manual_seed(ckpt["seed"])
    method = RPPMethod(mcfg, spec.classnames, info.device)
    try:
        method.load_prompt_state_dict(ckpt["prompts"])
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} does not fit model {mcfg.model!r}: {type(e).__name__}: {first}") from None
    loader = data.eval_loader(source, method.preprocess_val, cfg.batch_size, info.rank, info.world, cfg.num_workers)
    results = evaluate(method, loader, info.device)
    results.update(checkpoint=str(path), data=cfg.data or "builtin:val", classes=len(spec.classnames))
    if info.is_main:
        print(format_results(results, f"{results['data']} ({results['images']} images, {results['classes']} classes)"))
        if cfg.output:
            with open(cfg.output, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
