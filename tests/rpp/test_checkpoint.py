"""rpp.checkpoint: atomic writes, corrupt files, RNG round trips."""

import random

import numpy as np
import pytest
import torch

from rpp import checkpoint
from rpp.errors import UserError


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "state.pt"
    checkpoint.atomic_save({"step": 1}, path)
    checkpoint.atomic_save({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="cannot write .*state.pt: disk full .the previous state.pt, if any, is kept"):
        checkpoint.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_missing_or_corrupt_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read"):
        checkpoint.load(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="no training state"):
        checkpoint.resolve_resume("latest", str(tmp_path))
    checkpoint.atomic_save({"step": 0}, tmp_path / checkpoint.STATE_FILE)
    assert checkpoint.resolve_resume("latest", str(tmp_path)) == tmp_path / checkpoint.STATE_FILE
    assert checkpoint.prompts_path(str(tmp_path)) == tmp_path / checkpoint.PROMPTS_FILE


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = checkpoint.rng_state(gen)
    first = (torch.rand(3), np.random.rand(), random.random(), torch.rand(3, generator=gen))
    checkpoint.set_rng_state(state, gen)
    second = (torch.rand(3), np.random.rand(), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3] and torch.equal(first[3], second[3])


def test_rng_state_is_tensors_and_plain_data_and_survives_a_weights_only_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(7)
    np.random.normal()  # a cached gaussian in numpy's state
    checkpoint.atomic_save({"rng": checkpoint.rng_state(gen)}, tmp_path / "rng.pt")
    state = checkpoint.load(tmp_path / "rng.pt")["rng"]  # weights_only=True: tensors and plain data only
    check = checkpoint._Check({"rng": [state]}, tmp_path / "rng.pt", "test")
    checkpoint.validate_rng(state, check, "rng[0]")
    first = (np.random.normal(), random.random(), torch.rand(2, generator=gen))
    checkpoint.set_rng_state(state, gen)
    second = (np.random.normal(), random.random(), torch.rand(2, generator=gen))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    bad = {**state, "numpy": {**state["numpy"], "keys": state["numpy"]["keys"][:10]}}
    with pytest.raises(UserError, match=r"'rng\[0\].numpy.keys' must be 624 uint32 values"):
        checkpoint.validate_rng(bad, check, "rng[0]")
    with pytest.raises(UserError, match=r"no 'rng\[0\].python'"):
        checkpoint.validate_rng({k: v for k, v in state.items() if k != "python"}, check, "rng[0]")


def test_stale_temp_files_are_removed_and_prompts_repaired(tmp_path):
    (tmp_path / f".{checkpoint.STATE_FILE}.x1.tmp").write_bytes(b"half")
    (tmp_path / f".{checkpoint.PROMPTS_FILE}.x2.tmp").write_bytes(b"half")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    assert checkpoint.remove_stale_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [".other.tmp"]
    state = {"format": checkpoint.STATE_FORMAT, "version": checkpoint.SCHEMA_VERSION, "step": 4, "seed": 0,
             "prompts": {"ctx": torch.zeros(2)}, "method_config": {}, "classnames": ["a"]}  # fmt: skip
    assert checkpoint.repair_prompts(tmp_path, state)  # missing: written
    assert not checkpoint.repair_prompts(tmp_path, state)  # same step: left alone
    assert checkpoint.load_prompts(tmp_path / checkpoint.PROMPTS_FILE)["step"] == 4
