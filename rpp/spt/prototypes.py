"""Self-Prompt Tuning's prototype initialisation: prompts built from the downstream data's own tokens.

SPT (Wang et al., ICML 2024) initialises the prompts of layer ``i`` from the tokens that enter layer ``i`` when the
frozen backbone runs over the downstream training set. Modes, per layer (``P`` = number of prompts):

- ``random``: ``P`` distinct tokens drawn uniformly from all patch tokens of all images.
- ``mean`` / ``max``: each image's ``N`` patch tokens, in sequence order, are pooled in non-overlapping windows of
  ``w = ceil(N / P)`` consecutive tokens (the last window takes the ``N - (ceil(N / w) - 1) * w`` left over), giving
  ``ceil(N / w) <= P`` prototypes per image; ``P`` distinct prototypes are then drawn uniformly from those of all
  images. SPT's code uses ``w = N // (P - 1)`` with a remainder window, which is the same partition for ViT-B/16's
  ``N = 196`` and ``P = 20``; ``ceil(N / P)`` is defined for every ``P <= N``.
- ``kmeans``: ``P`` k-means centres (greedy k-means++ seeding, then Lloyd iterations) of the patch tokens; on the GPU
  when one is present.

Memory is bounded: each layer keeps a uniform random sample of at most ``capacity`` candidates (tokens, or pooled
prototypes) from the stream, as the ``capacity`` smallest of i.i.d. uniform keys (a reservoir sample). Every random
choice uses a generator seeded with ``seed`` and the layer index, so results are deterministic under a seed and a
layer's prompts do not depend on which other layers are built.

Layer 0's tokens (``layer0``): ``'block-input'`` (default) takes block 0's input (patch embeddings plus positional
embedding, after ``norm_pre``), which is where the prompts are inserted; ``'patch-embed'`` takes the bare patch
embeddings without the positional embedding, as SPT's code does (its ``RepCatcher`` hooks ``patch_embed``). Register
tokens are dropped along with CLS. SPT's MoCo v3 script builds the prototypes from one random training image
(``sample_size=1``); :func:`init_prompts` takes whatever images the loader yields (``rpp.spt --init-images 1`` gives a
loader of one randomly drawn image).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn as nn

__all__ = ["LAYER0_SOURCES", "MODES", "PrototypeBuilder", "init_prompts", "kmeans", "pool_windows"]

MODES = ("random", "mean", "max", "kmeans")
LAYER0_SOURCES = ("block-input", "patch-embed")
DEFAULT_CAPACITY = 16384


def pool_windows(tokens: torch.Tensor, num_prompts: int, op: str) -> torch.Tensor:
    """Per-image 1-D window pooling: tokens ``[B, N, C]`` -> ``[B, ceil(N / w), C]`` with ``w = ceil(N / P)``.

    Window ``j`` covers tokens ``[j * w, min((j + 1) * w, N))``; ``op`` is ``'mean'`` or ``'max'``. Equivalent PyTorch::

        torch.stack([tokens[:, j * w : (j + 1) * w].mean(1) for j in range(math.ceil(N / w))], 1)
    """
    if op not in ("mean", "max"):
        raise ValueError(f"op must be 'mean' or 'max', got {op!r}")
    batch, n, dim = tokens.shape
    if not 1 <= num_prompts <= n:
        raise ValueError(f"window pooling needs 1 <= num_prompts <= tokens per image ({n}), got {num_prompts}")
    w = math.ceil(n / num_prompts)
    windows = math.ceil(n / w)
    pad = windows * w - n
    # Pad the last window to full width with values that do not change its result (zeros for the sum, -inf for max).
    fill = 0.0 if op == "mean" else float("-inf")
    padded = torch.cat([tokens, tokens.new_full((batch, pad, dim), fill)], 1).view(batch, windows, w, dim)
    if op == "max":
        return padded.amax(2)
    counts = torch.full((windows, 1), float(w), device=tokens.device, dtype=tokens.dtype)
    counts[-1] = w - pad
    return padded.sum(2) / counts


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-6) -> torch.Tensor:
    """k-means centres ``[k, C]`` of the rows of ``x`` ``[n, C]``: greedy k-means++ seeding, then Lloyd iterations.

    Deterministic under ``seed`` (cluster sums are a one-hot matmul, not atomics). An empty cluster keeps its centre.
    Stops when no centre moves by more than ``tol`` times the data's scale.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}), got k={k}")
    x = x.float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sq_norms = (x * x).sum(1)

    def sq_dist(centres: torch.Tensor) -> torch.Tensor:  # [n, m]
        return (sq_norms[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None]).clamp_min(0)

    # Greedy k-means++ (as scikit-learn): draw 2 + log(k) candidates with probability proportional to their squared
    # distance to the nearest centre so far and keep the one that lowers the total squared distance most. Plain
    # k-means++ (one draw) misses a small cluster now and then; the greedy variant almost never does.
    trials = 2 + int(math.log(k))
    idx = [int(torch.randint(n, (1,), generator=gen, device=x.device))]
    nearest = sq_dist(x[idx[0]][None])[:, 0]
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=gen)
        after = torch.minimum(nearest[:, None], sq_dist(x[candidates]))  # [n, trials]
        best = int(after.sum(0).argmin())
        idx.append(int(candidates[best]))
        nearest = after[:, best]
    centres = x[idx].clone()

    scale = x.abs().max().clamp_min(1e-12)
    for _ in range(iters):
        one_hot = nn.functional.one_hot(sq_dist(centres).argmin(1), k).to(x.dtype)  # [n, k]
        counts = one_hot.sum(0)
        sums = one_hot.T @ x
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        shift = (new - centres).abs().max()
        centres = new
        if shift <= tol * scale:
            break
    return centres


class PrototypeBuilder:
    """Streams token batches of one layer and builds that layer's ``P`` prompts (see the module docstring).

    ``add(tokens)`` takes ``[B, N, C]`` patch tokens (no CLS/register rows); ``build()`` returns ``[P, C]`` in fp32.
    """

    def __init__(
        self, mode: str, num_prompts: int, capacity: int = DEFAULT_CAPACITY, seed: int = 0, kmeans_iters: int = 100
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if capacity < num_prompts:
            raise ValueError(f"capacity ({capacity}) must be at least num_prompts ({num_prompts})")
        self.mode, self.num_prompts, self.capacity = mode, num_prompts, capacity
        self.seed, self.kmeans_iters = seed, kmeans_iters
        self.rows: torch.Tensor | None = None  # the reservoir: [<= capacity, C]
        self.keys: torch.Tensor | None = None
        self.seen = 0
        self._gen: torch.Generator | None = None

    def add(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3:
            raise ValueError(f"expected tokens [B, N, C], got shape {list(tokens.shape)}")
        tokens = tokens.detach().float()
        pooled = self.mode in ("mean", "max")
        candidates = pool_windows(tokens, self.num_prompts, self.mode) if pooled else tokens
        candidates = candidates.reshape(-1, tokens.shape[-1])
        if self._gen is None:
            self._gen = torch.Generator(device=tokens.device).manual_seed(self.seed)
        keys = torch.rand(candidates.shape[0], generator=self._gen, device=tokens.device)
        if self.rows is not None:
            candidates, keys = torch.cat([self.rows, candidates]), torch.cat([self.keys, keys])
        if keys.numel() > self.capacity:
            keep = keys.topk(self.capacity, largest=False).indices
            candidates, keys = candidates[keep], keys[keep]
        self.rows, self.keys = candidates, keys
        self.seen += tokens.shape[0] * tokens.shape[1]

    def build(self) -> torch.Tensor:
        if self.rows is None or self.rows.shape[0] < self.num_prompts:
            have = 0 if self.rows is None else self.rows.shape[0]
            raise ValueError(
                f"{self.mode!r} initialisation of {self.num_prompts} prompts needs at least that many candidates, "
                f"got {have} from {self.seen} tokens; use more images or fewer prompts"
            )
        if self.mode == "kmeans":
            rows = self.rows.cuda() if torch.cuda.is_available() else self.rows
            return kmeans(rows, self.num_prompts, self.kmeans_iters, seed=self.seed).to(self.rows.device)
        # The reservoir is a uniform sample, so P uniform picks from it are P uniform picks from the whole stream.
        pick = torch.randperm(self.rows.shape[0], generator=self._gen, device=self.rows.device)[: self.num_prompts]
        return self.rows[pick]


class _StopCapture(Exception):
    """Raised by the last needed layer's hook: the rest of the forward is not needed."""


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def init_prompts(
    model: nn.Module,
    loader: Iterable,
    mode: str = "kmeans",
    num_prompts: int | None = None,
    max_images: int | None = None,
    seed: int = 0,
    *,
    capacity: int = DEFAULT_CAPACITY,
    kmeans_iters: int = 100,
    layer0: str = "block-input",
) -> torch.Tensor:
    """Build SPT prototype prompts from one pass of the frozen backbone over ``loader`` (images or (images, labels)).

    The backbone runs without prompts (timm's own ``forward_features``), and a forward pre-hook on each needed block
    captures its input tokens without the ``num_prefix_tokens`` CLS/register rows. With prompts already added
    (:func:`rpp_kernels.integrations.timm.add_prompts`), the result is written into ``model.prompt_tokens`` (deep: one
    set per block; shallow: block 0's tokens only, and the forward stops after block 0) and ``num_prompts`` defaults
    to theirs. Without prompts it returns one set per block. ``layer0='patch-embed'`` takes layer 0's tokens from
    ``model.patch_embed``'s output (no positional embedding, as SPT) instead of block 0's input. Batches with no
    images are passed over. Returns ``[L, P, dim]`` on the model's device.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if layer0 not in LAYER0_SOURCES:
        raise ValueError(f"layer0 must be one of {LAYER0_SOURCES}, got {layer0!r}")
    prompts = getattr(model, "prompt_tokens", None)
    if prompts is not None:
        if num_prompts is not None and num_prompts != prompts.shape[1]:
            raise ValueError(f"num_prompts={num_prompts} but model.prompt_tokens holds {prompts.shape[1]} prompts")
        num_prompts = prompts.shape[1]
        layers = list(range(prompts.shape[0]))
    elif num_prompts is None:
        raise ValueError("num_prompts is required when the model has no prompt_tokens")
    else:
        layers = list(range(len(model.blocks)))
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    builders = {i: PrototypeBuilder(mode, num_prompts, capacity, seed + i, kmeans_iters) for i in layers}
    n_prefix = model.num_prefix_tokens

    def capture(i: int):
        def hook(_module, args):
            builders[i].add(args[0][:, n_prefix:])
            if i == layers[-1]:
                raise _StopCapture

        return hook

    def capture_patch_embed(_module, _args, output):
        builders[0].add(output.reshape(output.shape[0], -1, output.shape[-1]))  # NHWC output formats too
        if layers[-1] == 0:
            raise _StopCapture

    from_blocks = [i for i in layers if i > 0 or layer0 == "block-input"]
    handles = [model.blocks[i].register_forward_pre_hook(capture(i)) for i in from_blocks]
    if layer0 == "patch-embed":
        handles.append(model.patch_embed.register_forward_hook(capture_patch_embed))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in loader:
            images = _images(batch)
            if max_images is not None:
                images = images[: max_images - seen]
            if images.shape[0] == 0:
                continue
            with contextlib.suppress(_StopCapture):
                type(model).forward_features(model, images.to(device))  # the class method: no prompts
            seen += images.shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("init_prompts: the loader yielded no images")
    result = torch.stack([builders[i].build() for i in layers]).to(device)
    if prompts is not None:
        prompts.copy_(result.to(prompts.dtype))
    return result
