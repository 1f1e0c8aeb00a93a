"""Checkpoints: a prompts-only file for inference and a full training state for `--resume`, both written atomically
and read back without running code.

Files in the output directory (schema version `SCHEMA_VERSION`, checked on load):
  train_state.pt  {"format": "rpp.train_state", "version", "step", "seed", "prompts", "method_config", "classnames",
                  "optimizer", "scheduler", "scaler", "rng" (one dict of tensors per rank), "world_size",
                  "position", "train_config"}: everything `--resume` needs to continue bit-for-bit.
  prompts.pt      {"format": "rpp.prompts", "version", "step", "seed", "prompts", "method_config", "classnames"}

Security: every file is read with `torch.load(weights_only=True)`, which unpickles only tensors and plain containers
(dict, list, tuple, str, int, float, bool, None), so a crafted file cannot run code; RNG states are therefore stored
as tensors, not numpy or Python objects. A file that holds anything else is refused with a one-line error. The only
format that can run code on load is a TorchScript archive (OpenAI's CLIP release); it is loaded only when the user
names that very file with `--trust-torchscript FILE` (see `check_torchscript_trusted`).

Atomicity: each file is written to a temporary file in the same directory, fsynced and renamed over the old one
(os.replace is atomic on POSIX), so a crash at any moment leaves either the previous or the new file, never a torn
one. The training state is written first and is the commit point: prompts.pt is derived from it, and `repair_prompts`
rewrites a prompts.pt left behind by a kill between the two renames. Temporary files a kill -9 left behind are
removed when the next run starts (`remove_stale_temp_files`).
"""

from __future__ import annotations

import math
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rpp.errors import UserError

PROMPTS_FILE = "prompts.pt"
STATE_FILE = "train_state.pt"
SCHEMA_VERSION = 1
PROMPTS_FORMAT = "rpp.prompts"
STATE_FORMAT = "rpp.train_state"
_TMP_SUFFIX = ".tmp"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` via a temporary file in the same directory + os.replace.

    A failed write (disk full, quota) is a one-line UserError naming the file; the previous file is kept and the
    temporary one removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        reason = e.strerror or str(e) or type(e).__name__
        raise UserError(f"cannot write {path}: {reason} (the previous {path.name}, if any, is kept)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: str | os.PathLike, names: tuple[str, ...] = (PROMPTS_FILE, STATE_FILE)) -> int:
    """Delete the temporary files `atomic_save` leaves when killed mid-write (`.<name>.<random>.tmp`) for the given
    file names in `folder`; returns how many were removed. Call it before this run writes anything there."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for name in names:
        for tmp in folder.glob(f".{name}.*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------------------
# RNG states, as tensors (a weights_only load accepts nothing else).


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The process's RNG states (torch, CUDA, numpy, python, the class-sampling `generator`), all as tensors."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },  # fmt: skip
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what `rng_state` returned (validated by `validate_rng`)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------------
# Reading.


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """TorchScript zip archives hold ``constants.pkl`` and a ``code/`` folder; loading one can run the code in it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


_trusted_torchscript: Path | None = None


def trust_torchscript(path: str | os.PathLike | None) -> None:
    """Allow the one TorchScript archive `path` (``--trust-torchscript FILE``) to be loaded; None allows none."""
    global _trusted_torchscript
    if path is None:
        _trusted_torchscript = None
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--trust-torchscript: file not found: {path}")
    _trusted_torchscript = p.resolve()


def check_torchscript_trusted(path: str | os.PathLike, role: str) -> None:
    """UserError unless the TorchScript archive `path` is the file the user named with ``--trust-torchscript``.

    torch.jit.load runs the TorchScript code inside the archive, so, unlike state dicts, such a file is loaded only
    on an explicit opt-in naming that very file (by any spelling of its path)."""
    if _trusted_torchscript is None or Path(path).expanduser().resolve() != _trusted_torchscript:
        raise UserError(
            f"{role}: {str(path)!r} is a TorchScript archive, which can run code when loaded; load it only if you "
            f"trust its source, with --trust-torchscript {path}"
        )


def load(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU: a dict, else a one-line UserError (missing, torn, not a torch file, or
    holding objects other than tensors and plain data: those are refused, never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if is_torchscript_archive(path):
        raise UserError(f"{what} {path} is a TorchScript archive, not a checkpoint written by rpp")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "global" in detail.lower():
            raise UserError(
                f"refusing to read {what} {path}: it holds Python objects other than tensors and plain data "
                f"({detail}; loading them could run code)"
            ) from None
        raise UserError(f"cannot read {what} {path}: not a torch checkpoint or corrupt ({detail})") from None
    except Exception as e:  # truncated zip, not a torch file, I/O error: all mean "corrupt or unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a checkpoint dictionary (got {type(obj).__name__})")
    return obj


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's weights_only refusal, without its advice to load with weights_only=False."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate) and "weights_only" not in line:
            return line.rstrip(".")
    return "unpickling failed"


class _Check:
    """Field checks with one-line UserErrors naming the file and the field."""

    def __init__(self, obj: dict, path: Path, what: str):
        self.obj, self.path, self.what = obj, path, what

    def fail(self, field: str, expected: str, value: Any = None, got: bool = True) -> UserError:
        shown = f", got {_short(value)}" if got else ""
        return UserError(f"{self.what} {self.path} is malformed: {field!r} must be {expected}{shown}")

    def field(
        self, name: str, types: type | tuple[type, ...], expected: str, parent: dict | None = None, where: str = ""
    ) -> Any:
        """obj[name] (or parent[name], reported as `where`.name) if it has one of `types`."""
        obj = self.obj if parent is None else parent
        label = f"{where}.{name}" if where else name
        if name not in obj:
            raise UserError(f"{self.what} {self.path} is malformed: no {label!r}")
        value = obj[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise self.fail(label, expected, value)
        return value

    def header(self, fmt: str) -> None:
        if self.obj.get("format") != fmt:
            kind, hint = {
                STATE_FORMAT: ("training state", "resume from the train_state.pt of a run directory"),
                PROMPTS_FORMAT: ("prompts checkpoint", "use the prompts.pt of a run directory"),
            }[fmt]
            raise UserError(
                f"{self.what} {self.path} is not a {kind} written by rpp.train "
                f"(format {_short(self.obj.get('format'))}); {hint}"
            )
        version = self.obj.get("version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{self.what} {self.path} has schema version {_short(version)}; this rpp reads version {SCHEMA_VERSION}"
            )

    def common(self) -> None:
        step = self.field("step", int, "an integer >= 0")
        if step < 0:
            raise self.fail("step", "an integer >= 0", step)
        self.field("seed", int, "an integer")
        prompts = self.field("prompts", dict, "a dict of tensors")
        for key, value in prompts.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise self.fail(f"prompts[{key!r}]", "a floating-point tensor under a string key", value)
            if not torch.isfinite(value).all():
                raise UserError(
                    f"{self.what} {self.path} holds non-finite prompt values ({key}): it is not a good checkpoint"
                )
        config = self.field("method_config", dict, "a dict of option values")
        for key, value in config.items():
            if not isinstance(key, str) or not isinstance(value, (str, int, float, bool, type(None))):
                raise self.fail(f"method_config[{key!r}]", "a plain option value under a string key", value)
        names = self.field("classnames", list, "a list of class names")
        if not names or not all(isinstance(n, str) for n in names):
            raise self.fail("classnames", "a non-empty list of strings", names)


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"tensor{list(value.shape)} {value.dtype}"
    return text if len(text) <= 60 else text[:57] + "..."


def validate_prompts(obj: dict, path: Path, what: str = "prompt checkpoint") -> dict:
    check = _Check(obj, path, what)
    check.header(PROMPTS_FORMAT)
    check.common()
    return obj


def validate_rng(state: Any, check: _Check, field: str) -> None:
    """An RNG dict as `rng_state` writes it, with tensors of the sizes this torch and numpy use."""
    if not isinstance(state, dict):
        raise check.fail(field, "a dict of RNG states", state)
    n_bytes = torch.get_rng_state().numel()
    for key in ("torch", "generator"):
        value = check.field(key, torch.Tensor, "a uint8 tensor", state, field)
        if value.dtype != torch.uint8 or value.shape != (n_bytes,):
            raise check.fail(f"{field}.{key}", f"a uint8 tensor of {n_bytes} bytes", value)
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
        raise check.fail(f"{field}.cuda", "a list of tensors or None", cuda)
    numpy = check.field("numpy", dict, "a dict", state, field)
    keys = check.field("keys", torch.Tensor, "an int64 tensor", numpy, f"{field}.numpy")
    if keys.dtype != torch.int64 or keys.shape != (624,) or bool(((keys < 0) | (keys >= 2**32)).any()):
        raise check.fail(f"{field}.numpy.keys", "624 uint32 values as an int64 tensor", keys)
    pos = check.field("pos", int, "an int", numpy, f"{field}.numpy")
    if not 0 <= pos <= 624:
        raise check.fail(f"{field}.numpy.pos", "in 0..624", pos)
    check.field("has_gauss", int, "an int", numpy, f"{field}.numpy")
    check.field("gauss", float, "a float", numpy, f"{field}.numpy")
    python = check.field("python", dict, "a dict", state, field)
    check.field("version", int, "an int", python, f"{field}.python")
    py_state = check.field("state", torch.Tensor, "an int64 tensor", python, f"{field}.python")
    if py_state.dtype != torch.int64 or py_state.shape != (625,) or bool(((py_state < 0) | (py_state > 2**32)).any()):
        raise check.fail(f"{field}.python.state", "625 Mersenne Twister words as an int64 tensor", py_state)
    gauss = python.get("gauss")
    if gauss is not None and not isinstance(gauss, float):
        raise check.fail(f"{field}.python.gauss", "a float or None", gauss)


def validate_train_state(obj: dict, path: Path, what: str = "training state") -> dict:
    check = _Check(obj, path, what)
    check.header(STATE_FORMAT)
    check.common()
    world = check.field("world_size", int, "an integer >= 1")
    if world < 1:
        raise check.fail("world_size", "an integer >= 1", world)
    rng = check.field("rng", list, "a list of per-rank RNG states")
    if len(rng) != world:
        raise check.fail("rng", f"one RNG state per rank ({world})", f"{len(rng)} states", got=True)
    for r, state in enumerate(rng):
        validate_rng(state, check, f"rng[{r}]")
    optimizer = check.field("optimizer", dict, "an optimizer state dict")
    for key in ("state", "param_groups"):
        check.field(key, (dict, list), "an optimizer state dict entry", optimizer, "optimizer")
    check.field("scheduler", dict, "a scheduler state dict")
    check.field("scaler", dict, "a gradient-scaler state dict")
    check.field("position", dict, "a dict")
    config = check.field("train_config", dict, "a dict of option values")
    for key, value in config.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool, type(None))):
            raise check.fail(f"train_config[{key!r}]", "a plain option value under a string key", value)
    return obj


def load_prompts(path: str | os.PathLike, what: str = "prompt checkpoint") -> dict:
    """A validated prompts checkpoint (see the module doc)."""
    return validate_prompts(load(path, what), Path(path), what)


def load_train_state(path: str | os.PathLike, what: str = "training state") -> dict:
    """A validated training state (see the module doc)."""
    return validate_train_state(load(path, what), Path(path), what)


PROMPT_KEYS = ("format", "version", "step", "seed", "prompts", "method_config", "classnames")


def prompts_of(state: dict) -> dict:
    """The prompts checkpoint equivalent to a training state."""
    return {**{k: state[k] for k in PROMPT_KEYS}, "format": PROMPTS_FORMAT}


def save_checkpoint(out: Path, state: dict) -> None:
    """Write a training state, then the prompts checkpoint derived from it (the state is the commit point)."""
    atomic_save(state, out / STATE_FILE)
    atomic_save(prompts_of(state), out / PROMPTS_FILE)


def repair_prompts(out: Path, state: dict) -> bool:
    """Rewrite ``out/prompts.pt`` from ``state`` when a kill between the two renames left it at another step."""
    path = out / PROMPTS_FILE
    try:
        current = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception:  # noqa: BLE001 - unreadable: rewritten below
        current = None
    if isinstance(current, dict) and current.get("step") == state["step"] and current.get("version") == SCHEMA_VERSION:
        return False
    atomic_save(prompts_of(state), path)
    return True


def resolve_prompts(path: str | os.PathLike) -> tuple[Path, dict]:
    """(file, validated prompts checkpoint) for ``rpp.eval --checkpoint``: a prompts.pt file, or a run directory's
    newest committed prompts (its train_state.pt's when a kill between the two renames left prompts.pt behind)."""
    p = Path(path)
    if not p.is_dir():
        return p, load_prompts(p)
    prompts_file, state_file = p / PROMPTS_FILE, p / STATE_FILE
    if not prompts_file.is_file() and not state_file.is_file():
        raise UserError(f"prompt checkpoint not found: no {PROMPTS_FILE} or {STATE_FILE} in run directory {p}")
    prompts = load_prompts(prompts_file) if prompts_file.is_file() else None
    if state_file.is_file():
        state = load_train_state(state_file)
        if prompts is None or state["step"] > prompts["step"]:
            return state_file, prompts_of(state)
    return prompts_file, prompts


def check_finite_options(values: dict[str, Any], prefix: str = "--") -> None:
    """UserError naming the first float option that is NaN or infinite."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"invalid value {value} for {prefix}{name.replace('_', '-')}: must be finite")


# ----------------------------------------------------------------------------------------------------------------
# Output directories and --resume.


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


def prompts_path(path: str) -> Path:
    """A prompts checkpoint file, or the prompts.pt inside a run directory."""
    p = Path(path)
    return p / PROMPTS_FILE if p.is_dir() else p
