"""CLI: --help documents every option, YAML + command-line precedence, one-line errors without tracebacks."""

import dataclasses
import subprocess
import sys

import pytest

from rpp import config, train
from rpp.config import TrainConfig
from rpp.errors import UserError
from rpp.method import MethodConfig


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse([TrainConfig, MethodConfig], ["--help"], "python -m rpp.train", "test")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in (TrainConfig, MethodConfig):
        for f in dataclasses.fields(cls):
            option = "--" + f.name.replace("_", "-")
            assert option in text, option
            assert f.metadata.get("help"), f"{option} has no help text"
    assert "--no-tensorboard" in text and "(default: 32)" in text


def test_yaml_then_command_line_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("batch-size: 16\nlr: 0.01\nclasses_per_step: all\nshots: 4\nmodel: ViT-B-16\n")
    tcfg, mcfg = config.parse(
        [TrainConfig, MethodConfig], ["--config", str(tmp_path / "c.yaml"), "--lr", "1e-4", "--shots", "none"], "p", ""
    )
    assert (tcfg.batch_size, tcfg.lr, tcfg.shots) == (16, 1e-4, None)
    assert mcfg.classes_per_step is None and mcfg.model == "ViT-B-16"
    assert tcfg.epochs == TrainConfig.epochs  # untouched options keep their defaults
    (tcfg,) = config.parse([TrainConfig], ["--resume", "--no-tensorboard", "--grad-clip", "1"], "p", "")
    assert tcfg.resume == "latest" and tcfg.tensorboard is False and tcfg.grad_clip == 1.0


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("batch_size: [1, 2\n", "cannot parse config file"),
        ("- just\n- a list\n", "must be a mapping"),
        ("no_such_option: 3\n", "unknown option 'no_such_option'"),
        ("batch_size: 2.5\n", "invalid value 2.5 for --batch-size"),
        ("tensorboard: maybe\n", "invalid value 'maybe' for --tensorboard"),
    ],
)
def test_bad_config_files(tmp_path, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        config.parse([TrainConfig], ["--config", str(tmp_path / "c.yaml")], "p", "")


def test_validate_ranges():
    for bad in (dict(batch_size=0), dict(lr=-1.0), dict(views=0), dict(max_steps=0), dict(num_workers=-1)):
        with pytest.raises(UserError, match="invalid value"):
            config.validate(TrainConfig(**bad))
    with pytest.raises(UserError, match="needs --data"):
        config.validate(TrainConfig(data_format="imagefolder"))


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    """Each user mistake: exit code 2, a single 'rpp.train: error:' line on stderr, no traceback."""
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    cases = {
        "missing data path": (
            ["--data", str(tmp_path / "nope"), "--data-format", "imagefolder"],
            "data path not found",
        ),
        "missing weights": (["--pretrained", str(tmp_path / "missing.pt")], "not found"),
        "bad option value": (["--batch-size", "many"], "invalid value 'many' for --batch-size"),
        "corrupt config": (["--config", str(tmp_path / "bad.yaml")], "cannot parse config file"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "rpp.train", "--output", str(tmp_path / "out"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if not line.startswith("WARNING:root:No pretrained weights")]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("rpp.train: error: "), (name, err)
        assert cases[name][1] in lines[0], (name, err)
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pretrained", "{tmp}/corrupt.pt"], "cannot load weights"),
        (["--pretrained", "{tmp}/notes.txt"], "'rpp-tiny': KeyError: "),  # not just the bare key of the KeyError
        (["--output", "{tmp}/corrupt.pt"], "exists and is not a directory"),
        (["--pretrained", "{tmp}"], "is a directory, expected the weights file"),
        (["--data-format", "zip"], "invalid value 'zip' for --data-format"),
        (["--resume", "--output", "{tmp}/empty"], "no training state"),
        (["--resume", "{tmp}/corrupt.pt"], "cannot read training state"),
        (["--data", "{tmp}", "--data-format", "webdataset"], "no .tar shards"),
    ],
)
def test_more_user_errors_in_process(tmp_path, capsys, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_text("hello\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert train.main(["--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rpp.train: error: ") and message in err[0], err
