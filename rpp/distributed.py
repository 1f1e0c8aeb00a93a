"""torchrun-compatible process-group setup: ranks and world size from the environment, never hard-coded.

Single process when WORLD_SIZE is unset or 1. Backend: NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rpp.errors import EXIT_USER_ERROR, UserError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(timeout_s: float = 1800.0) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group if WORLD_SIZE > 1.

    `timeout_s` bounds every collective: a stalled peer makes the others fail after it instead of blocking forever
    (rpp.train's watchdog stops the run cleanly before that)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    return DistInfo(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when distributed; identity otherwise."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item())


def cli_main(prog: str, run: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a CLI: a UserError is one line on stderr and exit EXIT_USER_ERROR; the process group always ends."""
    try:
        return run(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        shutdown()


def stop_now(code: int, message: str) -> typing.NoReturn:
    """Print `message`, kill this process's data-loader workers (they ignore SIGINT/SIGTERM, so nothing else would
    stop them) and exit with `code` at once, skipping the clean-up that would wait for them. Committed checkpoints
    stay as they are; a half-written temporary file is removed when the next run starts."""
    print(message, file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():
        # torch's DataLoader installs a SIGCHLD handler that raises "worker is killed" into whatever runs when a
        # worker dies: the workers are killed on purpose here, so it must not turn this exit into a traceback.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        children = multiprocessing.active_children()
        for child in children:
            child.kill()
        for child in children:  # reaped here: no zombie outlives the run
            child.join(timeout=2)
        sys.stdout.flush()
    finally:
        os._exit(code)
