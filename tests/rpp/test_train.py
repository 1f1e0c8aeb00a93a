"""rpp.train end to end on the built-in dataset with the tiny models: default run, resume equivalence through a
SIGTERM stop, non-finite loss/parameters, and a 2-process torchrun (gloo) run."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

from rpp import checkpoint, train
from rpp.method import RPPMethod

SMALL = ["--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--eval-batch-size", "96"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _patch_loss(monkeypatch, on_call: int, action):
    """Wrap RPPMethod.loss so that `action(losses)` runs on its `on_call`-th call (1-based)."""
    original = RPPMethod.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        losses = original(self, *args, **kwargs)
        return action(losses) if calls["n"] == on_call else losses

    monkeypatch.setattr(RPPMethod, "loss", loss)


def test_default_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "4", "--output", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "learned prompts" in printed and "a photo of a" in printed and str(out) in printed
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "ce", "kd", "samples_per_s", "data_time_s", "peak_memory_mb", "lr"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    prompts = checkpoint.load(out / checkpoint.PROMPTS_FILE)
    state = checkpoint.load(out / checkpoint.STATE_FILE)
    assert prompts["step"] == state["step"] == 4 and set(prompts["prompts"]) == set(state["prompts"])
    assert {"optimizer", "scheduler", "scaler", "rng", "position", "train_config"} <= set(state)
    results = json.loads((out / "eval.json").read_text())
    assert results["images"] == 192 and 0 <= results["learned"]["top1"] <= 100


def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    # kd-topk 1 and 8 of 12 classes per step: random negatives are drawn, so the step generator state matters
    args = [*SMALL, "--max-steps", "6", "--save-every", "100", "--classes-per-step", "8", "--kd-topk", "1"]
    args += ["--views", "2", "--batch-size", "2"]
    assert train.main([*args, "--output", str(tmp_path / "full")]) == 0

    def sigterm(losses):
        os.kill(os.getpid(), signal.SIGTERM)
        return losses

    _patch_loss(monkeypatch, 3, sigterm)
    stopped = tmp_path / "stopped"
    assert train.main([*args, "--output", str(stopped)]) == 128 + signal.SIGTERM
    assert checkpoint.load(stopped / checkpoint.STATE_FILE)["step"] == 3
    monkeypatch.undo()
    assert train.main([*args, "--output", str(stopped), "--resume", "--batch-size", "3"]) == 2  # other data order
    assert train.main([*args, "--output", str(stopped), "--resume"]) == 0
    full, resumed = _records(tmp_path / "full"), _records(stopped)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed, strict=True):
        assert (a["loss"], a["ce"], a["kd"], a["lr"]) == (b["loss"], b["ce"], b["kd"], b["lr"]), a["step"]
    final_full = checkpoint.load(tmp_path / "full" / checkpoint.PROMPTS_FILE)["prompts"]
    final_resumed = checkpoint.load(stopped / checkpoint.PROMPTS_FILE)["prompts"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _patch_loss(monkeypatch, 4, lambda losses: {**losses, "loss": losses["loss"] * float("nan")})
    out = tmp_path / "run"
    assert train.main([*SMALL, "--max-steps", "6", "--save-every", "2", "--output", str(out)]) == train.EXIT_NON_FINITE
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "kept the last good checkpoint (step 2)" in err
    state = checkpoint.load(out / checkpoint.STATE_FILE)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["prompts"].values())


def test_non_finite_parameters_are_never_saved(tmp_path, capsys, monkeypatch):
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # an update that overflows the prompts while the loss was still finite
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    code = train.main([*SMALL, "--max-steps", "3", "--save-every", "1", "--output", str(out)])
    assert code == train.EXIT_NON_FINITE
    assert "non-finite" in capsys.readouterr().err
    assert not (out / checkpoint.STATE_FILE).exists() and not (out / checkpoint.PROMPTS_FILE).exists()


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rpp.train", *SMALL, "--max-steps", "3", "--classes-per-step", "6", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    assert json.loads((out / "eval.json").read_text())["images"] == 192  # each held-out image counted once
    assert checkpoint.load(out / checkpoint.STATE_FILE)["world_size"] == 2


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_autocast_runs(tmp_path, precision):
    out = tmp_path / "run"
    assert train.main([*SMALL, "--max-steps", "2", "--precision", precision, "--output", str(out)]) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(out))


def _write_shards(folder, shards: int, classes: int) -> None:
    folder.mkdir()
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as tar:
            for i in range(8):
                jpg = io.BytesIO()
                Image.new("RGB", (40, 40), (30 * i, 100, 50 * shard)).save(jpg, format="JPEG")
                for ext, payload in (("jpg", jpg.getvalue()), ("cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(f"{shard}_{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_train_on_webdataset_shards(tmp_path):
    _write_shards(tmp_path / "wds", shards=2, classes=3)
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    out = tmp_path / "run"
    args = ["--data", str(tmp_path / "wds"), "--classnames", str(tmp_path / "names.txt"), "--epochs", "1"]
    assert train.main([*SMALL, *args, "--output", str(out)]) == 0
    assert [r["step"] for r in _records(out)] == [1, 2]  # 16 samples / batch 8, counted from the shards


def test_webdataset_label_beyond_the_class_names_is_a_user_error(tmp_path, capsys):
    _write_shards(tmp_path / "wds", shards=1, classes=4)
    (tmp_path / "names.txt").write_text("red\ngreen\n")  # cls 2 and 3 have no name
    args = ["--data", str(tmp_path / "wds"), "--classnames", str(tmp_path / "names.txt"), "--max-steps", "1"]
    assert train.main([*SMALL, *args, "--output", str(tmp_path / "run")]) == 2
    assert "class label 2 in the data is out of range for the 2 class names" in capsys.readouterr().err


def test_a_finished_checkpoint_is_never_overwritten_by_another_run(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "other"
    args = [*SMALL, "--max-steps", "2", "--eval-batch-size", "192"]
    assert train.main([*args, "--output", str(out)]) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in (checkpoint.PROMPTS_FILE, checkpoint.STATE_FILE)}
    assert train.main([*args, "--max-steps", "1", "--output", str(out)]) == 2  # fresh run, same --output
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert train.main([*args, "--output", str(other)]) == 0
    assert train.main([*args, "--resume", str(other), "--output", str(out)]) == 2  # another run's state into it
    assert train.main([*args, "--resume", "--output", str(out)]) == 0  # finished: continues nothing, writes nothing
    assert before == {name: (out / name).read_bytes() for name in before}
    capsys.readouterr()
    assert train.main([*args, "--resume", str(out / checkpoint.PROMPTS_FILE), "--output", str(tmp_path / "r")]) == 2
    assert "is not a training state written by rpp.train" in capsys.readouterr().err
    assert train.main([*args, "--output", str(out / "config.json")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_ctrl_c_with_data_workers_saves_and_exits_130(tmp_path):
    """SIGINT to the whole process group (as Ctrl-C sends it): workers ignore it, the step finishes, state is saved."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rpp.train", *SMALL, "--num-workers", "2", "--max-steps", "500", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_records(out) if (out / "metrics.jsonl").exists() else []) < 2:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err
    step = checkpoint.load(out / checkpoint.STATE_FILE)["step"]
    assert step >= 2 and checkpoint.load(out / checkpoint.PROMPTS_FILE)["step"] == step
