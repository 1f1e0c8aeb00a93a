"""Checkpoints: a prompts-only file for inference and a full training state for `--resume`, both written atomically.

Files in the output directory:
  prompts.pt      {"prompts": method.prompt_state_dict(), "method_config": {...}, "classnames": [...], "step": int}
  train_state.pt  everything `--resume` needs to continue bit-for-bit: prompts, optimizer, scheduler, grad scaler,
                  step, RNG states (torch, CUDA, numpy, python, the class-sampling generator), data position, config.

Each file is written to a temporary file in the same directory, fsynced and renamed over the old one (os.replace is
atomic on POSIX), so a crash at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rpp.errors import UserError

PROMPTS_FILE = "prompts.pt"
STATE_FILE = "train_state.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` via a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def resolve_resume(resume: str, output: str) -> Path:
    """The train_state.pt meant by --resume: 'latest' = the output directory's, a directory = its train_state.pt."""
    path = Path(output if resume == "latest" else resume)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume: no training state at {path} (expected the {STATE_FILE} a previous run wrote)")
    return path


def check_output_dir(out: Path, resume_from: Path | None) -> None:
    """UserError unless `out` can take this run's checkpoints: a writable directory (or none yet) that holds no
    checkpoint, except the one this run continues with --resume (a fresh run would replace a finished one)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--output {out} is not writable")
    existing = [name for name in (STATE_FILE, PROMPTS_FILE) if (out / name).exists()]
    if existing and (resume_from is None or resume_from.resolve() != (out / STATE_FILE).resolve()):
        raise UserError(
            f"--output {out} already holds a checkpoint ({existing[0]}) that this run would overwrite: "
            "continue it with --resume, or choose another --output"
        )


def make_output_dir(out: Path) -> None:
    """Create ``--output`` (and its parents); a one-line UserError where that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output {out}: {e.strerror}") from None


def load(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load on CPU with a one-line UserError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle error, not a torch file: all mean "corrupt checkpoint"
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a checkpoint dictionary")
    return obj


def prompts_path(path: str) -> Path:
    """A prompts checkpoint file, or the prompts.pt inside a run directory."""
    p = Path(path)
    return p / PROMPTS_FILE if p.is_dir() else p
