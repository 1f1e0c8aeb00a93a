"""Teacher caches and the views the teacher labels: --augmented caches hold the teacher's top-k of exactly the
augmented views rpp.train draws (per epoch and view); the default (centre crops) is a documented difference; --topk
defaults to the training k (--kd-topk)."""

import pytest
import torch

from rpp import data
from rpp.errors import UserError
from rpp.method import MethodConfig, RPPMethod
from rpp.teacher_cache import TeacherCache, main, training_views
from rpp.train import main as train_main
from rpp.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = ["--seed", "3", "--views", "2", "--shots", "2", "--shots-seed", "5", "--augment", "pomp", "--kd-topk", "4"]


def _cache(tmp_path, *extra):
    out = tmp_path / "cache"
    assert main(["--output", str(out), "--num-workers", "0", "--batch-size", "8", "--chunk", "10", *extra]) == 0
    return out


def test_augmented_cache_labels_the_training_views(tmp_path):
    out = _cache(tmp_path, "--augmented", "--epochs", "2", *OPTIONS)
    spec = data.resolve(None, None, None, 3)
    torch.manual_seed(3)
    mcfg = MethodConfig(augment="pomp", kd_topk=4)
    method = RPPMethod(mcfg, spec.classnames, "cpu")
    views = training_views(3, 2, 2, 5, mcfg)
    cache = TeacherCache.open(str(out), spec, temperature=1.0, training=views)
    assert cache.meta["k"] == 4 and cache.meta["n"] == 12 * 2 * 2 * 2  # classes x shots x epochs x views
    assert "augmented training views (2 epoch(s) x 2 view(s), seed 3)" in cache.describe()

    loader, per_epoch = data.train_loader(spec, method.preprocess_train, batch_size=8, views=2, seed=3, shots=2,
                                          shots_seed=5, rank=0, world=1, num_workers=0)  # fmt: skip
    wanted = {0, 1, per_epoch, per_epoch + 2}  # steps of both epochs
    for step, (batch_views, _, indices, _) in enumerate(loader):
        if step in wanted:
            ids, probs = cache.lookup(indices, step // per_epoch, 2)
            online_ids, online_probs = method.teacher_topk(batch_views.flatten(0, 1), 4)
            assert torch.equal(ids, online_ids)
            torch.testing.assert_close(probs, online_probs, atol=2e-3, rtol=0)
        if step >= max(wanted):
            break

    with pytest.raises(UserError, match="covers 2 epoch"):
        cache.lookup(indices, 2, 2)
    other = training_views(4, 2, 2, 5, mcfg)
    with pytest.raises(UserError, match="other augmented views: built with seed 3 \\(this run: 4\\)"):
        TeacherCache.open(str(out), spec, temperature=1.0, training=other)


def test_centre_crop_cache_is_the_documented_default_and_k_follows_kd_topk(tmp_path):
    out = _cache(tmp_path, "--kd-topk", "5")
    spec = data.resolve(None, None, None, 0)
    cache = TeacherCache.open(str(out), spec, temperature=1.0)
    assert cache.meta["k"] == 5 and "centre crops, one per image" in cache.describe()
    ids, probs = cache.lookup(torch.tensor([3, 7]), None, 3)
    assert ids.shape == (6, 5) and torch.equal(ids[0], ids[2]) and torch.equal(ids[3], ids[5])
    assert main(["--output", str(tmp_path / "x"), "--kd-topk", "none"]) == 2  # a cache needs a k


def test_training_with_an_augmented_cache(tmp_path, capsys):
    out = _cache(tmp_path, "--augmented", "--epochs", "1", *OPTIONS)
    run = ["--output", str(tmp_path / "run"), "--teacher-cache", str(out), "--num-workers", "0", "--batch-size", "4",
           "--max-steps", "2", "--log-every", "1", "--classes-per-step", "6", *OPTIONS]  # fmt: skip
    assert train(run) == 0
    assert "top-4 of the augmented training views" in capsys.readouterr().out
    with pytest.raises(UserError, match="other augmented views: built with transform"):
        train([*run[:1], str(tmp_path / "run2"), *run[2:], "--augment", "crop-flip"])
    assert train_main([*run[:1], str(tmp_path / "run3"), *run[2:], "--augment", "crop-flip"]) == 2
