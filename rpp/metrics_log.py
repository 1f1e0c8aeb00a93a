"""Metrics: JSON lines (one record per log step), TensorBoard when installed, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max_memory_allocated on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _step(line: str) -> int | None:
    """The step of a JSON-lines record; None for a blank, torn or foreign line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class MetricsLog:
    """Appends JSON records to `path`; mirrors numbers to TensorBoard under `tb_dir` if tensorboard is importable."""

    def __init__(self, path: str | Path, tb_dir: str | Path | None = None, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run repeats the steps after its checkpoint: drop the stale records of the interrupted run,
            # and a last line torn by a kill mid-write.
            keep = [line for line in self.path.read_text(errors="replace").splitlines() if _step(line) is not None]
            keep = [line for line in keep if _step(line) <= truncate_after_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = self.path.open("a")
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step: TensorBoard hides the events a resumed run writes again (else each shows twice)
                purge = None if truncate_after_step is None else truncate_after_step + 1
                self.tb = SummaryWriter(str(tb_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
