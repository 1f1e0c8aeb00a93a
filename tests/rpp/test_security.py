"""Nothing read from disk runs code: a crafted pickle at every entry point that reads a file is refused with a
one-line error, and its payload (creating a marker file) never runs.

Each payload is first shown to be live: a plain ``torch.load(weights_only=False)`` of the same file does create
the marker, so these tests fail if an entry point ever unpickles arbitrary objects again.
"""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from rpp import checkpoint, data, eval, pomp_convert, teacher_cache, train
from rpp.models import register_tiny_models

FAST = ["--batch-size", "4", "--num-workers", "0", "--max-steps", "1"]


class Payload:
    """Unpickling this calls builtins.open(marker, "w"): the marker file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


def _payload_file(path: Path, marker: Path, wrap=lambda p: {"payload": p}) -> Path:
    """torch.save a dict holding a Payload; checks that an unsafe load would run it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Payload(marker)), path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload must be live for the test to mean anything"
    marker.unlink()
    return path


def _one_line_error(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def _state_like(payload):
    """A training state whose RNG entry is the payload (numpy RNG state used to be the one non-tensor)."""
    return {"format": checkpoint.STATE_FORMAT, "version": checkpoint.SCHEMA_VERSION, "step": 1, "seed": 0,
            "rng": [{"numpy": payload}]}  # fmt: skip


@pytest.mark.parametrize("form", ["file", "directory", "latest"])
def test_train_resume_never_runs_a_payload(tmp_path, marker, capsys, form):
    run = tmp_path / "run"
    state = _payload_file(run / checkpoint.STATE_FILE, marker, _state_like)
    resume = {"file": ["--resume", str(state)], "directory": ["--resume", str(run)], "latest": ["--resume"]}[form]
    output = run if form == "latest" else tmp_path / "out"
    assert train.main([*FAST, *resume, "--output", str(output)]) == 2
    assert not marker.exists()
    assert "refusing to read training state" in _one_line_error(capsys, "rpp.train")


@pytest.mark.parametrize("form", ["file", "directory"])
def test_eval_checkpoint_never_runs_a_payload(tmp_path, marker, capsys, form):
    run = tmp_path / "run"
    prompts = _payload_file(run / checkpoint.PROMPTS_FILE, marker)
    _payload_file(run / checkpoint.STATE_FILE, marker, _state_like)  # the directory form also looks at the state
    target = prompts if form == "file" else run
    assert eval.main(["--checkpoint", str(target), "--num-workers", "0"]) == 2
    assert not marker.exists()
    assert "refusing to read" in _one_line_error(capsys, "rpp.eval")


@pytest.mark.parametrize("option", ["--pretrained", "--teacher-pretrained"])
def test_weights_files_never_run_a_payload(tmp_path, marker, capsys, option):
    weights = _payload_file(tmp_path / "weights.pt", marker, lambda p: {"visual.proj": p})
    assert train.main([*FAST, option, str(weights), "--output", str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert "cannot load weights" in _one_line_error(capsys, "rpp.train")


def test_torchscript_is_loaded_only_on_the_explicit_opt_in(tmp_path, capsys, monkeypatch):
    """torch.jit.load runs the archive's code: without --trust-torchscript naming that file it is never called."""
    register_tiny_models()
    archive = tmp_path / "openai.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(open_clip.create_model("rpp-tiny")), archive)
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.jit.load called"))
    assert train.main([*FAST, "--pretrained", str(archive), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys, "rpp.train")
    assert "TorchScript archive, which can run code" in line and "--trust-torchscript" in line
    other = tmp_path / "other.pt"
    other.write_bytes(archive.read_bytes())
    args = [*FAST, "--pretrained", str(archive), "--trust-torchscript", str(other), "--output", str(tmp_path / "o")]
    assert train.main(args) == 2  # trusting another file does not trust this one
    assert "TorchScript archive" in _one_line_error(capsys, "rpp.train")
    assert not calls
    # A TorchScript archive given as a checkpoint is never jit-loaded either.
    assert eval.main(["--checkpoint", str(archive), "--num-workers", "0"]) == 2
    assert "is a TorchScript archive, not a checkpoint" in _one_line_error(capsys, "rpp.eval")
    assert not calls


def _builtin_cache(folder: Path, marker: Path, poisoned: str) -> None:
    """A complete-looking teacher cache for the built-in data whose `poisoned` array is a pickled object array."""
    spec = data.resolve(None, None, None, 0)
    n, k = len(spec.source), 2
    folder.mkdir(parents=True)
    meta = {"n": n, "k": k, "classes": len(spec.classnames), "fingerprint": teacher_cache.fingerprint(spec),
            "teacher": "rpp-tiny-teacher", "teacher_pretrained": None, "temperature": 1.0, "seed": 0,
            "chunk": n}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "progress-0.json").write_text(json.dumps({"done": [0]}))
    np.save(folder / "indices.npy", np.zeros((n, k), np.int32))
    np.save(folder / "probs.npy", np.zeros((n, k), np.float16))
    evil = np.empty((n, k), dtype=object)
    evil[0, 0] = Payload(marker)
    np.save(folder / poisoned, evil, allow_pickle=True)
    np.load(folder / poisoned, allow_pickle=True)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("poisoned", ["indices.npy", "probs.npy"])
def test_teacher_caches_never_run_a_payload(tmp_path, marker, capsys, poisoned):
    cache = tmp_path / "cache"
    _builtin_cache(cache, marker, poisoned)
    assert train.main([*FAST, "--teacher-cache", str(cache), "--output", str(tmp_path / "out")]) == 2
    assert f"{poisoned} is unreadable or torn" in _one_line_error(capsys, "rpp.train")
    # Resuming the build of that cache reads the same arrays.
    args = ["--output", str(cache), "--chunk", "384", "--num-workers", "0", "--topk", "2"]
    assert teacher_cache.main(args) == 2
    assert f"{poisoned} is unreadable or torn" in _one_line_error(capsys, "rpp.teacher_cache")
    assert not marker.exists()


def test_class_embedding_caches_never_run_a_payload(tmp_path, marker):
    """The teacher's cached class embeddings (a weights file gives a cache): every cached file poisoned."""
    from rpp.teacher import Teacher

    register_tiny_models()
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.create_model("rpp-tiny-teacher").state_dict(), weights)
    names = ["red circle", "blue square", "green triangle"]
    cache = tmp_path / "cache"
    Teacher("rpp-tiny-teacher", str(weights), names, torch.device("cpu"), cache_dir=cache)
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached, "the teacher wrote no class-embedding cache"
    for path in cached:
        _payload_file(path, marker, lambda p: p)
    with pytest.warns(UserWarning, match="ignoring unreadable class-embedding cache"):
        teacher = Teacher("rpp-tiny-teacher", str(weights), names, torch.device("cpu"), cache_dir=cache)
    assert not marker.exists()
    assert teacher.class_embeds_info["source"] == "computed"  # derived data: recomputed, and the cache rewritten
    again = Teacher("rpp-tiny-teacher", str(weights), names, torch.device("cpu"), cache_dir=cache)
    assert again.class_embeds_info["source"] == "cache"
    torch.testing.assert_close(again.class_embeds, teacher.class_embeds)


def test_spt_resume_never_runs_a_payload(tmp_path, marker, capsys):
    from rpp.spt import train as spt_train

    run = tmp_path / "spt"
    _payload_file(run / spt_train.STATE_FILE, marker, _state_like)
    assert spt_train.main(["--resume", str(run)]) == 2
    assert not marker.exists()
    _one_line_error(capsys, "rpp.spt")


def test_pomp_convert_never_runs_a_payload(tmp_path, marker, capsys):
    dassl = _payload_file(tmp_path / "pomp.pth.tar", marker, lambda p: {"state_dict": {"ctx": torch.zeros(4, 8)},
                                                                         "scheduler": p})  # fmt: skip
    pomp_convert.main(["--checkpoint", str(dassl), "--output", str(tmp_path / "out.pt")])
    capsys.readouterr()
    assert not marker.exists()
