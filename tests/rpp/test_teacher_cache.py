"""rpp.teacher_cache: resumable build (partial then complete equals one full build), use from rpp.train."""

import json

import numpy as np
import pytest

from rpp import data, teacher_cache, train
from rpp.errors import UserError

ARGS = ["--topk", "5", "--chunk", "64", "--batch-size", "64", "--num-workers", "0"]


def test_resumable_build_matches_a_full_build_and_trains(tmp_path, capsys):
    partial, full = tmp_path / "partial", tmp_path / "full"
    assert teacher_cache.main([*ARGS, "--output", str(partial), "--max-chunks", "2"]) == 0
    assert "4 chunks left" in capsys.readouterr().out  # 384 images / 64 = 6 chunks
    assert json.loads((partial / "progress-0.json").read_text())["done"] == [0, 1]
    spec = data.resolve(None, None, None)
    with pytest.raises(UserError, match="incomplete"):
        teacher_cache.TeacherCache.open(str(partial), spec)
    assert teacher_cache.main([*ARGS, "--output", str(partial)]) == 0
    assert "complete" in capsys.readouterr().out
    assert teacher_cache.main([*ARGS, "--output", str(full)]) == 0
    for name in ("indices.npy", "probs.npy"):
        assert np.array_equal(np.load(partial / name), np.load(full / name))
    probs = np.load(full / "probs.npy").astype(np.float32)
    assert probs.shape == (384, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-2)
    assert teacher_cache.main([*ARGS, "--output", str(full), "--topk", "3"]) == 2  # different cache in that folder
    capsys.readouterr()
    assert teacher_cache.main([*ARGS, "--output", str(partial), "--seed", "1"]) == 2  # another random teacher
    assert "different seed" in capsys.readouterr().err

    out = tmp_path / "run"
    small = ["--batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--log-every", "1"]
    assert train.main([*small, "--teacher-cache", str(full), "--output", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert train.main([*small, "--teacher-cache", str(full), "--shots", "2", "--output", str(out / "fs")]) == 0
    assert train.main([*small, "--teacher-cache", str(tmp_path / "none"), "--output", str(tmp_path / "r2")]) == 2
    capsys.readouterr()
    assert (
        train.main([*small, "--teacher-cache", str(full), "--temperature", "2", "--output", str(tmp_path / "r3")]) == 2
    )
    assert "holds probabilities at temperature 1.0" in capsys.readouterr().err
