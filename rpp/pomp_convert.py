"""Convert POMP's released prompt checkpoints to rpp's prompts format:
`python -m rpp.pomp_convert --checkpoint vit_b16_ep5_..._seed42.pth.tar --output pomp-nctx4.pt`.

POMP (amazon-science/prompt-pretraining, docs/MODELS.md) releases its ImageNet-21K prompts as Dassl checkpoints:
``{"state_dict": {"ctx": [n_ctx, 512], ...}, "epoch": ..., "optimizer": ..., "scheduler": ...}`` saved with
``torch.save``; the prompt is ``ctx`` (the prompt learner's other entries are token-embedding buffers it recomputes).
POMP's text prompt is CoOp's: ``[SOS] ctx <class name> . [EOT]`` through OpenAI's ViT-B/16 text tower, which is
``--text-prompt pomp`` here, so the converted file evaluates with ``python -m rpp.eval`` or ``--suite pomp``.

Reading: ``torch.load(weights_only=True)`` first. Dassl's checkpoints may also hold its scheduler objects, which that
refuses; the file is then read again by torch's own weights-only unpickler with every class or function outside
torch's allowlist mapped to an inert placeholder (``safe_globals`` under the name the file uses): nothing in the file
is imported or called, and only ``state_dict["ctx"]`` is used.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rpp import checkpoint, distributed
from rpp.config import parse
from rpp.errors import UserError

__all__ = ["ConvertConfig", "convert", "read_pomp_checkpoint"]

PLACEHOLDER_CLASSNAMES = ["(POMP ImageNet-21K-P classes, not recorded by the converter)"]


class _Inert:
    """What any global outside torch's allowlist becomes: takes any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_with_inert_globals(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every global the file names outside torch's allowlist mapped to
    :class:`_Inert`: torch's own restricted unpickler does the reading, so nothing in the file is imported or run."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_pomp_checkpoint(path: str | Path) -> tuple[torch.Tensor, int | None]:
    """``(ctx [n_ctx, W] float32, epoch or None)`` from a POMP / CoOp (Dassl) prompt-learner checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint: POMP checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # Dassl scheduler objects and the like: read with inert placeholders instead
        try:
            obj = _load_with_inert_globals(path)
        except pickle.UnpicklingError as e:  # names a module torch never unpickles (os, subprocess, ...): refused
            detail = checkpoint._unpickler_detail(str(e))
            raise UserError(f"refusing to read POMP checkpoint {path}: {detail}") from None
        except Exception as e:  # noqa: BLE001 - corrupt or not a torch file
            raise UserError(f"cannot read POMP checkpoint {path}: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - corrupt or not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read POMP checkpoint {path}: {type(e).__name__}: {first}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a POMP checkpoint: expected a dict with a 'state_dict'")
    state = {k.removeprefix("module.").removeprefix("prompt_learner."): v for k, v in state.items()}
    ctx = state.get("ctx")
    if not isinstance(ctx, torch.Tensor) or not ctx.is_floating_point():
        raise UserError(f"{path} holds no prompt: expected state_dict['ctx'], a float tensor [n_ctx, width]")
    if ctx.dim() == 3:
        raise UserError(f"{path}: class-specific contexts (CSC, ctx {list(ctx.shape)}) are not supported")
    if ctx.dim() != 2 or not torch.isfinite(ctx).all():
        raise UserError(f"{path}: ctx must be a finite [n_ctx, width] tensor, got shape {list(ctx.shape)}")
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return ctx.float().contiguous(), epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


@dataclass
class ConvertConfig:
    checkpoint: str | None = field(
        default=None, metadata={"help": "POMP's released prompt checkpoint (.pth.tar), or any Dassl CoOp/POMP one"}
    )
    output: str = field(default="pomp-prompts.pt", metadata={"help": "the rpp prompts checkpoint to write"})
    model: str = field(
        default="ViT-B-16", metadata={"help": "open_clip model the prompts were trained for (POMP: ViT-B/16)"}
    )
    pretrained: str | None = field(
        default=None,
        metadata={
            "help": "student weights to record (OpenAI's ViT-B-16.pt for POMP); rpp.eval --pretrained can "
            "give or replace it"
        },
    )
    classnames: str | None = field(
        default=None, metadata={"help": "training class names to record (one per line); none = a placeholder"}
    )


def convert(cfg: ConvertConfig) -> dict:
    """The rpp prompts checkpoint (a dict, see :mod:`rpp.checkpoint`) for ``cfg``; written to ``cfg.output``."""
    from rpp.data import read_classnames
    from rpp.method import MethodConfig

    if cfg.checkpoint is None:
        raise UserError("--checkpoint is required (POMP's .pth.tar prompt file)")
    ctx, epoch = read_pomp_checkpoint(cfg.checkpoint)
    mcfg = MethodConfig(
        model=cfg.model, pretrained=cfg.pretrained, teacher=None, text_prompt="pomp", n_ctx=ctx.shape[0],
        vision_prompts=0, sampling="pomp", correction_log10=True, kd_weight=0.0, ce_weight=1.0,
    )  # fmt: skip
    names = read_classnames(cfg.classnames)[0] if cfg.classnames else PLACEHOLDER_CLASSNAMES
    out = {
        "format": checkpoint.PROMPTS_FORMAT,
        "version": checkpoint.SCHEMA_VERSION,
        "step": epoch or 0,
        "seed": 0,
        "prompts": {"text.ctx": ctx},
        "method_config": asdict(mcfg),
        "classnames": names,
    }
    output = Path(cfg.output)
    checkpoint.validate_prompts(out, output, "converted prompt checkpoint")
    if output.is_dir():
        raise UserError(f"--output {output} is a directory: expected a file path")
    checkpoint.atomic_save(out, output)
    return out


def main(argv: list[str] | None = None) -> int:
    return distributed.cli_main("rpp.pomp_convert", run, argv)


def run(argv: list[str] | None = None) -> int:
    (cfg,) = parse([ConvertConfig], argv, prog="python -m rpp.pomp_convert", description=__doc__.split("\n\n")[0])
    out = convert(cfg)
    ctx = out["prompts"]["text.ctx"]
    print(
        f"rpp.pomp_convert: {cfg.checkpoint} -> {cfg.output}: ctx {list(ctx.shape)} (epoch {out['step']}), "
        f"model {cfg.model}, text prompt pomp; evaluate with python -m rpp.eval --checkpoint {cfg.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
