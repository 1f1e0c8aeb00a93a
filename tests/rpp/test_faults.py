"""Fault suite for the training tools: kills at random steps and during saves, disk full, torn files, a second
signal, and a table of bad command lines.

Resume is checked bit for bit: every logged loss term and learning rate of a run killed (SIGTERM, SIGINT, kill -9 at
a random step, kill -9 in the middle of writing a checkpoint) and resumed equals the uninterrupted run's, and so do
the final prompts, on an image folder and on webdataset shards, both with corrupt images. Every run is a subprocess
with one thread, so the reference and the resumed runs compute alike. The kill points are drawn at random; the seed
is printed in every failure message (set RPP_FAULT_SEED to replay one).
"""

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rpp import checkpoint, eval, teacher_cache, train
from rpp import data as rpp_data
from rpp.metrics_log import MetricsLog

SEED = int(os.environ.get("RPP_FAULT_SEED", time.time_ns() % 100_000))
RUN = ["--batch-size", "2", "--log-every", "1", "--save-every", "2", "--max-steps", "6", "--classes-per-step", "3",
       "--kd-topk", "1", "--no-tensorboard", "--num-workers", "0"]  # fmt: skip
KILL_RUN_STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# kill -9 in the middle of the N-th checkpoint file write (half the bytes written), from inside the process: a real
# SIGKILL at the worst moment, deterministically. Writes alternate train_state.pt, prompts.pt (steps 2, 4, 6).
KILL_IN_SAVE = """
import io, os, signal, sys
import torch
from rpp import train
n, original, calls = int(os.environ["KILL_AT_SAVE"]), torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += isinstance(obj, dict) and obj.get("format") in ("rpp.train_state", "rpp.prompts")
    if calls[0] == n:
        buf = io.BytesIO()
        original(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, f, *args, **kwargs)
torch.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """An image folder (3 classes x 5 images + 2 corrupt files) and 2 webdataset shards (8 samples, 2 corrupt)."""
    root = tmp_path_factory.mktemp("fault-data")
    folder = root / "folder"
    for c, name in enumerate(["red", "green", "blue"]):
        (folder / name).mkdir(parents=True)
        for i in range(5):
            (folder / name / f"{i}.jpg").write_bytes(_jpeg((40 * i, 80 * c, 200 - 30 * i)))
    (folder / "green" / "5.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "blue" / "5.jpg").write_bytes(_jpeg((1, 2, 3))[:40])  # truncated
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:04d}.tar", "w") as tar:
            for i in range(8):
                jpg = b"corrupt" if (s, i) in {(0, 3), (1, 6)} else _jpeg((30 * i, 60 * s, 90))
                for ext, payload in (("jpg", jpg), ("cls", str((i + s) % 3).encode())):
                    info = tarfile.TarInfo(f"{s}_{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    names = root / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    return {
        "imagefolder": ["--data", str(folder)],
        "webdataset": ["--data", str(shards), "--classnames", str(names)],
    }


def _train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rpp.train", *args]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(_train_cmd(args), capture_output=True, text=True, env=ENV, timeout=600, **kwargs)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {step} (exit {proc.poll()}, RPP_FAULT_SEED={SEED})")


def _assert_same_run(reference: Path, resumed: Path, what: str, steps: int = 6) -> None:
    ref, res = _records(reference), _records(resumed)
    assert [r["step"] for r in res] == [r["step"] for r in ref], (what, SEED)
    for a, b in zip(ref, res, strict=True):
        for key in ("loss", "ce", "kd", "lr", "skipped_images"):
            assert a[key] == b[key], (what, a["step"], key, a[key], b[key], f"RPP_FAULT_SEED={SEED}")
    final_ref = checkpoint.load_prompts(reference / checkpoint.PROMPTS_FILE)
    final_res = checkpoint.load_prompts(resumed / checkpoint.PROMPTS_FILE)
    assert final_res["step"] == final_ref["step"] == steps
    for key, value in final_ref["prompts"].items():
        assert torch.equal(value, final_res["prompts"][key]), (what, key, SEED)
    assert not list(resumed.glob(".*.tmp")), "stale temporary files were not removed"


def _resume(out: Path, args: list[str]) -> None:
    """Continue a killed run (or start it again when it died before its first checkpoint)."""
    resume = ["--resume"] if (out / checkpoint.STATE_FILE).exists() else []
    proc = _run([*args, "--output", str(out), *resume])
    assert proc.returncode == 0, (proc.stderr[-3000:], SEED)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_kills_at_random_points_resume_bit_exactly(tmp_path, datasets, fmt):
    """One uninterrupted run; three killed ones (SIGTERM or SIGINT at a random step, kill -9 at a random step with
    data workers, kill -9 inside a random checkpoint write), each resumed: all four equal, bit for bit."""
    rng = random.Random(f"{SEED}-{fmt}")
    # webdataset: data workers read shards in the same order in every run (the stream is split over workers);
    # imagefolder: the kill -9 run also checks that the number of workers does not change the batches.
    workers = {"imagefolder": ["--num-workers", "0"], "webdataset": ["--num-workers", "2"]}[fmt]
    # Kills land at steps 1-5 of KILL_RUN_STEPS: a fast machine (~10-30 steps/s) cannot finish the run between the
    # test seeing step 5 and its signal arriving, which with 6 steps it sometimes did.
    args = [*RUN, *datasets[fmt], *workers, "--max-steps", str(KILL_RUN_STEPS)]
    ref, soft, hard, in_save = (tmp_path / name for name in ("ref", "soft", "hard", "in-save"))
    sig = rng.choice([signal.SIGTERM, signal.SIGINT])
    soft_step, hard_step, save_call = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5)

    reference = subprocess.Popen(_train_cmd([*args, "--output", str(ref)]), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    stopped = subprocess.Popen(_train_cmd([*args, "--output", str(soft)]), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_step(stopped, soft, soft_step)
    stopped.send_signal(sig)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + sig, (err[-2000:], SEED)
    assert "Traceback" not in err
    assert reference.wait(timeout=600) == 0, (reference.stderr.read()[-3000:], SEED)

    killed = subprocess.Popen(_train_cmd([*args, "--num-workers", "2", "--output", str(hard)]), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # (for imagefolder the resumed run below uses --num-workers 2 as well: a map-style resume may change it)
    _wait_for_step(killed, hard, hard_step)
    killed.kill()
    killed.wait(timeout=60)
    kill_env = {**ENV, "KILL_AT_SAVE": str(save_call)}
    in_save_run = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args, "--output", str(in_save)],
                                 env=kill_env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert in_save_run.returncode == -signal.SIGKILL, (in_save_run.stderr[-2000:], SEED)
    assert list(in_save.glob(".*.tmp")), "the kill inside a save should leave its temporary file"

    _resume(soft, args)
    _resume(hard, [*args, "--num-workers", "2"])
    _resume(in_save, args)
    for what, out in (("signal", soft), ("kill -9", hard), ("kill -9 in save", in_save)):
        _assert_same_run(ref, out, f"{fmt}: {what}", KILL_RUN_STEPS)


def _running_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_second_signal_stops_at_once_with_workers_and_keeps_the_checkpoint(tmp_path, datasets):
    out = tmp_path / "run"
    args = [*RUN, *datasets["imagefolder"], "--num-workers", "2", "--max-steps", "500", "--save-every", "1"]
    proc = subprocess.Popen(_train_cmd([*args, "--output", str(out)]), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for_step(proc, out, 2)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a scheduler or Ctrl-C does: workers ignore it
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        start = time.time()
        _, err = proc.communicate(timeout=60)
        took = time.time() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert took < 20, took
    assert "Traceback" not in err
    assert not _running_in_group(proc.pid), "a data worker outlived the run"
    state = checkpoint.load_train_state(out / checkpoint.STATE_FILE)  # the last committed checkpoint is intact
    assert state["step"] >= 2


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, datasets, capsys, monkeypatch):
    out = tmp_path / "run"
    original, states = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        states[0] += isinstance(obj, dict) and obj.get("format") == checkpoint.STATE_FORMAT
        if states[0] == 2:  # the training state of the second checkpoint (step 4)
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert train.main([*RUN, *datasets["imagefolder"], "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "No space left on device" in err[0] and "is kept" in err[0], err
    assert checkpoint.load_train_state(out / checkpoint.STATE_FILE)["step"] == 2
    assert checkpoint.load_prompts(out / checkpoint.PROMPTS_FILE)["step"] == 2
    assert not list(out.glob(".*.tmp"))


def test_torn_and_malformed_files_are_one_line_errors(tmp_path, datasets, capsys):
    run = tmp_path / "run"
    args = [*RUN, *datasets["imagefolder"], "--max-steps", "2"]
    assert train.main([*args, "--output", str(run)]) == 0
    capsys.readouterr()
    state = checkpoint.load_train_state(run / checkpoint.STATE_FILE)

    def resume_error(obj_or_bytes) -> str:
        bad = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
        bad.mkdir()
        path = bad / checkpoint.STATE_FILE
        if isinstance(obj_or_bytes, bytes):
            path.write_bytes(obj_or_bytes)
        else:
            torch.save(obj_or_bytes, path)
        assert train.main([*args, "--resume", str(bad), "--output", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rpp.train: error: "), err
        return err[0]

    raw = (run / checkpoint.STATE_FILE).read_bytes()
    assert "cannot read training state" in resume_error(raw[: len(raw) // 2])  # torn
    assert "cannot read training state" in resume_error(b"")
    nan = {k: v.clone().fill_(float("nan")) for k, v in state["prompts"].items()}
    assert "non-finite prompt values" in resume_error({**state, "prompts": nan})  # never "the last good checkpoint"
    assert "'step' must be an integer >= 0" in resume_error({**state, "step": -1})
    assert "schema version 0" in resume_error({**state, "version": 0})
    assert "no 'optimizer'" in resume_error({k: v for k, v in state.items() if k != "optimizer"})
    assert "'rng[0].torch' must be a uint8 tensor" in resume_error({**state, "rng": [{"torch": torch.zeros(3)}]})
    assert "'method_config' must be a dict" in resume_error({**state, "method_config": ["rpp"]})
    assert "is not a training state written by rpp.train" in resume_error(checkpoint.prompts_of(state))

    prompts = checkpoint.prompts_of(state)
    for bad, message in (({**prompts, "method_config": ["a", "list"]}, "'method_config' must be a dict"),
                         ({**prompts, "method_config": {**prompts["method_config"], "n_ctx": 0}}, "--n-ctx"),
                         ({**prompts, "classnames": "red"}, "'classnames' must be a list")):  # fmt: skip
        torch.save(bad, tmp_path / "p.pt")
        assert eval.main(["--checkpoint", str(tmp_path / "p.pt"), "--num-workers", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    # A torn last line of metrics.jsonl (kill -9 mid-write) is dropped on resume; --max-steps may change.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')
    assert train.main([*args, "--max-steps", "3", "--resume", "--output", str(run)]) == 0
    assert [r["step"] for r in _records(run)] == [1, 2, 3]


def test_resume_refuses_changed_hyperparameters_and_repairs_prompts(tmp_path, datasets, capsys):
    run = tmp_path / "run"
    args = [*RUN, *datasets["imagefolder"], "--max-steps", "2"]
    assert train.main([*args, "--output", str(run)]) == 0
    capsys.readouterr()
    for option, value in (("--lr", "0.01"), ("--weight-decay", "0.1"), ("--kd-weight", "0.5"), ("--seed", "3")):
        assert train.main([*args, option, value, "--resume", "--output", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--resume: {option} was" in err[0], err
    # prompts.pt a step behind the committed state (a kill between the two renames) + stale temp files
    state = checkpoint.load_train_state(run / checkpoint.STATE_FILE)
    checkpoint.atomic_save({**checkpoint.prompts_of(state), "step": 1}, run / checkpoint.PROMPTS_FILE)
    (run / f".{checkpoint.STATE_FILE}.abc.tmp").write_bytes(b"half")
    _, newest = checkpoint.resolve_prompts(run)
    assert newest["step"] == 2  # rpp.eval on the run directory takes the committed state's prompts
    assert train.main([*args, "--resume", "--output", str(run)]) == 0  # finished: repairs, continues nothing
    assert checkpoint.load_prompts(run / checkpoint.PROMPTS_FILE)["step"] == 2
    assert not list(run.glob(".*.tmp"))


def test_eval_is_deterministic_for_random_weight_students(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--batch-size", "4", "--num-workers", "0", "--max-steps", "1", "--output", str(run),
                       "--no-tensorboard", "--eval-batch-size", "192"]) == 0  # fmt: skip
    results = []
    for _ in range(2):
        assert eval.main(["--checkpoint", str(run), "--num-workers", "0", "--batch-size", "192"]) == 0
        results.append(capsys.readouterr().out.split("zero-shot on")[-1].split(":", 1)[1])
    assert results[0] == results[1]
    trained = json.loads((run / "eval.json").read_text())
    assert f"{trained['learned']['top1']:6.2f}%" in results[0]  # the same student as in training


def _cache(folder: Path) -> None:
    """A small complete teacher cache for the built-in data (rows are not needed to test its file checks)."""
    spec = rpp_data.resolve(None, None, None, 0)
    n = len(spec.source)
    folder.mkdir()
    meta = {"n": n, "k": 2, "classes": 12, "fingerprint": teacher_cache.fingerprint(spec), "temperature": 1.0,
            "teacher": "rpp-tiny-teacher", "teacher_pretrained": None, "seed": 0, "chunk": n}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "progress-0.json").write_text(json.dumps({"done": [0]}))
    np.save(folder / "indices.npy", np.zeros((n, 2), np.int32))
    np.save(folder / "probs.npy", np.zeros((n, 2), np.float16))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


CORRUPT_CACHES = {
    "truncated meta.json": (lambda d: _truncate(d / "meta.json"), "meta.json (the cache description) is unreadable"),
    "empty meta.json": (lambda d: (d / "meta.json").write_text(""), "meta.json (the cache description) is unread"),
    "no fingerprint": (
        lambda d: (d / "meta.json").write_text(
            json.dumps({**json.loads((d / "meta.json").read_text()), "fingerprint": None})
        ),  # fmt: skip
        "no valid 'fingerprint'",
    ),
    "truncated progress": (lambda d: _truncate(d / "progress-0.json"), "progress-0.json (a progress marker) is unre"),
    "foreign progress": (lambda d: (d / "progress-0.json").write_text("[1]"), "is not a progress marker"),
    "truncated indices.npy": (lambda d: _truncate(d / "indices.npy"), "indices.npy is unreadable or torn"),
    "missing probs.npy": (lambda d: (d / "probs.npy").unlink(), "probs.npy is missing"),
    "empty indices.npy": (lambda d: (d / "indices.npy").write_bytes(b""), "indices.npy is unreadable or torn"),
    "mis-shaped probs.npy": (
        lambda d: np.save(d / "probs.npy", np.zeros((3, 2), np.float16)),
        "probs.npy holds float16 [3, 2], expected float16 [384, 2]",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPT_CACHES))
def test_corrupt_teacher_caches_are_one_line_errors(tmp_path, capsys, kind):
    folder = tmp_path / "cache"
    _cache(folder)
    damage, message = CORRUPT_CACHES[kind]
    damage(folder)
    assert train.main([*RUN, "--teacher-cache", str(folder), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rpp.train: error: ") and message in err[0], err


def test_teacher_cache_fingerprint_is_path_normalised_and_content_aware(tmp_path, datasets, capsys, monkeypatch):
    folder = Path(datasets["imagefolder"][1])
    data_copy = tmp_path / "data"
    shutil.copytree(folder, data_copy)  # copy2: the same modification times
    cache = tmp_path / "cache"
    build = ["--num-workers", "0", "--topk", "2", "--chunk", "8", "--output", str(cache)]
    assert teacher_cache.main([*build, "--data", str(data_copy), "--verify"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    spec = rpp_data.resolve("data", None, None)  # relative path: the same images
    teacher_cache.TeacherCache.open(str(cache), spec, temperature=1.0)
    # Same name, other bytes, same size and mtime: only --verify can tell.
    image = data_copy / "red" / "0.jpg"
    stat = image.stat()
    other = bytearray(image.read_bytes())
    other[-3] ^= 0xFF
    image.write_bytes(bytes(other))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert teacher_cache.main([*build, "--data", "data", "--verify"]) == 2
    assert "--verify: the files of --data differ" in capsys.readouterr().err
    # A replaced image (new mtime) is refused by the cheap fingerprint.
    image.write_bytes(_jpeg((9, 9, 9)))
    spec = rpp_data.resolve("data", None, None)
    with pytest.raises(checkpoint.UserError, match="different images or classes"):
        teacher_cache.TeacherCache.open(str(cache), spec, temperature=1.0)


BAD_TRAIN = [
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--kd-weight", "nan"], "--kd-weight"),
    (["--ce-weight", "inf"], "--ce-weight"),
    (["--temperature", "inf"], "--temperature"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--stall-timeout", "-1"], "--stall-timeout"),
    (["--stall-timeout", "nan"], "--stall-timeout"),
    (["--data", ""], "--data"),
    (["--model", "no-such-model"], "--model"),
    (["--teacher", "no-such-model"], "--teacher"),
    (["--batch-size", "0"], "--batch-size"),
    (["--views", "0"], "--views"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--trust-torchscript", "/no/such/file.pt"], "--trust-torchscript"),
    (["--warmup", "-1"], "--warmup"),
    (["--seed", "x"], "--seed"),
    (["--data-format", "zip"], "--data-format"),
    (["--n-ctx", "0"], "--n-ctx"),
]
BAD_EVAL = [
    (["--batch-size", "0"], "--batch-size"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--checkpoint", "/no/such/prompts.pt"], "--checkpoint"),
    ([], "--checkpoint"),
    (["--data", ""], "--data"),
    (["--trust-torchscript", "/no/such/file.pt"], "--trust-torchscript"),
    (["--batch-size", "inf"], "--batch-size"),
]
BAD_CACHE = [
    (["--topk", "0"], "--topk"),
    (["--chunk", "0"], "--chunk"),
    (["--batch-size", "0"], "--batch-size"),
    (["--teacher", "none"], "--teacher"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--data", ""], "--data"),
    (["--trust-torchscript", "/no/such/file.pt"], "--trust-torchscript"),
]


@pytest.mark.parametrize(
    "tool, args, option",
    [("train", *case) for case in BAD_TRAIN]
    + [("eval", *case) for case in BAD_EVAL]
    + [("teacher_cache", *case) for case in BAD_CACHE],  # fmt: skip
)
def test_bad_command_lines_exit_2_with_one_line_naming_the_option(tmp_path, capsys, tool, args, option):
    main = {"train": train.main, "eval": eval.main, "teacher_cache": teacher_cache.main}[tool]
    extra = {"train": ["--output", str(tmp_path / "out")], "teacher_cache": ["--output", str(tmp_path / "out")],
             "eval": [] if option == "--checkpoint" else ["--checkpoint", str(tmp_path / "absent")]}[tool]  # fmt: skip
    assert main([*extra, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rpp.{tool}: error: "), err
    assert option in err[0], err


def test_bad_command_lines_in_a_subprocess_print_no_traceback(tmp_path):
    """The same contract through `python -m` (argparse, logging and warnings included), for a few cases."""
    for args, option in [(["--lr", "inf"], "--lr"), (["--data", ""], "--data"), (["--model", "nope"], "--model")]:
        proc = _run([*args, "--output", str(tmp_path / "out")])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and option in lines[0], proc.stderr


# Two gloo ranks without torchrun; rank 1 stops itself (SIGSTOP: stalled, not dead) right after joining, rank 0 blocks
# in all_reduce under the watchdog and the SIGINT/SIGTERM handlers, as rpp.train's loop does.
STALLED_PEER = """
import os, signal, sys
import torch, torch.distributed as dist
from rpp import distributed, train
info = distributed.init(timeout_s=float(os.environ["PG_TIMEOUT"]))
if info.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
print("blocked", flush=True)
with train.stop_on_signals(), train.Watchdog(float(os.environ["STALL"]), float(os.environ["GRACE"]), lambda: "kept"):
    dist.all_reduce(torch.ones(1))
print("all_reduce returned", flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["stall timeout", "signal while blocked"])
def test_a_stalled_rank_becomes_a_clean_stop(tmp_path, case):
    """No step for --stall-timeout seconds: exit 4 with one line; SIGTERM while blocked in a collective (where no
    Python handler runs): exit 143 after the grace period instead of hanging."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PG_TIMEOUT": "300", "STALL": "3" if case == "stall timeout" else "0", "GRACE": "2"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", STALLED_PEER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    try:
        assert procs[0].stdout.readline().strip() == "blocked"
        start = time.time()
        if case == "signal while blocked":
            time.sleep(1)
            procs[0].send_signal(signal.SIGTERM)
        _, err = procs[0].communicate(timeout=120)
        took = time.time() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    if case == "stall timeout":
        assert procs[0].returncode == train.EXIT_STALLED, err
        assert len(lines) == 1 and "no training step finished in 3 s" in lines[0] and "kept" in lines[0], err
    else:
        assert procs[0].returncode == 128 + signal.SIGTERM, err
        assert "no checkpoint within 2 s of SIGTERM" in err and "Traceback" not in err, err
    assert took < 60, took


def test_an_empty_class_folder_is_refused(tmp_path, capsys):
    for name in ("cat", "dog", "empty"):
        (tmp_path / "data" / name).mkdir(parents=True)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name / "0.jpg").write_bytes(_jpeg((1, 2, 3)))
    assert train.main([*RUN, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hold no images, e.g. 'empty'" in err[0] and "--data" in err[0], err


def test_resumed_metrics_drop_torn_and_repeated_records_and_purge_tensorboard(tmp_path, monkeypatch):
    made = {}

    class Writer:  # stands in for tensorboard's SummaryWriter (tensorboard is optional)
        def __init__(self, logdir, purge_step=None):
            made.update(logdir=logdir, purge_step=purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # resumed at 2; torn last line
    log = MetricsLog(path, tmp_path / "tb", truncate_after_step=2)
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert made["purge_step"] == 3  # TensorBoard hides the old steps 3, 4 instead of showing them twice
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 1.0}\n'


def _generated_bad_values() -> list[tuple[str, str, str]]:
    """(tool, option, value) for every option of every tool: non-numbers and fractions for int options, inf/nan for
    float options, an unknown word for options with choices. New options are covered as soon as they exist."""
    import dataclasses
    import typing

    from rpp.config import TrainConfig, _unwrap
    from rpp.eval import EvalConfig
    from rpp.method import MethodConfig
    from rpp.teacher_cache import CacheConfig

    cases = []
    for tool, classes in (("train", [TrainConfig, MethodConfig]), ("eval", [EvalConfig]),
                          ("teacher_cache", [CacheConfig, MethodConfig])):  # fmt: skip
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                base, _, choices = _unwrap(hints[f.name])
                option = "--" + f.name.replace("_", "-")
                if f.metadata.get("choices") or choices:
                    cases.append((tool, option, "no-such-choice"))
                elif base is int:
                    cases += [(tool, option, "x"), (tool, option, "2.5")]
                elif base is float:
                    cases += [(tool, option, "inf"), (tool, option, "nan"), (tool, option, "-inf")]
    return cases


@pytest.mark.parametrize("tool, option, value", _generated_bad_values())
def test_every_option_rejects_nonsense_in_one_line(tmp_path, capsys, tool, option, value):
    main = {"train": train.main, "eval": eval.main, "teacher_cache": teacher_cache.main}[tool]
    extra = ["--checkpoint", str(tmp_path / "absent")] if tool == "eval" else ["--output", str(tmp_path / "out")]
    assert main([*extra, option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rpp.{tool}: error: ") and option in err[0], err


def _pid_with_env(*entries: str) -> int | None:
    """The pid of the rpp.train process whose environment holds all `entries` ("KEY=value")."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = set(environ.read_bytes().split(b"\0"))
            cmdline = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if b"rpp.train" in cmdline and all(e.encode() in env for e in entries):
            return int(environ.parent.name)
    return None


def test_a_dead_torchrun_rank_stops_the_others_cleanly(tmp_path, datasets):
    """kill -9 of rank 1 mid-run: rank 0 stops with one line instead of a collective traceback (or a hang), and the
    last checkpoint is intact."""
    tag = f"RPP_FAULT_TAG={os.getpid()}-{time.time_ns()}"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rpp.train",
           *RUN, *datasets["imagefolder"], "--max-steps", "400", "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**ENV, tag.split("=")[0]: tag.split("=")[1]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_step(proc, out, 3)
        rank1 = _pid_with_env(tag, "RANK=1")
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)
        stdout, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert 'rpp/train.py", line' not in err, err[-3000:]  # no traceback through rpp's code on the surviving rank
    clean = ("a collective failed on rank 0", "stopped by signal", "no checkpoint within")
    assert any(m in err + stdout for m in clean), err[-3000:]
    state = checkpoint.load_train_state(out / checkpoint.STATE_FILE)
    assert state["step"] >= 2 and state["world_size"] == 2


def test_a_stalled_torchrun_rank_becomes_a_clean_resumable_stop(tmp_path, datasets):
    """SIGSTOP of rank 1 (stalled, not dead): rank 0's watchdog stops it after --stall-timeout with exit 4 and one
    line; the run resumes from the last checkpoint."""
    tag = f"RPP_FAULT_TAG={os.getpid()}-{time.time_ns()}"
    out = tmp_path / "ddp"
    args = [*RUN, *datasets["imagefolder"], "--max-steps", "400", "--stall-timeout", "8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rpp.train",
           *args, "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**ENV, tag.split("=")[0]: tag.split("=")[1]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    rank1 = None
    try:
        _wait_for_step(proc, out, 3)
        rank0, rank1 = _pid_with_env(tag, "RANK=0"), _pid_with_env(tag, "RANK=1")
        os.kill(rank1, signal.SIGSTOP)
        start = time.time()
        while time.time() - start < 120 and Path(f"/proc/{rank0}").exists():
            time.sleep(0.2)
        stalled_for = time.time() - start
        os.kill(rank1, signal.SIGCONT)  # let torchrun's SIGTERM reach it
        stdout, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        if rank1 is not None and Path(f"/proc/{rank1}").exists():
            os.kill(rank1, signal.SIGKILL)
    assert 8 <= stalled_for < 60, stalled_for
    assert "no training step finished in 8 s" in err, err[-3000:]
    assert 'rpp/train.py", line' not in err, err[-3000:]
    step = checkpoint.load_train_state(out / checkpoint.STATE_FILE)["step"]
    assert step >= 2
    resumed = subprocess.run(cmd[:-2] + ["--output", str(out), "--max-steps", str(step + 1), "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.load_train_state(out / checkpoint.STATE_FILE)["step"] == step + 1
