"""--recipe NAME / --print-config, and the shipped rpp.train recipes (POMP's published run, our RPP guess)."""

import dataclasses

import pytest
import yaml

from rpp import config
from rpp.config import TrainConfig
from rpp.errors import UserError
from rpp.method import MethodConfig
from rpp.recipes import list_recipes, load_recipe
from rpp.train import lr_lambda

TRAIN = ([TrainConfig, MethodConfig], "python -m rpp.train", "test")


def parse(argv):
    return config.parse(*TRAIN[:1], argv, TRAIN[1], TRAIN[2], tool="rpp.train")


def test_train_recipes_are_shipped_and_valid():
    names = list_recipes("rpp.train")
    assert {"pomp-in21k", "rpp-in21k"} <= set(names)
    for name in names:
        tcfg, mcfg = parse(["--recipe", name, "--data", "IN21K"])  # the data path is the user's
        config.validate(tcfg)
        mcfg.validate()
        assert set(load_recipe(name, "rpp.train")) <= {f.name for c in TRAIN[0] for f in dataclasses.fields(c)}


def test_pomp_recipe_is_pomps_published_run():
    tcfg, mcfg = parse(["--recipe", "pomp-in21k"])
    assert (tcfg.optimizer, tcfg.lr, tcfg.momentum, tcfg.weight_decay) == ("sgd", 0.002, 0.9, 0.0005)
    assert (tcfg.warmup_epochs, tcfg.warmup_lr, tcfg.epochs) == (1, 1e-5, 5)
    assert (tcfg.views, tcfg.shots, tcfg.batch_size, tcfg.data_format) == (4, 16, 32, "imagenet21k-p")
    assert (mcfg.model, mcfg.text_prompt, mcfg.n_ctx, mcfg.teacher, mcfg.kd_weight) == ("ViT-B-16", "pomp", 4, None, 0)
    assert (mcfg.sampling, mcfg.classes_per_step, mcfg.negatives, mcfg.correction_log10) == (
        "pomp",
        1000,
        "random",
        True,
    )
    assert (mcfg.augment, mcfg.crop_min_scale, mcfg.randaugment_ops, mcfg.randaugment_magnitude) == (
        "pomp-dassl",
        0.08,
        2,
        10,
    )
    assert mcfg.pretrained is None  # weights are the user's local file: an error until given


def test_precedence_recipe_then_config_then_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.01\nepochs: 7\n")
    tcfg, mcfg = parse(["--recipe", "pomp-in21k", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"])
    assert (tcfg.lr, tcfg.epochs, tcfg.optimizer, mcfg.n_ctx) == (0.01, 2, "sgd", 4)


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--recipe", "pomp-in21k", "--n-ctx", "16", "--print-config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("# python -m rpp.train: resolved options (defaults < recipe pomp-in21k < command line)")
    (tmp_path / "resolved.yaml").write_text(out)
    assert yaml.safe_load(out)["n_ctx"] == 16
    assert parse(["--config", str(tmp_path / "resolved.yaml")]) == parse(["--recipe", "pomp-in21k", "--n-ctx", "16"])


def test_recipe_errors():
    with pytest.raises(UserError, match="unknown recipe 'nope'; recipes for rpp.train: .*pomp-in21k"):
        parse(["--recipe", "nope"])
    with pytest.raises(UserError, match="configures python -m rpp.train, not rpp.spt"):
        load_recipe("pomp-in21k", "rpp.spt")
    with pytest.raises(UserError, match="unrecognized arguments: --recipe"):
        config.parse(*TRAIN[:1], ["--recipe", "pomp-in21k"], "p", "")  # tools without recipes


def test_constant_warmup_then_cosine():
    factor = lr_lambda(warmup=3, total=13, warmup_factor=1e-5 / 2e-3)
    assert [factor(s) for s in range(3)] == [0.005] * 3
    assert factor(3) == 1.0 and factor(8) == pytest.approx(0.5) and factor(13) == pytest.approx(0.0)
    assert lr_lambda(3, 13)(0) == 0.25  # linear warmup stays the default


def test_teacher_cache_takes_the_training_recipe_options_it_has(capsys):
    from rpp.teacher_cache import CacheConfig

    cfg, mcfg = config.parse([CacheConfig, MethodConfig], ["--recipe", "rpp-in21k", "--augmented"], "p", "",
                             tool="rpp.teacher_cache", recipe_from="rpp.train")  # fmt: skip
    assert (cfg.views, cfg.epochs, cfg.shots, cfg.shots_seed, cfg.seed) == (4, 5, 16, 42, 42)  # the run's views
    assert (mcfg.teacher, mcfg.kd_topk, mcfg.augment) == ("ViT-L-14", 100, "pomp-dassl") and cfg.topk is None  # k = 100


def test_epoch_cosine_is_dassls_schedule():
    """POMP's schedule, transcribed from Dassl (ConstantWarmupScheduler over CosineAnnealingLR(T_max=max_epoch),
    update_lr() at the end of every epoch), against ours at every step of 5 epochs of 3 steps."""
    import torch

    from rpp.train import epoch_cosine_lambda

    epochs, per_epoch, lr, cons_lr = 5, 3, 2e-3, 1e-5
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    dassl = []
    for epoch in range(epochs):  # warmup epoch 0 at cons_lr; from then on the successor's (last) lr
        dassl.append(cons_lr if epoch < 1 else successor.get_last_lr()[0])
        if epoch >= 1:
            optimizer.step()  # (no gradients: only keeps the scheduler's order check quiet)
            successor.step()
    factor = epoch_cosine_lambda(per_epoch, 1, epochs, cons_lr / lr)
    ours = [lr * factor(step) for step in range(epochs * per_epoch)]
    assert ours == pytest.approx([v for v in dassl for _ in range(per_epoch)], rel=1e-12)
    assert dassl[1] == lr and dassl[-1] > 0.3 * lr  # Dassl's last epoch stays well above zero
