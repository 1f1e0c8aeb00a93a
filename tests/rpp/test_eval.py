"""rpp.eval: exact counting (a stand-in scorer), the CLI on an image folder with a trained checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rpp import data, train
from rpp import eval as rpp_eval


class _Oracle:
    """Scores the true class highest for learned prompts; for the template, ranks it 2nd on even labels, else last."""

    def __init__(self, labels: list[int], classes: int):
        self.labels, self.classes = labels, classes

    def zero_shot_logits(self, images, classnames=None, learned=True):
        label = images[:, 0, 0, 0].long()
        logits = torch.zeros(len(label), self.classes)
        if learned:
            logits[torch.arange(len(label)), label] = 1.0
        else:
            logits[:, :] = torch.arange(self.classes, 0, -1).float()  # class 0 top, class 1 second, ...
            logits[torch.arange(len(label)), label] = torch.where(label % 2 == 0, 99.5, -1.0)
            logits[:, 0] = 100.0
        return logits


class _LabelImages:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def describe(self, i):
        return str(i)

    def load(self, i):
        return self.labels[i]


def test_evaluate_counts_exactly():
    labels = [1, 2, 3, 4, 5, 6, 7]
    loader = data.eval_loader(_LabelImages(labels), lambda x: torch.full((3, 2, 2), float(x)), 3, 0, 1, 0)
    results = rpp_eval.evaluate(_Oracle(labels, 8), loader, torch.device("cpu"))
    assert results["images"] == 7
    assert results["learned"] == {"top1": 100.0, "top5": 100.0}
    # template: class 0 is always first, even labels second (top-5 hit), odd labels last (miss)
    assert results["template"]["top1"] == 0.0 and abs(results["template"]["top5"] - 300 / 7) < 1e-9


def _tiny_folder(root: Path) -> Path:
    for c, name in enumerate(["red circle", "blue square"]):
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (24, 24), (200 * (1 - c), 20 * i, 200 * c)).save(
                root / name.replace(" ", "_") / f"{i}.png"
            )
    return root


def test_eval_cli_on_an_image_folder(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--eval-batch-size", "96"]
    assert train.main([*small, "--output", str(run)]) == 0
    folder = _tiny_folder(tmp_path / "val")
    (folder / "red_circle" / "truncated.png").write_bytes((folder / "red_circle" / "0.png").read_bytes()[:40])
    (tmp_path / "names.txt").write_text("blue square\nred circle\n")
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(run), "--data", str(folder), "--classnames", str(tmp_path / "names.txt")]
    with pytest.warns(UserWarning, match="skipping corrupt image .*truncated.png"):
        assert rpp_eval.main([*args, "--num-workers", "0", "--output", str(out)]) == 0
    assert "learned prompts" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["images"] == 6 and results["skipped_images"] == 1 and results["classes"] == 2
    for kind in ("learned", "template"):
        assert 0 <= results[kind]["top1"] <= 100 and results[kind]["top5"] == 100.0  # 2 classes: top-5 is all
    assert rpp_eval.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "prompt checkpoint not found" in capsys.readouterr().err
    # a bad --output is reported before evaluating, not as a traceback after it
    assert rpp_eval.main([*args, "--num-workers", "0", "--output", str(tmp_path)]) == 2
    assert rpp_eval.main([*args, "--num-workers", "0", "--output", str(tmp_path / "no" / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "directory" in err.splitlines()[1] and "Traceback" not in err
