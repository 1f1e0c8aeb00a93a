"""open_clip models from local files only: tiny built-in configs, OpenAI TorchScript archives, clear errors."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn as nn

from rpp.checkpoint import check_torchscript_trusted
from rpp.errors import UserError

__all__ = ["TINY_MODELS", "check_weights_given", "load_clip", "register_tiny_models"]

logger = logging.getLogger(__name__)


def _tiny_config(embed_dim: int, width: int, layers: int, heads: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": 32,
            "layers": layers,
            "width": width,
            "patch_size": 8,
            "head_width": width // heads,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


# Random-weight configs small enough for CPU tests and the embedded default run (32 px images, 16 patches).
TINY_MODELS = {
    "rpp-tiny": _tiny_config(embed_dim=64, width=64, layers=2, heads=2),
    "rpp-tiny-teacher": _tiny_config(embed_dim=96, width=96, layers=3, heads=3),
}


def register_tiny_models() -> None:
    """Register ``rpp-tiny`` (student) and ``rpp-tiny-teacher`` with open_clip (idempotent).

    Written as JSON config files to a temporary folder and added through ``open_clip.add_model_config``.
    """
    missing = {name: cfg for name, cfg in TINY_MODELS.items() if name not in open_clip.list_models()}
    if not missing:
        return
    folder = Path(tempfile.mkdtemp(prefix="rpp-open-clip-configs-"))
    for name, cfg in missing.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's CLIP releases are TorchScript zip archives (they hold ``constants.pkl`` and a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _load_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # OpenAI ships TorchScript; torch.jit.load's deprecation is not the user's to fix
        warnings.simplefilter("ignore", FutureWarning)
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    # Scalars OpenAI's archives carry, and the causal mask (a non-persistent buffer in open_clip, rebuilt at init).
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state_dict.pop(key, None)
    return {k: v.float() for k, v in state_dict.items()}


def check_weights_given(name: str, pretrained: str | None, role: str, allow_random: bool) -> None:
    """No silent random weights: ``pretrained`` None is allowed only for the built-in demo models (:data:`TINY_MODELS`,
    which exist only with random weights) or with ``allow_random``; both are logged. Else :class:`UserError`."""
    if pretrained is not None:
        return
    if name in TINY_MODELS:
        logger.warning(
            "%s none: %s is a built-in demo model with random weights (the embedded demo, not CLIP)", role, name
        )
    elif allow_random:
        logger.warning("%s none: %s has RANDOM weights (--allow-random-weights): results mean nothing", role, name)
    else:
        raise UserError(
            f"{role}: no weights file for model {name!r} (give a local open_clip or OpenAI checkpoint; random "
            "weights only with --allow-random-weights, for tests)"
        )


def load_clip(
    name: str, pretrained: str | None, *, role: str = "model", allow_random: bool = False
) -> tuple[nn.Module, object, object]:
    """Create open_clip model ``name`` on CPU in fp32 with weights from the local file ``pretrained``.

    ``pretrained`` None: random weights, allowed only for the built-in demo models or with ``allow_random`` (see
    :func:`check_weights_given`), else a :class:`UserError`.

    Returns ``(model, preprocess_train, preprocess_val)``. OpenAI TorchScript archives (``ViT-B-16.pt`` from the
    OpenAI release) are detected and loaded with QuickGELU, as those weights were trained with it; for OpenAI weights
    saved as a plain state dict use a ``-quickgelu`` model name (e.g. ``ViT-B-16-quickgelu``). Raises
    :class:`UserError` for an unknown model name, a missing file or weights that do not load. ``role`` names the
    option in the messages (``"--pretrained"``, ``"--teacher-pretrained"``).
    """
    register_tiny_models()
    if name not in open_clip.list_models():
        option = {"--pretrained": "--model", "--teacher-pretrained": "--teacher"}.get(role, role)
        raise UserError(f"{option}: unknown open_clip model {name!r}; choose one of open_clip.list_models()")
    check_weights_given(name, pretrained, role, allow_random)
    kwargs: dict = {}
    state_dict = None
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if path.is_dir():
            raise UserError(f"{role}: {str(path)!r} is a directory, expected the weights file for model {name!r}")
        if not path.is_file():
            raise UserError(f"{role}: weights file {str(path)!r} for model {name!r} not found (expected a local file)")
        if _is_torchscript_archive(path):
            check_torchscript_trusted(path, role)  # torch.jit.load can run code: only on --trust-torchscript FILE
            try:
                state_dict = _load_torchscript_state_dict(path)
            except Exception as exc:  # noqa: BLE001 - any failure to read the archive is the user's file
                raise UserError(f"{role}: cannot read TorchScript archive {str(path)!r}: {exc}") from exc
            kwargs["force_quick_gelu"] = True
        else:
            kwargs["pretrained"] = str(path)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or mismatched weights: report, don't trace back
        detail = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0]}" if str(exc).strip() else "")
        raise UserError(f"{role}: cannot load weights {pretrained!r} into open_clip model {name!r}: {detail}") from exc
    model.eval().requires_grad_(False)
    return model, preprocess_train, preprocess_val
