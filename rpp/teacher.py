"""The frozen CLIP teacher: zero-shot class embeddings for all classes (computed once, cached on disk) and top-k."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

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
) -> torch.Tensor:
    """Unit-norm zero-shot class embeddings ``[C, E]`` (fp32): each template's text embedding normalised, averaged
    over templates, normalised again (CLIP's prompt ensembling). Runs in chunks of ``chunk_size`` texts."""
    out = []
    for start in range(0, len(classnames), max(1, chunk_size // len(templates))):
        names = classnames[start : start + max(1, chunk_size // len(templates))]
        texts = [t.replace("{}", n) for n in names for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(dim=1)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out)


def _cache_key(model_name: str, pretrained: str, classnames: list[str], templates: tuple[str, ...]) -> str:
    stat = os.stat(pretrained)
    weights = [os.path.abspath(pretrained), stat.st_size, stat.st_mtime_ns]
    blob = json.dumps({"model": model_name, "weights": weights, "classes": classnames, "templates": templates})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Teacher:
    """A frozen open_clip teacher in no-grad inference (bf16 weights on GPU, fp32 on CPU).

    Not an ``nn.Module`` on purpose: it is never trained, never wrapped by DDP and never saved with the prompts.
    ``class_embeds`` ``[C, Et]`` (unit norm, fp32) are computed once for all classes with the hand-written template
    ensemble and, for a teacher loaded from a weights file, cached in ``cache_dir`` under a hash of the model name,
    the weights file (path, size, mtime), the class list and the templates.
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
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype)
        self.image_size = tuple(model.visual.image_size)
        self.logit_scale = model.logit_scale.exp().item()
        self.class_embeds = self._class_embeds(model_name, pretrained, classnames, TEMPLATES[templates], cache_dir)

    def _class_embeds(self, model_name, pretrained, classnames, templates, cache_dir) -> torch.Tensor:
        path = None
        # Random weights (no file) differ from run to run unless seeded alike, so only file-backed teachers are cached.
        if cache_dir is not None and pretrained is not None:
            key = _cache_key(model_name, pretrained, classnames, templates)
            path = Path(cache_dir) / f"teacher-class-embeds-{model_name}-{key}.pt"
            if path.is_file():
                return torch.load(path, map_location=self.device, weights_only=True)
        tokenizer = open_clip.get_tokenizer(model_name)
        embeds = encode_class_names(self.model, tokenizer, classnames, templates, self.device)
        if path is not None:
            atomic_save(embeds.cpu(), path)  # concurrent ranks or an interrupted run never leave a torn file
        return embeds

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
