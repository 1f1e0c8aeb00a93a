"""The frozen CLIP teacher: zero-shot class embeddings for all classes (computed once, cached on disk) and top-k.

Class embeddings at ImageNet-21K size (21,841 classes x 7 templates = 153k texts through the teacher's text tower)
are computed once per job: on rank 0, batched (bf16 on GPU), with a progress bar, then broadcast to the other
ranks; and once per cache directory: saved under a key of the teacher (model name plus weights file path, size and
mtime, or for random weights a digest of the weights, which is what a seed determines), the class names and the
templates, so later runs reuse them and different teachers keep their own tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from tqdm import tqdm

from rpp.checkpoint import atomic_save
from rpp.errors import UserError
from rpp.models import load_clip

__all__ = ["TEMPLATES", "Teacher", "encode_class_names"]

# Hand-written prompt ensembles: "single" is CLIP's "a photo of a {}.", "simple" open_clip's 7 templates,
# "openai" the 80 ImageNet templates of the CLIP paper.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "simple": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
    "openai": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


@torch.no_grad()
def encode_class_names(
    model: torch.nn.Module,
    tokenizer,
    classnames: list[str],
    templates: tuple[str, ...],
    device: torch.device,
    chunk_size: int = 1024,
    progress: bool = False,
) -> torch.Tensor:
    """Unit-norm zero-shot class embeddings ``[C, E]`` (fp32): each template's text embedding normalised, averaged
    over templates, normalised again (CLIP's prompt ensembling). Runs in chunks of about ``chunk_size`` texts (whole
    classes), with a progress bar over classes when ``progress``."""
    per_chunk = max(1, chunk_size // len(templates))
    out = []
    bar = tqdm(total=len(classnames), desc="teacher class embeddings", unit="class", disable=not progress,
               dynamic_ncols=True, delay=1)  # fmt: skip
    for start in range(0, len(classnames), per_chunk):
        names = classnames[start : start + per_chunk]
        texts = [t.replace("{}", n) for n in names for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(dim=1)
        out.append(F.normalize(emb, dim=-1))
        bar.update(len(names))
    bar.close()
    return torch.cat(out)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes): identifies random weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)))
    return h.hexdigest()[:24]


def _cache_key(model_name: str, weights: list, classnames: list[str], templates: tuple[str, ...]) -> str:
    blob = json.dumps({"model": model_name, "weights": weights, "classes": classnames, "templates": templates})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _file_weights(pretrained: str) -> list:
    stat = os.stat(pretrained)
    return [os.path.abspath(pretrained), stat.st_size, stat.st_mtime_ns]


class Teacher:
    """A frozen open_clip teacher in no-grad inference (bf16 weights on GPU, fp32 on CPU).

    Not an ``nn.Module`` on purpose: it is never trained, never wrapped by DDP and never saved with the prompts.
    ``class_embeds`` ``[C, Et]`` (unit norm, fp32) are computed once for all classes with the hand-written template
    ensemble (on rank 0 under torch.distributed, then broadcast) and cached in ``cache_dir`` under a hash of the model
    name, the weights (file path, size and mtime; for random weights a digest of them), the class list and the
    templates. ``class_embeds_info`` says where they came from ("computed", "cache", "broadcast") and how long it took.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        classnames: list[str],
        device: torch.device,
        *,
        templates: str = "simple",
        cache_dir: str | Path | None = None,
        allow_random: bool = False,
    ):
        if templates not in TEMPLATES:
            raise UserError(f"--teacher-templates: expected one of {sorted(TEMPLATES)}, got {templates!r}")
        self.device = torch.device(device)
        model, _, _ = load_clip(model_name, pretrained, role="--teacher-pretrained", allow_random=allow_random)
        # Random weights (test models) are identified by their content, which is what seeding them determines.
        weights = _file_weights(pretrained) if pretrained is not None else ["random", weights_digest(model)]
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype)
        self.image_size = tuple(model.visual.image_size)
        self.logit_scale = model.logit_scale.exp().item()
        t0 = time.perf_counter()
        path = None
        if cache_dir is not None:
            key = _cache_key(model_name, weights, classnames, TEMPLATES[templates])
            path = Path(cache_dir) / f"teacher-class-embeds-{model_name}-{key}.pt"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            embeds, how = self._broadcast_class_embeds(model_name, classnames, TEMPLATES[templates], path)
        else:
            embeds, how = self._class_embeds(model_name, classnames, TEMPLATES[templates], path)
        self.class_embeds = embeds
        self.class_embeds_info = {
            "source": how, "seconds": time.perf_counter() - t0, "classes": len(classnames),
            "templates": len(TEMPLATES[templates]), "path": None if path is None else str(path),
        }  # fmt: skip

    def _class_embeds(self, model_name, classnames, templates, path: Path | None) -> tuple[torch.Tensor, str]:
        if path is not None and path.is_file():
            try:  # derived data: a torn, foreign or poisoned file (never unpickled) is recomputed, not trusted
                embeds = torch.load(path, map_location=self.device, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable cache file means "recompute"
                warnings.warn(f"ignoring unreadable class-embedding cache {path} ({type(e).__name__}); recomputing",
                              stacklevel=2)  # fmt: skip
                embeds = None
            if isinstance(embeds, torch.Tensor) and embeds.ndim == 2 and embeds.shape[0] == len(classnames):
                return embeds.float(), "cache"
        tokenizer = open_clip.get_tokenizer(model_name)
        progress = not dist.is_initialized() or dist.get_rank() == 0
        embeds = encode_class_names(self.model, tokenizer, classnames, templates, self.device, progress=progress)
        if path is not None:
            atomic_save(embeds.cpu(), path)  # concurrent jobs or an interrupted run never leave a torn file
        return embeds, "computed"

    def _broadcast_class_embeds(self, model_name, classnames, templates, path) -> tuple[torch.Tensor, str]:
        """Rank 0 loads or computes; the others receive the table (no rank repeats the text-tower work)."""
        if dist.get_rank() == 0:
            embeds, how = self._class_embeds(model_name, classnames, templates, path)
            shape = [list(embeds.shape)]
        else:
            embeds, how, shape = None, "broadcast", [None]
        dist.broadcast_object_list(shape, src=0, device=self.device if self.device.type == "cuda" else None)
        if embeds is None:
            embeds = torch.empty(shape[0], dtype=torch.float32, device=self.device)
        embeds = embeds.to(self.device, torch.float32).contiguous()
        dist.broadcast(embeds, src=0)
        return embeds, how

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm teacher image features ``[B, Et]`` (fp32); images are resized if the teacher's size differs."""
        images = images.to(self.device)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        return F.normalize(self.model.encode_image(images.to(self.dtype)).float(), dim=-1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot teacher logits ``[B, C]`` over all classes (fp32)."""
        return self.logit_scale * self.image_features(images) @ self.class_embeds.T

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-``k`` classes ``[B, k]`` (int64, global ids) and their probabilities ``[B, k]``: the
        softmax of ``logits / temperature`` truncated to the top ``k`` and renormalised (= softmax over those k)."""
        values, indices = self.logits(images).topk(min(k, self.class_embeds.shape[0]), dim=-1)
        return indices, torch.softmax(values / temperature, dim=-1)
