"""Prompt pretraining: `python -m rpp.train [--config FILE] [options]` (single process or under torchrun).

With no arguments: a small complete run on CPU (tiny random-weight open_clip student and teacher, the built-in
shapes dataset, RPP prompts, KD + CE), a few minutes on two cores.

Exit codes: 0 finished; 2 user error (one line on stderr); 3 non-finite loss or parameters (the last good
checkpoint is kept); 128+signal (130 SIGINT, 143 SIGTERM) stopped by a signal after saving a checkpoint of the
last finished step, to continue with `--resume`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rpp import checkpoint, data, distributed
from rpp.config import TrainConfig, parse, validate
from rpp.errors import UserError
from rpp.eval import evaluate, format_results
from rpp.metrics_log import MetricsLog, peak_memory_mb
from rpp.teacher_cache import TeacherCache

EXIT_NON_FINITE = 3
EXIT_STALLED = 4
# Options a resumed run may change: where and how often it writes, how it loads data, how long it runs (recorded in
# config.json and the log). Every other training or method option must equal the checkpoint's, or --resume refuses:
# a changed learning rate, data order or loss would silently not continue the interrupted run.
RESUME_MAY_CHANGE = {
    "output", "resume", "max_steps", "epochs", "log_every", "save_every", "num_workers", "tensorboard",
    "eval_data", "eval_batch_size", "cache_dir", "teacher_cache", "stall_timeout", "trust_torchscript",
    "pretrained", "teacher_pretrained", "grad_checkpointing", "text_chunk_size",
}  # fmt: skip
DESCRIPTION = (
    "Pretrain prompts (RPP/POMP) on open_clip with a CLIP teacher. Options come from dataclass defaults, then "
    "--config FILE (YAML), then the command line. With no options: a small CPU run on built-in data."
)


class NonFiniteError(RuntimeError):
    """The loss or the learnable parameters stopped being finite."""


def wrap_ddp(method: nn.Module, info: distributed.DistInfo) -> nn.Module:
    """DDP over the learnable parameters only: frozen parameters and buffers are neither broadcast nor reduced.
    RPPMethod.forward is its loss, so the wrapper runs a training step."""
    frozen = [name for name, p in method.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in method.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, frozen)
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)


def lr_lambda(warmup: int, total: int, warmup_factor: float | None = None):
    """Warmup over `warmup` steps (linear, or the constant `warmup_factor` x the peak rate), then cosine decay to
    zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup_factor is None else warmup_factor
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


@contextmanager
def stop_on_signals():
    """Yields a dict whose "signal" becomes the number of the first SIGINT/SIGTERM received; a second one aborts."""
    state: dict[str, int | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if state["signal"] is not None:
            raise KeyboardInterrupt
        state["signal"] = signum
        tqdm.write(f"rpp.train: got {signal.Signals(signum).name}: finishing this step, saving, then exiting")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def gather_rng(generator: torch.Generator, info: distributed.DistInfo) -> list[dict]:
    """Every rank's RNG states, in rank order (on rank 0; other ranks get a list too)."""
    state = checkpoint.rng_state(generator)
    if not info.enabled:
        return [state]
    out: list = [None] * info.world
    dist.all_gather_object(out, state)
    return out


def save(
    out: Path,
    method,
    optimizer,
    scheduler,
    scaler,
    generator,
    step: int,
    position: dict,
    tcfg,
    mcfg,
    classnames: list[str],
    info: distributed.DistInfo,
) -> None:
    """Both checkpoint files, after checking that every learnable parameter is finite (never save a bad state)."""
    finite = all(torch.isfinite(p).all() for p in method.learnable_parameters())
    if distributed.any_rank(not finite, info.device):
        raise NonFiniteError(f"learnable parameters became non-finite by step {step}")
    rng = gather_rng(generator, info)
    if not info.is_main:
        return
    prompts = method.prompt_state_dict()
    meta = {"method_config": asdict(mcfg), "classnames": classnames, "step": step}
    checkpoint.atomic_save({"prompts": prompts, **meta}, out / checkpoint.PROMPTS_FILE)
    state = {
        **meta,
        "prompts": prompts,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "world_size": info.world,
        "position": position,
        "train_config": asdict(tcfg),
    }
    checkpoint.atomic_save(state, out / checkpoint.STATE_FILE)


def main(argv: list[str] | None = None) -> int:
    return distributed.cli_main("rpp.train", train, argv)


def train(argv: list[str] | None = None) -> int:
    from rpp.method import MethodConfig, RPPMethod, register_tiny_models

    tcfg, mcfg = parse(
        [TrainConfig, MethodConfig], argv, prog="python -m rpp.train", description=DESCRIPTION, tool="rpp.train"
    )
    validate(tcfg)
    out = Path(tcfg.output)
    state_path = None if tcfg.resume is None else checkpoint.resolve_resume(tcfg.resume, tcfg.output)
    checkpoint.check_output_dir(out, state_path)
    register_tiny_models()
    info = distributed.init()
    log = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        checkpoint.make_output_dir(out)

    spec = data.resolve(tcfg.data, tcfg.data_format, tcfg.classnames, tcfg.seed, tcfg.eval_data)
    cache = None
    if tcfg.teacher_cache is not None:
        cache = TeacherCache.open(tcfg.teacher_cache, spec, temperature=mcfg.temperature)

    seed_everything(tcfg.seed)  # identical prompt initialisation on every rank
    # Teacher class embeddings are cached on disk only for real weights (random test weights depend on the seed).
    cache_dir = tcfg.cache_dir or (str(out / "cache") if mcfg.teacher_pretrained else None)
    method = RPPMethod(mcfg, spec.classnames, info.device, cache_dir=cache_dir)
    params = method.learnable_parameters()
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scaler = torch.amp.GradScaler(info.device.type, enabled=mcfg.precision == "fp16")
    generator = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + info.rank)

    step = 0
    state = None
    if state_path is not None:
        state = checkpoint.load(state_path, "training state")
        if not {"step", "train_config", "prompts", "optimizer", "rng"} <= set(state):
            raise UserError(f"--resume: {state_path} is not a training state written by rpp.train (resume from the "
                            f"{checkpoint.STATE_FILE} of a run directory)")  # fmt: skip
        step = state["step"]
        for key in RESUME_MUST_MATCH:
            before, now = state["train_config"].get(key), getattr(tcfg, key)
            if before != now:
                raise UserError(f"--resume: --{key.replace('_', '-')} was {before!r} in {state_path}, now {now!r}; "
                                "the data order would not continue the interrupted run")  # fmt: skip
        log(f"rpp.train: resuming from {state_path} at step {step}")

    loader, batches_per_epoch = data.train_loader(
        spec, method.preprocess_train, batch_size=tcfg.batch_size, views=tcfg.views, seed=tcfg.seed,
        shots=tcfg.shots, shots_seed=tcfg.shots_seed, rank=info.rank, world=info.world,
        num_workers=tcfg.num_workers, start=step, pin_memory=info.device.type == "cuda",
    )  # fmt: skip
    if batches_per_epoch is None and tcfg.max_steps is None:
        n = int(cache.counts.sum()) if cache is not None else sum(data.shard_sample_counts(spec.shards))
        batches_per_epoch = n // (tcfg.batch_size * info.world)
        if batches_per_epoch == 0:
            raise UserError(f"{n} webdataset samples are too few for batch size {tcfg.batch_size} x {info.world}")
    total = tcfg.max_steps or tcfg.epochs * batches_per_epoch
    if tcfg.warmup_epochs is not None and batches_per_epoch is None:
        raise UserError("--warmup-epochs needs a known epoch length: use --warmup steps with --max-steps on webdataset")
    warmup = tcfg.warmup if tcfg.warmup_epochs is None else round(tcfg.warmup_epochs * batches_per_epoch)
    warmup_factor = None if tcfg.warmup_lr is None else tcfg.warmup_lr / tcfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, warmup_factor))

    if state is not None:
        method.load_prompt_state_dict(state["prompts"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if state["world_size"] == info.world:
            checkpoint.set_rng_state(state["rng"][info.rank], generator)
        else:
            log(f"rpp.train: world size changed {state['world_size']} -> {info.world}: resuming with fresh RNG")
            seed_everything(tcfg.seed + step)
            generator.manual_seed(tcfg.seed * 1_000_003 + info.rank + step)
    model = wrap_ddp(method, info) if info.enabled else method

    metrics = None
    if info.is_main:
        (out / "config.json").write_text(json.dumps({"train": asdict(tcfg), "method": asdict(mcfg)}, indent=2))
        tb_dir = out / "tensorboard" if tcfg.tensorboard else None
        metrics = MetricsLog(out / "metrics.jsonl", tb_dir, truncate_after_step=step)
    n_params = sum(p.numel() for p in params)
    log(
        f"rpp.train: {spec.format} data, {len(spec.classnames)} classes, {info.world} process(es) on "
        f"{info.device.type}, {n_params:,} learnable parameters, steps {step} -> {total}"
    )

    try:
        exit_code = _loop(tcfg, method, model, loader, cache, optimizer, scheduler, scaler, generator, step, total,
                          batches_per_epoch, spec, mcfg, info, out, metrics, log)  # fmt: skip
    finally:
        if metrics is not None:
            metrics.close()
    if exit_code != 0:
        return exit_code

    if spec.eval_source is not None:
        loader = data.eval_loader(spec.eval_source, method.preprocess_val, tcfg.eval_batch_size, info.rank,
                                  info.world, tcfg.num_workers)  # fmt: skip
        results = evaluate(method, loader, info.device)
        log(format_results(results, f"held-out split ({results['images']} images, {len(spec.classnames)} classes)"))
        if info.is_main:
            (out / "eval.json").write_text(json.dumps(results, indent=2))
    log(
        f"rpp.train: done. Output in {out.resolve()}/: {checkpoint.PROMPTS_FILE} (prompts only), "
        f"{checkpoint.STATE_FILE} "
        f"(full training state for --resume), metrics.jsonl, config.json"
        + (", eval.json" if spec.eval_source is not None else "")
        + (", tensorboard/" if metrics is not None and metrics.tb is not None else "")
    )
    return 0


def _loop(tcfg, method, model, loader, cache, optimizer, scheduler, scaler, generator, step, total,
          batches_per_epoch, spec, mcfg, info, out, metrics, log) -> int:  # fmt: skip
    params = method.learnable_parameters()
    saved_step = step if tcfg.resume is not None else None
    sums: dict[str, float] = {}
    timing = {"data": 0.0, "step": 0.0, "n": 0, "skipped": 0}
    skipped_total = 0

    def position(s: int) -> dict:
        epoch, batch = divmod(s, batches_per_epoch) if batches_per_epoch else (None, None)
        return {"batches": s, "epoch": epoch, "batch_in_epoch": batch}

    def checkpoint_now(s: int) -> None:
        nonlocal saved_step
        save(out, method, optimizer, scheduler, scaler, generator, s, position(s), tcfg, mcfg, spec.classnames, info)
        saved_step = s

    bar = tqdm(total=total, initial=step, disable=not info.is_main, desc="rpp.train", dynamic_ncols=True)
    batches = iter(loader)
    with stop_on_signals() as stop:
        while step < total:
            t0 = time.perf_counter()
            views, labels, indices, skipped = next(batches)
            t1 = time.perf_counter()
            out_of_range = labels[(labels < 0) | (labels >= len(spec.classnames))]
            if len(out_of_range):  # webdataset `cls` values are not checked against --classnames before this
                raise UserError(f"class label {int(out_of_range[0])} in the data is out of range for the "
                                f"{len(spec.classnames)} class names (check --classnames)")  # fmt: skip
            n_views = views.shape[1]
            images = views.flatten(0, 1).to(info.device, non_blocking=True)
            labels = labels.repeat_interleave(n_views).to(info.device, non_blocking=True)
            topk = None
            if cache is not None:
                topk = tuple(t.repeat_interleave(n_views, 0).to(info.device) for t in cache.lookup(indices))
            try:
                losses = model(images, labels, generator, topk)
                loss = losses["loss"]
                if distributed.any_rank(not bool(torch.isfinite(loss.detach())), info.device):
                    raise NonFiniteError(f"loss is {loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (logged)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                t2 = time.perf_counter()

                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                timing["data"] += t1 - t0
                timing["step"] += t2 - t0
                timing["n"] += 1
                timing["skipped"] += int(skipped.sum())
                bar.update(1)
                if step % tcfg.log_every == 0 or step == total:
                    skipped_total += _log(sums, timing, step, total, images.shape[0], lr, info, metrics, bar)
                    sums, timing = {}, {"data": 0.0, "step": 0.0, "n": 0, "skipped": 0}
                stopping = distributed.any_rank(stop["signal"] is not None, info.device)
                if step % tcfg.save_every == 0 or step == total or stopping:
                    checkpoint_now(step)
            except NonFiniteError as e:
                bar.close()
                kept = (
                    f"kept the last good checkpoint (step {saved_step}) in {out}"
                    if saved_step is not None
                    else ("no checkpoint had been written yet")
                )
                print(f"rpp.train: error: {e}; stopping, {kept}", file=sys.stderr)
                return EXIT_NON_FINITE
            if stopping:
                bar.close()
                signum = stop["signal"] or signal.SIGTERM
                log(f"rpp.train: stopped by signal at step {step}; checkpoint saved in {out}; continue with --resume")
                return 128 + int(signum)
    bar.close()
    if skipped_total:
        log(f"rpp.train: skipped {skipped_total} corrupt image(s) (see the warnings above)")
    return 0


def _log(sums, timing, step, total, batch, lr, info, metrics, bar) -> int:
    """Average the loss terms over ranks and logged steps; write JSON + TensorBoard + a progress line on rank 0.
    Returns the corrupt images skipped since the last log, summed over ranks."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [timing["skipped"]], dtype=torch.float64, device=info.device)
    distributed.all_reduce(values)
    n = timing["n"]
    means = {k: values[i].item() / (n * info.world) for i, k in enumerate(keys)}
    skipped = int(values[-1].item())
    record = {
        "step": step,
        "lr": lr,
        **means,
        "samples_per_s": batch * info.world * n / timing["step"],
        "data_time_s": timing["data"] / n,
        "step_time_s": timing["step"] / n,
        "peak_memory_mb": peak_memory_mb(info.device),
        "skipped_images": skipped,
    }
    if metrics is not None:
        metrics.write(record)
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        bar.write(f"step {step}/{total} {terms} lr {record['lr']:.2e} {record['samples_per_s']:.1f} img/s")
    return skipped


if __name__ == "__main__":
    sys.exit(main())
