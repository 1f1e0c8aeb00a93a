"""rpp.spt under faults: exact resume after SIGTERM (mid-epoch and before an evaluation), a real SIGTERM to the CLI,
a second signal, corrupt images, other tools' run directories, changed options on resume, pickle payloads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from rpp.spt.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE, STATE_FILE, main, train

DEMO = ["--epochs", "2", "--init", "random", "--ema", "0.9", "--num-workers", "0"]
TIMING = ("samples_per_s",)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def sigterm_at(step: int):
    def on_step(s: int) -> None:
        if s == step:
            signal.raise_signal(signal.SIGTERM)

    return on_step


def assert_same_run(a: Path, b: Path) -> None:
    for name in (CHECKPOINT_FILE, BEST_FILE):
        x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        torch.testing.assert_close(x["prompt_tokens"], y["prompt_tokens"], rtol=0, atol=0)
        torch.testing.assert_close(x["head"], y["head"], rtol=0, atol=0)
        assert (x["epoch"], x["step"], x["eval_acc"]) == (y["epoch"], y["step"], y["eval_acc"])
    assert metrics(a) == metrics(b)
    ra, rb = json.loads((a / RESULT_FILE).read_text()), json.loads((b / RESULT_FILE).read_text())
    assert (ra["best"], ra["last"], ra["finished"]) == (rb["best"], rb["last"], rb["finished"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("spt_ref") / "run"
    assert main([*DEMO, "--output", str(out)]) == 0
    return out


def test_resume_after_sigterm_is_exact(tmp_path, reference, capsys):
    out = tmp_path / "run"
    # Stopped mid-epoch (step 5 of 12), then at the end of epoch 1 before its evaluation (step 12), then finished.
    assert train([*DEMO, "--output", str(out)], on_step=sigterm_at(5)) == 128 + signal.SIGTERM
    text = capsys.readouterr().out
    assert "got SIGTERM" in text and f"training state saved to {out / STATE_FILE}" in text, text
    assert "epoch 1, batch 5 (step 5)" in text and not (out / METRICS_FILE).read_text()
    assert train(["--resume", str(out)], on_step=sigterm_at(12)) == 128 + signal.SIGTERM
    text = capsys.readouterr().out
    assert "resuming from" in text and "epoch 1, batch 12 (step 12)" in text
    assert main(["--resume", "--output", str(out), "--num-workers", "0"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(reference, out)
    assert not list(out.glob(".*.tmp"))


def test_resume_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    assert train([*DEMO, "--output", str(out)], on_step=sigterm_at(2)) == 128 + signal.SIGTERM
    capsys.readouterr()
    cases = [
        (["--resume", str(out), "--lr", "0.5"], "--resume: --lr was 0.01 in"),
        (["--resume", str(out), "--seed", "1"], "--resume: --seed was 0 in"),
        (["--resume", str(out), "--recipe", "spt-mae-deep-fgvc"], "--recipe cannot be combined with --resume"),
        (["--resume", str(out), "--output", str(tmp_path / "else")], "continues there, not in --output"),
        (["--resume", str(tmp_path / "none")], "--resume: no rpp.spt training state at"),
        ([*DEMO, "--output", str(out)], "is not empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    # A torn state and one whose tensors do not fit are one-line errors too.
    state = torch.load(out / STATE_FILE, weights_only=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({**state, "prompt_tokens": state["prompt_tokens"][:, :3]}, bad / STATE_FILE)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / STATE_FILE).write_bytes((out / STATE_FILE).read_bytes()[:500])
    for run, message in ((bad, "does not fit this run: prompt_tokens [4, 3, 64]"), (torn, "cannot read")):
        assert main(["--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # An rpp.train state is not an rpp.spt one.
    (tmp_path / "other").mkdir()
    torch.save({"format": "rpp.train_state", "version": 1}, tmp_path / "other" / STATE_FILE)
    assert main(["--resume", str(tmp_path / "other")]) == 2
    assert "is not an rpp.spt training state" in capsys.readouterr().err


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_a_state_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "rpp.spt_state", "version": 1, "x": _Payload(str(marker))}, run / STATE_FILE)
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to read" in err, err
    assert not marker.exists()


def test_output_of_another_tool_is_left_alone(tmp_path, capsys):
    other = tmp_path / "rpp-train-run"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    (other / "prompts.pt").write_bytes(b"not ours")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main([*DEMO, "--output", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty (metrics.jsonl, prompts.pt)" in err, err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def _backbone(path: Path) -> Path:
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("head.")}}, path)
    return path


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    good = []
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 200 - 30 * i)).save(root / "images" / f"{i}.png")
        good.append(f"{i}.png {i % 2}")
    png = (root / "images" / "0.png").read_bytes()
    (root / "images" / "torn.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "junk.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "images" / "empty.png").write_bytes(b"")
    # Corrupt entries apart, so each is passed over exactly once (its replacement is the next, readable entry).
    (root / "train.txt").write_text("\n".join([good[0], "torn.png 0", *good[1:3], "junk.jpg 1", good[3]]) + "\n")
    (root / "test.txt").write_text("\n".join([*good[4:], "empty.png 0"]) + "\n")
    argv = ["--model", "test_vit", "--weights", str(_backbone(tmp_path / "w.pth")), "--data", str(root)]
    argv += ["--num-prompts", "2", "--batch-size", "3", "--epochs", "1", "--no-drop-last", "--init", "random"]
    with pytest.warns(UserWarning, match="skipping corrupt image") as caught:
        assert main([*argv, "--num-workers", "0", "--output", str(tmp_path / "out")]) == 0
    named = {Path(re.search(r"skipping corrupt image (\S+):", str(w.message)).group(1)).name for w in caught}
    assert named == {"torn.png", "junk.jpg", "empty.png"}
    (row,) = metrics(tmp_path / "out")
    assert row["skipped_images"] == 3  # two in training (each drawn once), one in the test split
    out = capsys.readouterr()
    assert "3 corrupt images skipped" in out.out and "skipped 3 corrupt image(s)" in out.out
    assert "Traceback" not in out.err


def test_cli_sigterm_saves_says_so_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rpp.spt", "--epochs", "3", "--init", "vpt", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, (text, err)
    assert "got SIGTERM" in text and "training state saved to" in text and "--resume" in text, text
    assert "Traceback" not in err
    assert main(["--resume", str(out)]) == 0
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["finished"] and result["last"]["epoch"] == 3


SECOND_SIGNAL = textwrap.dedent(
    """
    import multiprocessing, os, signal, time
    from rpp.spt.train import _ignore_stop_signals, stop_on_signals

    def child():
        _ignore_stop_signals(0)  # as a data worker: ignores SIGINT/SIGTERM
        time.sleep(300)

    if __name__ == "__main__":
        worker = multiprocessing.get_context("fork").Process(target=child, daemon=True)
        worker.start()
        print(worker.pid, flush=True)
        with stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            assert stop["signal"] == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_second_signal_ends_at_once_with_its_workers():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert time.monotonic() - start < 60
    assert "second signal (SIGTERM): stopping now" in proc.stderr and "Traceback" not in proc.stderr
    worker = int(proc.stdout.split()[0])
    for _ in range(50):
        if not _alive(worker):
            break
        time.sleep(0.1)
    assert not _alive(worker)


def test_augmentation_depends_only_on_seed_epoch_and_image(tmp_path):
    """What makes resume exact with augmentation: the same (epoch, image) key gives the same crop, in the main process
    or in any data worker, and the global RNG is left alone."""
    from torch.utils.data import DataLoader

    from rpp.spt import data as spt_data

    paths = []
    for i in range(4):
        Image.effect_noise((40, 30), 60 + 10 * i).convert("RGB").save(tmp_path / f"{i}.png")
        paths.append((str(tmp_path / f"{i}.png"), i % 2))
    train_t, _ = spt_data.build_transforms("fgvc", 16, (0.5,) * 3, (0.5,) * 3)
    dataset = spt_data.SPTDataset(spt_data.FileSource(paths), train_t, seed=3, substitute=True)
    keys = [(epoch, i) for epoch in range(2) for i in range(4)]
    rng = torch.get_rng_state()
    direct = torch.stack([dataset[k][0] for k in keys])
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(direct[0], direct[4])  # another epoch, another crop
    loader = DataLoader(dataset, batch_size=3, sampler=keys, num_workers=2, collate_fn=spt_data.collate)
    torch.testing.assert_close(torch.cat([images for images, _, _ in loader]), direct, rtol=0, atol=0)
