"""The prompt-pretraining method: a frozen open_clip student with learnable prompts, a CLIP teacher, class sampling
and the CE + KD loss.

Per training step (:meth:`RPPMethod.loss`):

1. the teacher's top-k classes and probabilities for the batch (online, or from ``python -m rpp.teacher_cache``);
2. the class set: in-batch labels ∪ teacher top-k ∪ random negatives up to ``classes_per_step`` (POMP), or all classes;
3. text features of those classes through :class:`rpp_kernels.text.SharedPrefixTextEncoder` (gradients reach the
   text prompts), image features through the student's vision tower (with deep vision prompts when enabled);
4. ``ce_weight * CE`` (with POMP's local correction when classes are sampled) ``+ kd_weight * KD`` through
   :func:`rpp_kernels.kd.topk_kd_loss` over the same classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from rpp.errors import UserError
from rpp.losses import ClassSample, corrected_cross_entropy, full_class_set, local_correction, sample_classes
from rpp.models import load_clip, register_tiny_models
from rpp.teacher import TEMPLATES, Teacher, encode_class_names
from rpp_kernels.integrations.open_clip import apply_vision_prompts
from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.text import SharedPrefixTextEncoder

__all__ = ["TEXT_PROMPTS", "MethodConfig", "RPPMethod", "UserError", "register_tiny_models"]

TEXT_PROMPTS = ("rpp", "pomp", "vpt-deep")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MethodConfig:
    model: str = field(
        default="rpp-tiny",
        metadata={"help": "student open_clip model name (e.g. ViT-B-16; rpp-tiny = small random-weight test config)"},
    )
    pretrained: str | None = field(
        default=None,
        metadata={
            "help": "student weights: a local file (open_clip checkpoint, or OpenAI's TorchScript .pt, loaded with "
            "QuickGELU); none = random init"
        },
    )
    teacher: str | None = field(
        default="rpp-tiny-teacher",
        metadata={"help": "teacher open_clip model name (e.g. ViT-L-14); none = no teacher (needs --kd-weight 0)"},
    )
    teacher_pretrained: str | None = field(
        default=None, metadata={"help": "teacher weights: a local file (as --pretrained); none = random init"}
    )
    teacher_templates: str = field(
        default="simple",
        metadata={
            "help": "hand-written templates for the teacher's class embeddings: single ('a photo of a {}.'), "
            "simple (open_clip's 7) or openai (CLIP's 80)",
            "choices": tuple(TEMPLATES),
        },
    )
    text_prompt: str = field(
        default="rpp",
        metadata={
            "help": "text prompts: rpp (unshared per-layer q/k/v prompts, RPP), pomp (shallow context only, "
            "POMP/CoOp), vpt-deep (shared context tokens replaced at each of --text-depth layers)",
            "choices": TEXT_PROMPTS,
        },
    )
    n_ctx: int = field(default=4, metadata={"help": "number of context tokens (16 in POMP/RPP on real models)"})
    ctx_init: str | None = field(
        default=None,
        metadata={"help": "initialise the context from these words (must tokenize to --n-ctx tokens); none = random"},
    )
    text_depth: int = field(
        default=1,
        metadata={
            "help": "text layers with prompts for rpp / vpt-deep, counted from the first (e.g. 9 on ViT-B-16); rpp "
            "needs fewer than the tower's layers, else the context and query prompts reach nothing"
        },
    )
    vision_prompts: int = field(
        default=0, metadata={"help": "prompt tokens per layer on the vision tower (0 = no vision prompts)"}
    )
    vision_depth: int = field(default=2, metadata={"help": "vision layers with prompts (when --vision-prompts > 0)"})
    vision_unshared_qkv: bool = field(
        default=True,
        metadata={"help": "vision prompts with separate key and value rows per layer (RPP); false = shared VPT-deep"},
    )
    classes_per_step: int | None = field(
        default=1000,
        metadata={
            "help": "classes per step: in-batch labels + teacher top-k + random negatives up to this many (POMP); "
            "all = the full class set"
        },
    )
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the distillation (KD) term"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the cross-entropy (CE) term"})
    kd_topk: int | None = field(
        default=100, metadata={"help": "teacher distribution truncated to its top-k classes; none = full distribution"}
    )
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature T (loss scaled by T^2)"})
    local_correction: bool = field(
        default=True,
        metadata={"help": "POMP's local correction log((C-1)/(K-1)) on sampled negative logits in the CE term"},
    )
    correction_log10: bool = field(
        default=False,
        metadata={"help": "compute the local correction with log10 as POMP's released code does (default: ln)"},
    )
    precision: str = field(
        default="fp32",
        metadata={
            "help": "student autocast dtype (fp16 needs a gradient scaler); the teacher runs no-grad bf16 on GPU",
            "choices": tuple(PRECISIONS),
        },
    )
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute text (and prompted vision) activations in backward"}
    )
    text_chunk_size: int | None = field(
        default=None, metadata={"help": "classes per text-encoder chunk (bounds activation memory); none = no limit"}
    )

    def validate(self) -> None:
        """Raise :class:`UserError` for values no model could accept (model-dependent limits are checked later)."""
        for f in fields(self):  # the CLI/YAML parser checks these too; this covers direct construction
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{f.name.replace('_', '-')}: expected one of {', '.join(choices)}, got {value!r}")
        for name in ("n_ctx", "text_depth"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("vision_prompts", "vision_depth"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        for name in ("classes_per_step", "kd_topk", "text_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 1 or none/all, got {value}")
        if not self.temperature > 0:
            raise UserError(f"--temperature: must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise UserError(
                f"--kd-weight/--ce-weight: need >= 0 and not both 0, got {self.kd_weight}, {self.ce_weight}"
            )


class RPPMethod(nn.Module):
    """Frozen open_clip student + learnable prompts + (optional) frozen teacher; see the module docstring.

    The student's weights are frozen; :meth:`learnable_parameters` are the prompts only (text prompts of
    :class:`~rpp_kernels.text.SharedPrefixTextEncoder`, and vision prompts when ``vision_prompts > 0``). The teacher
    is a plain attribute (not a submodule): never trained, wrapped by DDP, or saved.
    """

    def __init__(
        self, cfg: MethodConfig, classnames: list[str], device: torch.device | str, cache_dir: str | Path | None = None
    ):
        super().__init__()
        cfg.validate()
        if len(classnames) < 1:
            raise UserError("the class list is empty")
        self.cfg = cfg
        self.classnames = list(classnames)
        self.device = torch.device(device)
        self.autocast_dtype = PRECISIONS[cfg.precision]

        clip, self.preprocess_train, self.preprocess_val = load_clip(cfg.model, cfg.pretrained, role="--pretrained")
        self.clip = clip.to(self.device)
        if not isinstance(clip, open_clip.CLIP):
            raise UserError(
                f"--model {cfg.model}: text prompts need an open_clip CLIP with its own causal text transformer, "
                f"got {type(clip).__name__} (HF or custom text towers are not supported)"
            )
        text_layers = len(clip.transformer.resblocks)
        # RPP's prompt rows take q/k/v from their own prompts in layers < depth, so the rows' hidden state (started by
        # ctx and updated through the q prompts) is read only by a layer >= depth: there must be one.
        max_depth = text_layers - 1 if cfg.text_prompt == "rpp" else text_layers
        if cfg.text_prompt != "pomp" and cfg.text_depth > max_depth:
            raise UserError(
                f"--text-depth: at most {max_depth} for {cfg.text_prompt} prompts on {cfg.model} "
                f"({text_layers} text layers), got {cfg.text_depth}"
            )
        deep_prompts = 0 if cfg.text_prompt == "pomp" else cfg.text_depth
        try:
            self.text_encoder = SharedPrefixTextEncoder(
                self.clip,
                cfg.n_ctx,
                ctx_init=cfg.ctx_init,
                deep_prompts=deep_prompts,
                unshared_qkv=cfg.text_prompt == "rpp",
                chunk_size=cfg.text_chunk_size,
                checkpoint=cfg.grad_checkpointing,
            )
        except (TypeError, ValueError) as exc:  # n_ctx too long, ctx_init of the wrong length, unsupported tower
            raise UserError(f"text prompts for {cfg.model}: {exc}") from exc

        self.tokenizer = open_clip.get_tokenizer(cfg.model)  # for the hand-written template

        self.vision_prompts = None
        if cfg.vision_prompts > 0:
            try:
                self.vision_prompts = apply_vision_prompts(
                    self.clip.visual, cfg.vision_prompts, cfg.vision_depth, unshared_qkv=cfg.vision_unshared_qkv
                )
            except (TypeError, ValueError) as exc:  # depth beyond the tower, a ResNet / timm / custom-block tower
                raise UserError(f"--vision-prompts/--vision-depth on {cfg.model}: {exc}") from exc
            if cfg.grad_checkpointing:
                self.clip.visual.set_grad_checkpointing(True)

        self.teacher = None
        if cfg.teacher is not None:
            self.teacher = Teacher(
                cfg.teacher,
                cfg.teacher_pretrained,
                self.classnames,
                self.device,
                templates=cfg.teacher_templates,
                cache_dir=cache_dir,
            )
        self._text_cache: dict[str, tuple[tuple, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------ parameters
    def learnable_parameters(self) -> list[nn.Parameter]:
        """The prompts: the only parameters with ``requires_grad`` (give these to the optimizer and to DDP)."""
        params = list(self.text_encoder.prompt_parameters().values())
        if self.vision_prompts is not None:
            params += list(self.vision_prompts.parameters())
        return params

    def _named_prompts(self) -> dict[str, nn.Parameter]:
        named = {f"text.{n}": p for n, p in self.text_encoder.prompt_parameters().items()}
        if self.vision_prompts is not None:
            named.update({f"vision.{n}": p for n, p in self.vision_prompts.named_parameters()})
        return named

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned prompts by name (``text.ctx``, ``text.prompt_k``, ``vision.k.0`` ...), detached CPU copies."""
        return {n: p.detach().cpu().clone() for n, p in self._named_prompts().items()}

    def load_prompt_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load prompts saved by :meth:`prompt_state_dict`; a key or shape mismatch is a :class:`UserError`."""
        named = self._named_prompts()
        missing, unexpected = sorted(set(named) - set(sd)), sorted(set(sd) - set(named))
        if missing or unexpected:
            raise UserError(
                f"prompt checkpoint does not match this configuration (text prompt {self.cfg.text_prompt}, "
                f"vision prompts {self.cfg.vision_prompts}): missing {missing}, unexpected {unexpected}"
            )
        for name, param in named.items():
            if sd[name].shape != param.shape:
                raise UserError(
                    f"prompt checkpoint: {name} has shape {list(sd[name].shape)}, this model needs {list(param.shape)}"
                )
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(sd[name])

    # ------------------------------------------------------------------------------------------------ features
    def _autocast(self):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def image_features(self, images: torch.Tensor, prompts: bool = True) -> torch.Tensor:
        """Unit-norm student image features ``[B, E]`` (fp32). Without vision prompts no graph is built."""
        images = images.to(self.device, non_blocking=True)
        use_prompts = prompts and self.vision_prompts is not None
        grad = torch.is_grad_enabled() and use_prompts
        with self._autocast(), torch.set_grad_enabled(grad):
            if self.vision_prompts is not None and not use_prompts:
                with self.vision_prompts.disabled():
                    feats = self.clip.encode_image(images)
            else:
                feats = self.clip.encode_image(images)
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, classnames: list[str]) -> torch.Tensor:
        """Unit-norm text features ``[C, E]`` (fp32) of the learned prompts for ``classnames``."""
        with self._autocast():
            feats = self.text_encoder(classnames)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def hand_written_text_features(self, classnames: list[str]) -> torch.Tensor:
        """Unit-norm text features ``[C, E]`` of ``"a photo of a {}."`` through the frozen student."""
        with self._autocast():
            return encode_class_names(self.clip, self.tokenizer, classnames, TEMPLATES["single"], self.device)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach().float()

    # ------------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_topk(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-``k`` classes ``[B, k]`` (int64 global ids) and probabilities ``[B, k]`` (fp32) at the
        configured temperature: ``softmax(logits / T)`` truncated to the top ``k`` and renormalised."""
        if self.teacher is None:
            raise UserError("no teacher configured (--teacher none): cannot compute teacher top-k")
        return self.teacher.topk(images, k, self.cfg.temperature)

    # ------------------------------------------------------------------------------------------------ training
    def _sample(self, labels, generator, teacher_indices) -> ClassSample:
        if self.cfg.classes_per_step is None or self.cfg.classes_per_step >= len(self.classnames):
            return full_class_set(labels, len(self.classnames), teacher_indices)
        return sample_classes(labels, len(self.classnames), self.cfg.classes_per_step, generator, teacher_indices)

    def loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's loss.

        images: ``[B, 3, H, W]`` (transformed); labels: ``[B]`` int64 ids into ``classnames``; generator: drives the
        class sampling (deterministic given its state); teacher_topk: precomputed ``(indices [B, k], probs [B, k])``
        (global ids; probabilities at the configured temperature), else the teacher runs online.
        Returns ``loss`` (scalar to backward) and detached ``ce``, ``kd``, ``acc`` (student top-1 within the step's
        classes) and ``num_classes`` (the step's class count).
        """
        cfg = self.cfg
        need_teacher = cfg.kd_weight > 0
        teacher_feats = None
        if need_teacher and teacher_topk is None:
            if self.teacher is None:
                raise UserError("--kd-weight > 0 needs a teacher (--teacher) or an offline teacher cache")
            if cfg.kd_topk is None:  # the full teacher distribution over the step's classes: fused from features
                teacher_feats = self.teacher.image_features(images)
            else:
                teacher_topk = self.teacher.topk(images, cfg.kd_topk, cfg.temperature)
        sample = self._sample(labels, generator, None if teacher_topk is None else teacher_topk[0])

        image_feats = self.image_features(images)
        text_feats = self.text_features([self.classnames[i] for i in sample.classes.tolist()])
        scale = self.logit_scale()
        targets = sample.targets.to(self.device)

        logits = scale * image_feats @ text_feats.T
        correction = 0.0
        if cfg.local_correction and not sample.is_full:
            correction = local_correction(sample.num_classes, len(sample.classes), cfg.correction_log10)
        ce = corrected_cross_entropy(logits, targets, correction)

        kd = torch.zeros((), device=self.device)
        if need_teacher:
            if teacher_feats is not None:
                # topk_kd_loss applies one logit_scale to both pairs; fold the teacher's own scale into its features.
                teacher_feats = teacher_feats * (self.teacher.logit_scale / scale)
                teacher = (teacher_feats, self.teacher.class_embeds[sample.classes.to(self.device)])
            else:
                teacher = (sample.teacher_positions.to(self.device), teacher_topk[1].to(self.device).float())
            kd = topk_kd_loss(
                image_feats,
                text_feats,
                teacher,
                k=cfg.kd_topk,
                temperature=cfg.temperature,
                logit_scale=scale,
                kd_weight=1.0,
                ce_weight=0.0,
            )
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd
        acc = (logits.detach().argmax(dim=-1) == targets).float().mean()
        return {
            "loss": loss,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "acc": acc,
            "num_classes": torch.tensor(len(sample.classes), device=self.device),
        }

    def forward(self, images, labels, generator, teacher_topk=None) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss`, so that a ``DistributedDataParallel`` wrapper of this module can run the step."""
        return self.loss(images, labels, generator, teacher_topk)

    # ------------------------------------------------------------------------------------------------ evaluation
    def _cached_text_features(self, classnames: list[str], learned: bool) -> torch.Tensor:
        # Learned features are keyed by the prompts' in-place version counters too, which every optimizer step bumps.
        versions = tuple(p._version for p in self.learnable_parameters()) if learned else ()
        key, kind = (tuple(classnames), versions), "learned" if learned else "hand-written"
        if kind not in self._text_cache or self._text_cache[kind][0] != key:
            with torch.no_grad():
                feats = self.text_features(classnames) if learned else self.hand_written_text_features(classnames)
            self._text_cache[kind] = (key, feats)
        return self._text_cache[kind][1]

    @torch.no_grad()
    def zero_shot_logits(
        self, images: torch.Tensor, classnames: list[str] | None = None, learned: bool = True
    ) -> torch.Tensor:
        """Zero-shot logits ``[B, C]`` (fp32) over ``classnames`` (default: the training classes).

        learned=True: the learned text prompts (and vision prompts); False: the hand-written ``"a photo of a {}."``
        with the plain student. Text features are computed once per class list and prompt state, then reused.
        """
        classnames = self.classnames if classnames is None else list(classnames)
        text = self._cached_text_features(classnames, learned)
        return self.logit_scale() * self.image_features(images, prompts=learned) @ text.T
