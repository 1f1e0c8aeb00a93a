"""The prompt-pretraining method: a frozen open_clip student with learnable prompts, a CLIP teacher, class sampling
and the CE + KD loss.

Per training step (:meth:`RPPMethod.loss`):

1. the teacher's signal for the batch (online: image features or top-k; offline: the top-k of
   ``python -m rpp.teacher_cache``);
2. the step's classes (``--classes-per-step K``; ``all`` = every class, no sampling), by ``--sampling``:

   * ``rpp`` (default): one class set shared by the batch: in-batch labels ∪ uniform random negatives up to K (with
     ``--kd-classes teacher-topk`` also every row's teacher top-k, the previous behaviour); CE over the whole set
     with one global local correction ``log((C-1)/(K-1))``;
   * ``pomp``: POMP's code (``trainers/pomp.py``): each row scores its own label against K-1 negatives shared by the
     batch, a negative equal to the row's label is masked, each row gets its own correction
     ``log(C-1) - log(K-1-r_i)`` (``r_i`` masked columns), negatives ``random`` / ``hard`` / ``easy``
     (:mod:`rpp.losses`);

3. text features of those classes through :class:`rpp_kernels.text.SharedPrefixTextEncoder` (gradients reach the
   text prompts), image features through the student's vision tower (with deep vision prompts when enabled);
4. ``ce_weight * CE + kd_weight * KD``, KD through :func:`rpp_kernels.kd.topk_kd_loss` over the step's classes.

Why ``--kd-classes sampled`` is the default: forcing every row's teacher top-k into the class set makes it grow with
the batch (batch 32 x k 100 gives up to 3,232 classes against K = 1000): no random negatives remain, the step's cost
is no longer set by K, and the local correction, derived for uniform draws, is applied to the hardest negatives. With
``sampled`` the CE keeps K classes of which the non-labels are uniform draws (the correction's assumption), and the
teacher's top-k among those K classes is distilled (online teacher; a cached top-k is restricted to them).

Student and teacher weights come from local files. Random weights are used only for the built-in demo models
(``rpp-tiny``, ``rpp-tiny-teacher``: logged as such) or with ``--allow-random-weights`` (tests); otherwise a missing
``--pretrained`` / ``--teacher-pretrained`` is an error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from rpp.augment import AUGMENTATIONS, train_transform
from rpp.errors import UserError
from rpp.losses import (
    NEGATIVE_MODES,
    ClassSample,
    corrected_cross_entropy,
    full_class_set,
    local_correction,
    negative_probs,
    pomp_correction,
    pomp_cross_entropy,
    sample_classes,
    sample_pomp_negatives,
)
from rpp.models import load_clip, register_tiny_models
from rpp.teacher import TEMPLATES, Teacher, encode_class_names
from rpp_kernels.integrations.open_clip import apply_vision_prompts
from rpp_kernels.kd import topk_kd_loss
from rpp_kernels.text import SharedPrefixTextEncoder

__all__ = [
    "TEXT_PROMPTS",
    "MethodConfig",
    "RPPMethod",
    "UserError",
    "register_tiny_models",
    "restricted_teacher_logits",
]

TEXT_PROMPTS = ("rpp", "pomp", "vpt-deep")
SAMPLINGS = ("rpp", "pomp")
KD_CLASSES = ("sampled", "teacher-topk")
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
            "QuickGELU); none = an error, except for the built-in demo models (random weights, logged)"
        },
    )
    teacher: str | None = field(
        default="rpp-tiny-teacher",
        metadata={"help": "teacher open_clip model name (e.g. ViT-L-14); none = no teacher (needs --kd-weight 0)"},
    )
    teacher_pretrained: str | None = field(
        default=None,
        metadata={"help": "teacher weights: a local file (as --pretrained); none = an error, except for demo models"},
    )
    allow_random_weights: bool = field(
        default=False,
        metadata={
            "help": "let a model other than the built-in demo ones run with random weights when its weights file is "
            "none (for tests: the prompts and the KD term then fit noise; logged as a warning)"
        },
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
    vision_carry: bool | None = field(
        default=None,
        metadata={
            "help": "shared vision prompts: carry the last prompted layer's prompt rows through the remaining layers "
            "(VPT-deep, MaPLe, POMP's IVLP; the default) or drop them (false: the behaviour before); unshared k/v "
            "prompts have no rows to carry; none = the default of rpp_kernels.integrations.open_clip"
        },
    )
    classes_per_step: int | None = field(
        default=1000,
        metadata={
            "help": "classes per step K (see --sampling): rpp = labels + random negatives up to K shared by the "
            "batch; pomp = each row's label + K-1 shared negatives; all = the full class set, no sampling"
        },
    )
    sampling: str = field(
        default="rpp",
        metadata={
            "help": "class sampling and CE: rpp (one class set for the batch, one global correction) or pomp "
            "(POMP's code: own label + shared negatives per row, label masking, per-row log correction)",
            "choices": SAMPLINGS,
        },
    )
    negatives: str = field(
        default="random",
        metadata={
            "help": "--sampling pomp negatives: random (uniform, POMP's default), hard (classes the batch scores "
            "high drawn more often) or easy (low-scoring ones), with POMP's -log(p) correction",
            "choices": NEGATIVE_MODES,
        },
    )
    negative_bank_refresh: int = field(
        default=100,
        metadata={
            "help": "hard/easy negatives are drawn from the learned text features of all classes, recomputed "
            "every this many steps (and at the first step of a resumed run)"
        },
    )
    kd_classes: str = field(
        default="sampled",
        metadata={
            "help": "--sampling rpp: sampled = KD over the step's K sampled classes (default); teacher-topk = add "
            "every row's teacher top-k to the step's classes (CE and KD over them; the set then exceeds K)",
            "choices": KD_CLASSES,
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
    augment: str = field(
        default="open_clip",
        metadata={
            "help": "training augmentation: open_clip (the model's own), pomp (RandomResizedCrop + flip + "
            "torchvision RandAugment), pomp-dassl (the same with Dassl's RandAugment2, as POMP's configs), "
            "crop-flip, none (centre crop)",
            "choices": AUGMENTATIONS,
        },
    )
    crop_min_scale: float = field(
        default=0.08, metadata={"help": "smallest RandomResizedCrop area fraction (augment pomp / crop-flip)"}
    )
    randaugment_ops: int = field(default=2, metadata={"help": "RandAugment operations per image (augment pomp)"})
    randaugment_magnitude: int = field(default=10, metadata={"help": "RandAugment magnitude 0-30 (augment pomp)"})
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
        if self.negative_bank_refresh < 1:
            raise UserError(f"--negative-bank-refresh: must be >= 1, got {self.negative_bank_refresh}")
        if self.sampling == "pomp" and self.classes_per_step is not None and self.classes_per_step < 2:
            raise UserError(f"--classes-per-step: --sampling pomp needs >= 2 (a label and a negative), got "
                            f"{self.classes_per_step}")  # fmt: skip
        if not 0 < self.crop_min_scale <= 1:
            raise UserError(f"--crop-min-scale: must be in (0, 1], got {self.crop_min_scale}")
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise UserError(f"--randaugment-ops/--randaugment-magnitude: need >= 0 and 0..30, got "
                            f"{self.randaugment_ops}, {self.randaugment_magnitude}")  # fmt: skip
        if not self.temperature > 0:
            raise UserError(f"--temperature: must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise UserError(
                f"--kd-weight/--ce-weight: need >= 0 and not both 0, got {self.kd_weight}, {self.ce_weight}"
            )


def restricted_teacher_logits(
    indices: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """A precomputed teacher top-k restricted to the step's classes, as teacher logits ``[B, K]`` for
    :func:`~rpp_kernels.kd.topk_kd_loss`.

    indices / probs: ``[B, k]`` global class ids and probabilities at ``temperature``; classes: ``[K]`` distinct global
    ids. Entry ``(i, j)`` is ``temperature * log(p)`` where ``classes[j]`` is among row i's top-k, else ``-inf``, so
    ``softmax(logits / T)`` is the teacher's distribution renormalised over its top-k classes that the step holds.
    A row none of whose top-k classes is in the step gets no KD term. Equivalent::

        t = torch.full((B, K), -inf); for each (i, c) with c in classes: t[i, pos(c)] = T * log(p[i, c])
    """
    indices, probs, classes = indices.detach().cpu().long(), probs.detach().cpu().float(), classes.cpu().long()
    where = torch.full((int(max(indices.max(), classes.max())) + 1,), -1, dtype=torch.long)
    where[classes] = torch.arange(len(classes))
    pos = where[indices]
    held = (pos >= 0) & (probs > 0)
    logits = torch.full((len(indices), len(classes)), float("-inf"))
    rows = torch.arange(len(indices))[:, None].expand_as(pos)
    logits[rows[held], pos[held]] = temperature * probs[held].log()
    return logits


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

        clip, open_clip_train, self.preprocess_val = load_clip(
            cfg.model, cfg.pretrained, role="--pretrained", allow_random=cfg.allow_random_weights
        )
        self.preprocess_train = train_transform(
            cfg.augment,
            clip.visual.image_size,
            getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
            getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD,
            open_clip_train=open_clip_train,
            open_clip_val=self.preprocess_val,
            crop_min_scale=cfg.crop_min_scale,
            randaugment_ops=cfg.randaugment_ops,
            randaugment_magnitude=cfg.randaugment_magnitude,
        )
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
                    self.clip.visual,
                    cfg.vision_prompts,
                    cfg.vision_depth,
                    unshared_qkv=cfg.vision_unshared_qkv,
                    carry=cfg.vision_carry,
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
                allow_random=cfg.allow_random_weights,
            )
        self._text_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._negative_bank: torch.Tensor | None = None  # hard/easy POMP negatives: all classes' text features
        self._bank_age = 0

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
        if self._full:
            return full_class_set(labels, len(self.classnames), teacher_indices)
        return sample_classes(labels, len(self.classnames), self.cfg.classes_per_step, generator, teacher_indices)

    @property
    def _full(self) -> bool:
        return self.cfg.classes_per_step is None or self.cfg.classes_per_step >= len(self.classnames)

    def _teacher_signal(self, images, teacher_topk, need_features: bool):
        """(teacher image features or None, top-k (indices, probs) or None) for this step's KD term."""
        if self.cfg.kd_weight == 0:
            return None, None
        if teacher_topk is not None:
            return None, teacher_topk
        if self.teacher is None:
            raise UserError("--kd-weight > 0 needs a teacher (--teacher) or an offline teacher cache")
        if need_features:
            return self.teacher.image_features(images), None
        return None, self.teacher.topk(images, self.cfg.kd_topk, self.cfg.temperature)

    def _bank(self) -> torch.Tensor:
        """All classes' learned text features ``[C, E]`` (no grad), recomputed every ``negative_bank_refresh`` calls."""
        if self._negative_bank is None or self._bank_age >= self.cfg.negative_bank_refresh:
            with torch.no_grad():
                self._negative_bank = self.text_features(self.classnames)
            self._bank_age = 0
        self._bank_age += 1
        return self._negative_bank

    def _pomp_ce(self, image_feats, labels, generator, scale):
        """POMP's step (see :mod:`rpp.losses`): (classes [K'] CPU, text features [K', E], CE, accuracy)."""
        cfg, num_classes = self.cfg, len(self.classnames)
        probs = None
        if cfg.negatives != "random":
            probs = negative_probs(image_feats, self._bank(), float(scale), cfg.negatives)
        negatives = sample_pomp_negatives(num_classes, cfg.classes_per_step - 1, generator, probs)
        neg_probs = None if probs is None else probs.cpu()[negatives]
        correction, reject = pomp_correction(labels, negatives, num_classes, neg_probs, cfg.correction_log10)
        classes = torch.unique(torch.cat([labels, negatives]))  # each class encoded once
        text_feats = self.text_features([self.classnames[i] for i in classes.tolist()])
        pos = text_feats[torch.searchsorted(classes, labels).to(self.device)]
        neg = text_feats[torch.searchsorted(classes, negatives).to(self.device)]
        pos_logits = scale * (image_feats * pos).sum(-1)
        neg_logits = scale * image_feats @ neg.T
        reject = reject.to(self.device)
        correction = correction.to(self.device) if cfg.local_correction else None
        ce = pomp_cross_entropy(pos_logits, neg_logits, reject, correction)
        with torch.no_grad():
            best_neg = neg_logits + (0 if correction is None else correction)
            acc = (pos_logits > best_neg.masked_fill(reject, float("-inf")).amax(-1)).float().mean()
        return classes, text_feats, ce, acc

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
        classes) and ``num_classes`` (the step's distinct class count).
        """
        cfg = self.cfg
        pomp = cfg.sampling == "pomp" and not self._full
        # KD over the step's sampled classes: the teacher's top-k among them needs its features (online).
        kd_over_sampled = not self._full and (pomp or cfg.kd_classes == "sampled")
        teacher_feats, teacher_topk = self._teacher_signal(
            images, teacher_topk, need_features=cfg.kd_topk is None or kd_over_sampled
        )
        image_feats = self.image_features(images)
        scale = self.logit_scale()
        labels_cpu = labels.detach().cpu().long()

        positions = None
        if pomp:
            classes, text_feats, ce, acc = self._pomp_ce(image_feats, labels_cpu, generator, scale)
        else:
            forced = None if kd_over_sampled or teacher_topk is None else teacher_topk[0]
            sample = self._sample(labels_cpu, generator, forced)
            classes, positions = sample.classes, sample.teacher_positions
            text_feats = self.text_features([self.classnames[i] for i in classes.tolist()])
            targets = sample.targets.to(self.device)
            logits = scale * image_feats @ text_feats.T
            correction = 0.0
            if cfg.local_correction and not sample.is_full:
                correction = local_correction(sample.num_classes, len(classes), cfg.correction_log10)
            ce = corrected_cross_entropy(logits, targets, correction)
            acc = (logits.detach().argmax(dim=-1) == targets).float().mean()

        kd = torch.zeros((), device=self.device)
        if teacher_feats is not None:
            # topk_kd_loss applies one logit_scale to both pairs; fold the teacher's own scale into its features.
            teacher_feats = teacher_feats * (self.teacher.logit_scale / scale)
            teacher = (teacher_feats, self.teacher.class_embeds[classes.to(self.device)])
        elif teacher_topk is not None and positions is None:  # a cached top-k, restricted to the step's classes
            teacher = restricted_teacher_logits(*teacher_topk, classes, cfg.temperature).to(self.device)
        elif teacher_topk is not None:
            teacher = (positions.to(self.device), teacher_topk[1].to(self.device).float())
        if teacher_feats is not None or teacher_topk is not None:
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
        return {
            "loss": loss,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "acc": acc,
            "num_classes": torch.tensor(len(classes), device=self.device),
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
