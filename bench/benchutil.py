"""Shared benchmark helpers: timing, saved-for-backward bytes, peak memory, and result files.

Results go to ``bench/results/<device>/<name>.json`` (written at the end of the pytest session by conftest.py), with
the device name, library versions, shapes and time quantiles of every case.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import statistics
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
_RECORDS: dict[str, list[dict]] = defaultdict(list)


def device_tag(device: torch.device | None = None) -> str:
    """A file-system-safe device name: the GPU's name, or ``cpu-<arch>``."""
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "xformers", "open_clip", "timm", "liger_kernel"):
        with contextlib.suppress(Exception):  # optional packages
            out[mod] = __import__(mod).__version__
    return out


def imagenet_classnames(n: int) -> list[str]:
    """C <= 1000: an evenly spaced subset of open_clip's ImageNet-1K names; more: the 1000 names cycled (the same
    token-length mix as real class lists)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    if n <= len(names):
        return [names[i * len(names) // n] for i in range(n)]
    return [names[i % len(names)] for i in range(n)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_quantiles(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10) -> dict[str, float]:
    """Median/p20/p80 ms of ``fn``: ``triton.testing.do_bench`` on CUDA (events, L2 flushed), wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = (), keep: bool = True) -> int:
    """Bytes autograd saves for backward while running ``fn`` (each storage counted once).

    Tensors sharing storage with ``exclude`` (inputs, frozen weights, parameters) are not counted: they exist anyway.
    ``keep=False`` counts without keeping what is saved (so a forward whose saved activations would not fit in memory
    can still be counted exactly; ``fn`` must not run backward): a storage is counted again only after it was freed,
    which the weak reference to its Python object (kept alive by PyTorch as long as the storage lives) tells.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, weakref.ref] = {}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and (ptr not in seen or seen[ptr]() is None):
            seen[ptr] = weakref.ref(storage)
            total += storage.nbytes()
        return t if keep else None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated CUDA memory above the starting point while running ``fn``; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def record(name: str, entry: dict) -> None:
    """Queue one benchmark case for ``bench/results/<device>/<name>.json``."""
    _RECORDS[name].append(entry)


def write_all() -> list[Path]:
    paths = []
    device = bench_device()
    for name, rows in _RECORDS.items():
        path = RESULTS_DIR / device_tag(device) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        payload = {
            "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "versions": versions(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": rows,
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        paths.append(path)
    _RECORDS.clear()
    return paths
