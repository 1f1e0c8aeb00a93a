"""Prompt pretraining: `python -m rpp.train [--config FILE] [options]` (single process or under torchrun).

With no arguments: a small complete run on CPU (tiny random-weight open_clip student and teacher, the built-in
shapes dataset, RPP prompts, KD + CE), a few minutes on two cores.

Exit codes: 0 finished; 2 user error, or a checkpoint that could not be written (one line on stderr); 3 non-finite
loss or parameters (the last good checkpoint is kept); 4 a stalled or dead rank (no step for --stall-timeout seconds,
or a failed collective; the last checkpoint is kept); 128+signal (130 SIGINT, 143 SIGTERM) stopped by a signal after
saving a checkpoint of the last finished step, to continue with `--resume` (a second signal, or a step that cannot
finish, stops without that save).
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import sys
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import MISSING, asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rpp import checkpoint, data, distributed
from rpp.config import TrainConfig, parse, validate
from rpp.distributed import stop_now
from rpp.errors import UserError
from rpp.eval import evaluate, format_results
from rpp.metrics_log import MetricsLog, peak_memory_mb
from rpp.teacher_cache import TeacherCache, training_views

EXIT_NON_FINITE = 3
EXIT_STALLED = 4
SIGNAL_GRACE_S = 120.0  # after SIGINT/SIGTERM, at most this long (or --stall-timeout) to reach a checkpoint
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


def checkpoint_default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


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


def epoch_cosine_lambda(batches_per_epoch: int, warmup_epochs: int, epochs: int, warmup_factor: float | None = None):
    """Dassl's schedule (POMP's ``LR_SCHEDULER cosine`` + ``WARMUP_TYPE constant``), stepped once per epoch: epochs
    ``e < warmup_epochs`` at ``warmup_factor`` (linear over their steps when None), epoch ``e >= warmup_epochs`` at
    ``(1 + cos(pi * (e - warmup_epochs) / epochs)) / 2`` of the peak rate (CosineAnnealingLR with T_max = epochs
    starting after the warmup, as Dassl's ConstantWarmupScheduler hands over to it)."""
    warmup = warmup_epochs * batches_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup_factor is None else warmup_factor
        return 0.5 * (1.0 + math.cos(math.pi * (step // batches_per_epoch - warmup_epochs) / epochs))

    return factor


def collective_failed(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer rank died or the process-group timeout passed."""
    markers = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    return isinstance(error, dist.DistError) or any(m in str(error) for m in markers)


class Watchdog(threading.Thread):
    """Turns a run that stopped making progress into a clean, resumable stop (exit code, one line, the last
    checkpoint kept), even while the main thread is blocked inside a collective where no Python signal handler runs.

    - no step finished for `stall_timeout` seconds (a stalled or dead rank, a hung collective): exit EXIT_STALLED;
    - SIGINT/SIGTERM seen (through signal.set_wakeup_fd, which the C-level handler writes even while the main thread
      is blocked): if the run has not ended `grace` seconds later, exit 128+signal; a second signal exits at once.
    """

    def __init__(self, stall_timeout: float, grace: float, describe: typing.Callable[[], str], prog: str = "rpp.train"):
        super().__init__(daemon=True, name="rpp-watchdog")
        self.stall_timeout, self.grace, self.describe, self.prog = stall_timeout, grace, describe, prog
        self.beat = time.monotonic()
        self.signal_at: float | None = None
        self.signals: list[int] = []
        self.done = threading.Event()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def heartbeat(self) -> None:
        self.beat = time.monotonic()

    def __enter__(self) -> Watchdog:
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        self.join(timeout=5)
        os.close(self.read_fd)
        os.close(self.write_fd)

    def run(self) -> None:
        while not self.done.is_set():
            ready, _, _ = select.select([self.read_fd], [], [], 0.5)
            if ready:
                wanted = (signal.SIGINT, signal.SIGTERM)
                self.signals += [b for b in os.read(self.read_fd, 64) if b in wanted]
                if self.signals and self.signal_at is None:
                    self.signal_at = time.monotonic()
            if self.done.is_set():
                return
            now = time.monotonic()
            if len(self.signals) >= 2:
                name = signal.Signals(self.signals[-1]).name
                stop_now(128 + self.signals[-1], f"{self.prog}: got a second {name}: stopping now without saving; "
                         f"{self.describe()}")  # fmt: skip
            if self.signal_at is not None and now - self.signal_at > self.grace:
                name = signal.Signals(self.signals[0]).name
                stop_now(128 + self.signals[0], f"{self.prog}: no checkpoint within {self.grace:g} s of {name} "
                         f"(a stalled rank or collective?): stopping without saving; {self.describe()}")  # fmt: skip
            if self.stall_timeout > 0 and now - self.beat > self.stall_timeout:
                stop_now(EXIT_STALLED, f"{self.prog}: error: no training step finished in {self.stall_timeout:g} s "
                         f"(a stalled or dead rank, or a hung collective; see --stall-timeout): stopping; "
                         f"{self.describe()}")  # fmt: skip


@contextmanager
def stop_on_signals():
    """Yields a dict whose "signal" becomes the number of the first SIGINT/SIGTERM received (the loop then finishes
    its step, saves and exits); a second one stops at once (workers killed, the last checkpoint kept)."""
    state: dict[str, int | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if state["signal"] is not None:
            stop_now(128 + signum, f"rpp.train: got a second {signal.Signals(signum).name}: stopping now without "
                     "saving; the last checkpoint is kept")  # fmt: skip
        state["signal"] = signum
        tqdm.write(f"rpp.train: got {signal.Signals(signum).name}: finishing this step, saving, then exiting")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def process_group_timeout(stall_timeout: float) -> float:
    """Collectives give up a minute after the watchdog would have stopped the run (so the watchdog's clean stop comes
    first); without a watchdog, PyTorch's default of 30 minutes, set explicitly."""
    return stall_timeout + 60 if stall_timeout > 0 else 1800.0


def check_resume_options(state: dict, tcfg, mcfg, path: Path) -> None:
    """UserError when an option outside RESUME_MAY_CHANGE differs from the checkpoint's (an option the checkpoint
    predates counts as its default)."""
    from rpp.method import MethodConfig

    before = {**state["train_config"], **state["method_config"]}
    defaults = {f.name: checkpoint_default(f) for cls in (TrainConfig, MethodConfig) for f in dataclass_fields(cls)}
    now = {**asdict(tcfg), **asdict(mcfg)}
    may_change = set(RESUME_MAY_CHANGE)
    if (tcfg.data_format or data.infer_format(tcfg.data)) == "webdataset":
        may_change.discard("num_workers")  # shards are split over ranks x workers: the sample order depends on it
    changed = [k for k in now if k not in may_change and before.get(k, defaults.get(k)) != now[k]]
    if changed:
        key = changed[0]
        more = f" (and {', '.join('--' + k.replace('_', '-') for k in changed[1:])})" if len(changed) > 1 else ""
        raise UserError(
            f"--resume: --{key.replace('_', '-')} was {before.get(key, defaults.get(key))!r} in {path}, now "
            f"{now[key]!r}{more}: a resumed run continues with its checkpoint's options; drop the changed option or "
            "start a new run in another --output"
        )


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
    error = None
    if info.is_main:
        state = {
            "format": checkpoint.STATE_FORMAT,
            "version": checkpoint.SCHEMA_VERSION,
            "step": step,
            "seed": tcfg.seed,
            "prompts": method.prompt_state_dict(),
            "method_config": asdict(mcfg),
            "classnames": classnames,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "world_size": info.world,
            "position": position,
            "train_config": asdict(tcfg),
        }
        try:
            checkpoint.save_checkpoint(out, state)
        except UserError as e:  # disk full, quota, permissions: every rank stops, the last checkpoint stays
            error = e
    if distributed.any_rank(error is not None, info.device):
        raise error or UserError(f"rank 0 could not write the checkpoint of step {step} in {out}")


def main(argv: list[str] | None = None) -> int:
    return distributed.cli_main("rpp.train", train, argv)


@contextmanager
def startup_phase(name: str, log, timings: dict[str, float]):
    """Time one startup phase and log it (phases that can take long show their own progress bars on rank 0)."""
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    log(f"rpp.train: startup: {name} took {timings[name]:.1f} s")


_STARTED: dict[str, float] = {}


def _process_age_s() -> float:
    """Seconds since this process was launched (Linux /proc: interpreter start and imports included), else 0."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(after_name[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return 0.0


def train(argv: list[str] | None = None) -> int:
    from rpp.method import MethodConfig, RPPMethod, register_tiny_models

    _STARTED.update(t=time.perf_counter(), age=_process_age_s())

    tcfg, mcfg = parse(
        [TrainConfig, MethodConfig], argv, prog="python -m rpp.train", description=DESCRIPTION, tool="rpp.train"
    )
    validate(tcfg)
    mcfg.validate()
    out = Path(tcfg.output)
    state_path = None if tcfg.resume is None else checkpoint.resolve_resume(tcfg.resume, tcfg.output)
    checkpoint.check_output_dir(out, state_path)
    state = None
    if state_path is not None:
        state = checkpoint.load_train_state(state_path)  # validated before anything is built or written
        check_resume_options(state, tcfg, mcfg, state_path)
    checkpoint.trust_torchscript(tcfg.trust_torchscript)
    register_tiny_models()
    info = distributed.init(timeout_s=process_group_timeout(tcfg.stall_timeout))
    log = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        checkpoint.make_output_dir(out)
        if checkpoint.remove_stale_temp_files(out):
            log(f"rpp.train: removed temporary files an interrupted save left in {out}")
        if state is not None and state_path.parent.resolve() == out.resolve() and checkpoint.repair_prompts(out, state):
            log(f"rpp.train: rewrote {checkpoint.PROMPTS_FILE} from {checkpoint.STATE_FILE} (step {state['step']})")

    # Image indices and teacher class embeddings are cached here (random teachers under a digest of their weights).
    cache_dir = tcfg.cache_dir or str(out / "cache")
    timings: dict[str, float] = {}
    with startup_phase("data index and class names", log, timings):
        spec = data.resolve(tcfg.data, tcfg.data_format, tcfg.classnames, tcfg.seed, tcfg.eval_data,
                            index_cache=cache_dir)  # fmt: skip
    cache = None
    if tcfg.teacher_cache is not None:
        with startup_phase("teacher cache check", log, timings):
            views = training_views(tcfg.seed, tcfg.views, tcfg.shots, tcfg.shots_seed, mcfg)
            cache = TeacherCache.open(tcfg.teacher_cache, spec, temperature=mcfg.temperature, training=views)
        log(f"rpp.train: {cache.describe()}")

    seed_everything(tcfg.seed)  # identical prompt initialisation on every rank
    with startup_phase("models and teacher class embeddings", log, timings):
        method = RPPMethod(mcfg, spec.classnames, info.device, cache_dir=cache_dir)
    if method.teacher is not None:
        ce = method.teacher.class_embeds_info
        log(f"rpp.train: startup: teacher class embeddings ({ce['classes']} classes x {ce['templates']} templates) "
            f"{ce['source']} in {ce['seconds']:.1f} s")  # fmt: skip
    params = method.learnable_parameters()
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scaler = torch.amp.GradScaler(info.device.type, enabled=mcfg.precision == "fp16")
    generator = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + info.rank)

    step = 0 if state is None else state["step"]
    if state is not None:
        log(f"rpp.train: resuming from {state_path} at step {step}")

    with startup_phase("data loader", log, timings):
        loader, batches_per_epoch = data.train_loader(
            spec, method.preprocess_train, batch_size=tcfg.batch_size, views=tcfg.views, seed=tcfg.seed,
            shots=tcfg.shots, shots_seed=tcfg.shots_seed, rank=info.rank, world=info.world,
            num_workers=tcfg.num_workers, start=step, pin_memory=info.device.type == "cuda",
            decode_device=info.device if tcfg.decode_on_device else None,
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
    if tcfg.schedule == "epoch-cosine":
        if batches_per_epoch is None:
            raise UserError("--schedule epoch-cosine needs a known epoch length (map-style data, or --epochs)")
        warmup_epochs = tcfg.warmup_epochs or 0
        if warmup_epochs != int(warmup_epochs):
            raise UserError(f"--schedule epoch-cosine needs whole --warmup-epochs, got {warmup_epochs}")
        schedule = epoch_cosine_lambda(batches_per_epoch, int(warmup_epochs), tcfg.epochs, warmup_factor)
    else:
        schedule = lr_lambda(warmup, total, warmup_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    if state is not None:
        try:
            method.load_prompt_state_dict(state["prompts"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"--resume: {state_path} does not fit this model: {type(e).__name__}: {first}") from None
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

    def kept() -> str:
        if saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last checkpoint (step {saved_step}) in {out} is kept; continue with --resume"

    bar = tqdm(total=total, initial=step, disable=not info.is_main, desc="rpp.train", dynamic_ncols=True)
    batches = iter(loader)
    grace = min(tcfg.stall_timeout, SIGNAL_GRACE_S) if tcfg.stall_timeout > 0 else SIGNAL_GRACE_S
    with stop_on_signals() as stop, Watchdog(tcfg.stall_timeout, grace, kept) as watchdog:
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
                epoch = step // batches_per_epoch if batches_per_epoch else None  # augmented caches: per epoch
                topk = tuple(t.to(info.device) for t in cache.lookup(indices, epoch, n_views))
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
                started = _STARTED.pop("t", None)
                if started is not None and info.is_main:
                    bar.write(f"rpp.train: startup: first batch loaded in {t1 - t0:.1f} s; first step done "
                              f"{t2 - started + _STARTED['age']:.1f} s after launch ({_STARTED['age']:.1f} s of it "
                              "interpreter start and imports)")  # fmt: skip

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
                watchdog.heartbeat()
            except NonFiniteError as e:
                bar.close()
                good = (
                    f"kept the last good checkpoint (step {saved_step}) in {out}"
                    if saved_step is not None
                    else ("no checkpoint had been written yet")
                )
                print(f"rpp.train: error: {e}; stopping, {good}", file=sys.stderr)
                return EXIT_NON_FINITE
            except RuntimeError as e:
                if not (info.enabled and collective_failed(e)):
                    raise
                bar.close()
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                print(f"rpp.train: error: a collective failed on rank {info.rank} (a peer rank died or stalled?): "
                      f"{first}; {kept()}", file=sys.stderr)  # fmt: skip
                return EXIT_STALLED
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
