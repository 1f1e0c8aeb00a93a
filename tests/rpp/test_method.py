"""RPPMethod on the tiny random-weight open_clip configs: training step, prompts, zero-shot, teacher, errors."""

import dataclasses
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rpp import checkpoint
from rpp.errors import UserError
from rpp.losses import corrected_cross_entropy, local_correction, pomp_correction, sample_classes
from rpp.method import MethodConfig, RPPMethod, restricted_teacher_logits
from rpp.models import check_weights_given, load_clip, register_tiny_models
from rpp_kernels.text import encode_text_naive

CLASSNAMES = [f"object number {i}" for i in range(24)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: intra-op threads only add contention


def make(**overrides):
    torch.manual_seed(0)
    cfg = MethodConfig(**{"classes_per_step": 12, "kd_topk": 3, **overrides})
    return RPPMethod(cfg, CLASSNAMES, "cpu")


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(CLASSNAMES), (n,), generator=g)


def test_every_config_field_has_help():
    for f in dataclasses.fields(MethodConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # RPP text prompts, sampled classes, top-k KD
        {"text_prompt": "pomp", "classes_per_step": None},
        {"text_prompt": "vpt-deep", "vision_prompts": 2, "vision_unshared_qkv": False},
        {"kd_topk": None, "classes_per_step": None},  # full teacher distribution, fused from features
        {"vision_prompts": 3, "vision_depth": 1, "precision": "bf16"},
        {"vision_prompts": 2, "grad_checkpointing": True, "text_chunk_size": 5, "correction_log10": True},
        {"sampling": "pomp", "negatives": "hard", "negative_bank_refresh": 4},  # POMP's step + KD over its classes
        {"kd_classes": "teacher-topk"},  # the previous RPP class set
    ],
)
def test_loss_falls_and_every_prompt_gets_gradient(overrides):
    method = make(**overrides)
    params = method.learnable_parameters()
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in method.parameters()) == len(params)  # the student is frozen
    images, labels = batch(16)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for step in range(15):
        out = method.loss(images, labels, torch.Generator().manual_seed(0))  # same class set each step
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
            for key in ("ce", "kd", "acc", "num_classes"):
                assert not out[key].requires_grad
        optimizer.step()
        losses.append(out["loss"].item())
    # Deterministic objective (fixed batch and class set): a drop of 0.1 nats is far above numerical noise.
    assert losses[-1] < losses[0] - 0.1, losses


def test_loss_terms_and_class_count():
    method = make(classes_per_step=20, kd_weight=0.5, ce_weight=2.0)
    images, labels = batch()
    out = method.loss(images, labels, torch.Generator().manual_seed(0))
    assert out["num_classes"].item() >= 20
    torch.testing.assert_close(out["loss"].detach(), 2.0 * out["ce"] + 0.5 * out["kd"])
    assert out["kd"] > 0 and out["ce"] > 0


def test_offline_teacher_topk_matches_online_teacher():
    method = make(kd_classes="teacher-topk")
    images, labels = batch()
    online = method.loss(images, labels, torch.Generator().manual_seed(3))
    cached = method.teacher_topk(images, 3)
    assert cached[0].shape == (8, 3) and cached[0].dtype == torch.int64
    torch.testing.assert_close(cached[1].sum(-1), torch.ones(8))
    offline = method.loss(images, labels, torch.Generator().manual_seed(3), teacher_topk=cached)
    for key in ("loss", "ce", "kd", "num_classes"):
        torch.testing.assert_close(offline[key], online[key])


def test_no_teacher_needs_kd_weight_zero():
    method = make(teacher=None, kd_weight=0.0)
    out = method.loss(*batch(), torch.Generator())
    assert out["kd"].item() == 0.0
    with pytest.raises(UserError, match="teacher"):
        make(teacher=None).loss(*batch(), torch.Generator())


def test_prompt_state_dict_round_trip():
    method = make(vision_prompts=2)
    with torch.no_grad():
        for p in method.learnable_parameters():
            p.add_(torch.randn_like(p))
    sd = method.prompt_state_dict()
    assert any(k.startswith("text.") for k in sd) and any(k.startswith("vision.") for k in sd)
    images, _ = batch()
    expected = method.zero_shot_logits(images)

    other = make(vision_prompts=2)
    assert not torch.allclose(other.zero_shot_logits(images), expected)
    other.load_prompt_state_dict(sd)
    torch.testing.assert_close(other.zero_shot_logits(images), expected)
    for name, value in other.prompt_state_dict().items():
        torch.testing.assert_close(value, sd[name])

    with pytest.raises(UserError, match="does not match"):
        make(text_prompt="pomp").load_prompt_state_dict(sd)
    bad = dict(sd, **{"text.ctx": torch.zeros(7, 64)})
    with pytest.raises(UserError, match="shape"):
        other.load_prompt_state_dict(bad)


def test_zero_shot_logits_shapes_and_caching():
    method = make(vision_prompts=2)
    images, _ = batch(5)
    assert method.zero_shot_logits(images).shape == (5, len(CLASSNAMES))
    assert method.zero_shot_logits(images, ["cat", "dog", "tree"]).shape == (5, 3)
    hand = method.zero_shot_logits(images, learned=False)
    learned = method.zero_shot_logits(images)
    assert hand.shape == learned.shape and not torch.allclose(hand, learned)

    # An optimizer step changes the learned logits (cache invalidated), not the hand-written ones.
    optimizer = torch.optim.SGD(method.learnable_parameters(), lr=1.0)
    method.loss(*batch(), torch.Generator())["loss"].backward()
    optimizer.step()
    assert not torch.allclose(method.zero_shot_logits(images), learned)
    torch.testing.assert_close(method.zero_shot_logits(images, learned=False), hand)


def test_teacher_class_embeddings_cached_on_disk(tmp_path):
    register_tiny_models()
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.create_model("rpp-tiny-teacher").state_dict(), weights)
    cfg = MethodConfig(teacher_pretrained=str(weights))
    cache = tmp_path / "cache"
    first = RPPMethod(cfg, CLASSNAMES, "cpu", cache_dir=cache)
    assert len(list(cache.glob("teacher-class-embeds-*.pt"))) == 1
    with torch.no_grad():  # a cache hit must not recompute: poison the text tower and load again
        first.teacher.model.token_embedding.weight.zero_()
    second = RPPMethod(cfg, CLASSNAMES, "cpu", cache_dir=cache)
    torch.testing.assert_close(second.teacher.class_embeds, first.teacher.class_embeds)
    RPPMethod(cfg, CLASSNAMES[:-1], "cpu", cache_dir=cache)  # another class list: another entry
    assert len(list(cache.glob("teacher-class-embeds-*.pt"))) == 2
    assert first.teacher.class_embeds.shape == (len(CLASSNAMES), 96)
    torch.testing.assert_close(first.teacher.class_embeds.norm(dim=-1), torch.ones(len(CLASSNAMES)))
    assert [m.teacher.class_embeds_info["source"] for m in (first, second)] == ["computed", "cache"]
    # Random teacher weights are cached under a digest of the weights: the same seed hits, another seed does not.
    torch.manual_seed(0)
    RPPMethod(MethodConfig(), CLASSNAMES, "cpu", cache_dir=cache)
    assert len(list(cache.glob("teacher-class-embeds-*.pt"))) == 3
    torch.manual_seed(0)
    assert RPPMethod(MethodConfig(), CLASSNAMES, "cpu", cache_dir=cache).teacher.class_embeds_info["source"] == "cache"
    torch.manual_seed(1)
    RPPMethod(MethodConfig(), CLASSNAMES, "cpu", cache_dir=cache)
    assert len(list(cache.glob("teacher-class-embeds-*.pt"))) == 4


def test_full_teacher_distribution_uses_the_teachers_own_logit_scale():
    method = make(kd_topk=None, classes_per_step=None, temperature=2.0)
    with torch.no_grad():
        method.teacher.logit_scale = 50.0  # differs from the student's 1/0.07
    images, labels = batch()
    out = method.loss(images, labels, torch.Generator())
    with torch.no_grad():
        student = method.logit_scale() * method.image_features(images) @ method.text_features(CLASSNAMES).T
        p = torch.softmax(method.teacher.logits(images) / 2.0, dim=-1)
        kl = (p * (p.log() - torch.log_softmax(student / 2.0, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(out["kd"], 4.0 * kl, rtol=1e-4, atol=1e-5)


def test_user_errors_for_weights_and_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        make(pretrained=str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load weights"):
        make(teacher_pretrained=str(corrupt))
    with pytest.raises(UserError, match="unknown open_clip model"):
        make(model="ViT-Nope")
    for bad in ({"text_prompt": "coop"}, {"n_ctx": 0}, {"temperature": 0.0}, {"classes_per_step": 0}):
        with pytest.raises(UserError):
            make(**bad)
    with pytest.raises(UserError, match="text-depth"):
        make(text_depth=2)  # rpp on 2 text layers: depth 1 at most
    with pytest.raises(UserError, match="vision-depth"):
        make(vision_prompts=2, vision_depth=9)


def test_load_clip_state_dict_and_openai_torchscript(tmp_path):
    register_tiny_models()
    reference = open_clip.create_model("rpp-tiny")
    path = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), path)
    model, _, preprocess_val = load_clip("rpp-tiny", str(path))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    assert not any(p.requires_grad for p in model.parameters())
    assert preprocess_val.transforms[0].size in (32, [32], (32, 32))

    # An OpenAI-style TorchScript archive: detected, loaded into a QuickGELU model.
    archive = tmp_path / "tiny-openai.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(reference), archive)
    with pytest.raises(UserError, match="TorchScript archive, which can run code"):
        load_clip("rpp-tiny", str(archive))  # torch.jit.load only on the explicit opt-in for this very file
    checkpoint.trust_torchscript(archive)
    try:
        model, _, _ = load_clip("rpp-tiny", str(archive))
    finally:
        checkpoint.trust_torchscript(None)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    torch.testing.assert_close(model.visual.proj, reference.visual.proj)


# ---------------------------------------------------------------------------------------------------- issue 14


def _explicit_features(method, images, names):
    """Student features the independent way: open_clip's encode_image and the naive 77-token text encoding."""
    img = torch.nn.functional.normalize(method.clip.encode_image(images).float(), dim=-1)
    text = encode_text_naive(method.clip, names, **method.text_encoder.prompt_parameters())
    return img, torch.nn.functional.normalize(text.float(), dim=-1)


def test_kd_over_the_sampled_classes_is_the_default():
    """--kd-classes sampled: the step keeps exactly K classes (labels + random negatives), and KD is the teacher's
    top-k among those K classes, written out here."""
    method = make(classes_per_step=12, kd_topk=3, temperature=2.0)
    images, labels = batch()
    out = method.loss(images, labels, torch.Generator().manual_seed(4))
    sample = sample_classes(labels, len(CLASSNAMES), 12, torch.Generator().manual_seed(4))
    assert out["num_classes"].item() == 12 == len(sample.classes)
    with torch.no_grad():
        img, text = _explicit_features(method, images, [CLASSNAMES[i] for i in sample.classes.tolist()])
        s = method.logit_scale() * img @ text.T
        t = method.teacher.logits(images)[:, sample.classes]
        vals, idx = t.topk(3, dim=-1)
        p = torch.zeros_like(s).scatter(1, idx, torch.softmax(vals / 2.0, dim=-1))
        kl = (p * (p.clamp_min(1e-30).log() - torch.log_softmax(s / 2.0, dim=-1))).sum(-1).mean()
        ce = corrected_cross_entropy(s, sample.targets, local_correction(len(CLASSNAMES), 12))
    torch.testing.assert_close(out["kd"], 4.0 * kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["ce"], ce, rtol=1e-4, atol=1e-5)

    # A cached top-k over every class, restricted to the step's classes, gives the same KD as the online teacher.
    cached = method.teacher_topk(images, len(CLASSNAMES))
    offline = method.loss(images, labels, torch.Generator().manual_seed(4), teacher_topk=cached)
    for key in ("loss", "ce", "kd", "num_classes"):
        torch.testing.assert_close(offline[key], out[key], rtol=1e-4, atol=1e-5)


def test_restricted_teacher_logits():
    indices = torch.tensor([[5, 2, 9], [7, 8, 6]])
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    logits = restricted_teacher_logits(indices, probs, torch.tensor([9, 1, 5, 3]), temperature=2.0)
    inf = float("-inf")
    expected = torch.tensor([[2 * math.log(0.2), inf, 2 * math.log(0.5), inf], [inf, inf, inf, inf]])
    torch.testing.assert_close(logits, expected)


def _pomp_reference_loss(method, images, labels, seed, mode="random", bank_names=None):
    """An independent transcription of POMP's CustomCLIP.forward (trainers/pomp.py, EPT=True, LOCAL_CORRECTION=True),
    with its torch.randperm / np.random.choice draws taken from a generator seeded like the method's."""
    C, K = len(CLASSNAMES), method.cfg.classes_per_step
    num_oob = K - 1
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(method.clip.encode_image(images).float(), dim=-1)
    logit_scale = method.clip.logit_scale.exp()
    label_all = torch.arange(0, C)
    if mode == "random":
        perm = torch.randperm(label_all.size(0), generator=g)
        label_oob = label_all[perm[:num_oob]]
    else:
        with torch.no_grad():  # POMP: memory_bank.clone().detach(), probabilities through numpy
            _, bank = _explicit_features(method, images, CLASSNAMES)
            neg_logits = (logit_scale * img @ bank.t()).mean(dim=0)
        if mode == "easy":
            neg_logits = -neg_logits
        prob = torch.softmax(neg_logits, dim=0)
        label_oob = label_all[torch.multinomial(prob, num_oob, replacement=True, generator=g)]
        prob = prob[label_oob]
    label_upd = torch.cat([labels, label_oob])
    _, text = _explicit_features(method, images, [CLASSNAMES[i] for i in label_upd.tolist()])
    logits_pos = logit_scale * (img * text[: labels.size(0)]).sum(dim=-1, keepdims=True)
    logits_neg = logit_scale * img @ text[-num_oob:].t()
    bsz = images.size(0)
    reject_labels = labels.unsqueeze(1) == label_oob.unsqueeze(0).expand(bsz, -1)
    logits_neg = logits_neg - 1e6 * reject_labels
    if mode == "random":
        logits_neg = logits_neg + torch.log10(torch.tensor(C - 1.0))
        true_label_oob_num = torch.tensor([[num_oob]] * bsz).float() - reject_labels.sum(-1, keepdims=True).float()
        logits_neg = logits_neg - torch.log10(true_label_oob_num)
    else:
        logits_neg = logits_neg - torch.log10(prob)
    logits = torch.cat([logits_pos, logits_neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(bsz, dtype=torch.long)), reject_labels


@pytest.mark.parametrize("mode", ["random", "hard", "easy"])
def test_pomp_sampling_is_pomps_code(mode):
    """--sampling pomp recomputed for a fixed seed with an independent transcription of POMP's formulas: per-row
    labels, K-1 shared negatives, masking of a row's own label, the per-row log10 correction; loss and prompt
    gradients agree."""
    method = make(sampling="pomp", text_prompt="pomp", classes_per_step=9, teacher=None, kd_weight=0.0,
                  correction_log10=True, negatives=mode)  # fmt: skip
    seed = 11
    perm = torch.randperm(len(CLASSNAMES), generator=torch.Generator().manual_seed(seed))
    images, _ = batch(6)
    labels = torch.tensor([int(perm[0]), int(perm[3]), int(perm[3]), int(perm[20]), 1, int(perm[21])])
    out = method.loss(images, labels, torch.Generator().manual_seed(seed))
    out["loss"].backward()
    ours = [p.grad.clone() for p in method.learnable_parameters()]
    method.zero_grad()
    ref, reject = _pomp_reference_loss(method, images, labels, seed, mode)
    if mode == "random":
        assert reject[:3].any(-1).all() and not reject[3].any()  # rows with and without a masked negative
    ref.backward()
    torch.testing.assert_close(out["ce"], ref.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours, [p.grad for p in method.learnable_parameters()], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_pomp_sampling_with_distillation_and_natural_log():
    method = make(sampling="pomp", classes_per_step=9, kd_topk=3)
    images, labels = batch()
    out = method.loss(images, labels, torch.Generator().manual_seed(2))
    assert out["kd"] > 0 and out["ce"] > 0 and 9 <= out["num_classes"].item() <= 9 + len(labels)
    negatives = torch.randperm(len(CLASSNAMES), generator=torch.Generator().manual_seed(2))[:8]
    correction, reject = pomp_correction(labels, negatives, len(CLASSNAMES), log10=False)
    expected = math.log(len(CLASSNAMES) - 1) - torch.log(8 - reject.sum(-1, keepdim=True).double()).float()
    torch.testing.assert_close(correction, expected.expand(-1, 8))


def test_random_weights_only_for_demo_models_or_on_request(caplog):
    with pytest.raises(UserError, match="--pretrained: no weights file for model 'ViT-B-16'.*--allow-random-weights"):
        check_weights_given("ViT-B-16", None, "--pretrained", allow_random=False)
    with pytest.raises(UserError, match="--teacher-pretrained: no weights file"):
        make(teacher="ViT-B-32")
    with caplog.at_level("WARNING", logger="rpp.models"):
        check_weights_given("ViT-B-16", None, "--pretrained", allow_random=True)
        make()
    assert "RANDOM weights (--allow-random-weights)" in caplog.text
    assert "rpp-tiny is a built-in demo model with random weights" in caplog.text
    assert "rpp-tiny-teacher is a built-in demo model" in caplog.text
    check_weights_given("ViT-B-16", "weights.pt", "--pretrained", allow_random=False)  # a file: nothing to say


def test_augmentation_choices():
    from PIL import Image

    from rpp.data import seeded_views

    image = Image.new("RGB", (48, 40), (120, 30, 200))
    pomp = make(augment="pomp").preprocess_train
    assert "RandAugment" in repr(pomp) and "RandomResizedCrop" in repr(pomp)
    views = seeded_views(image, pomp, 3, seed=1)
    assert views.shape == (3, 3, 32, 32)
    torch.testing.assert_close(views, seeded_views(image, pomp, 3, seed=1))  # seeded: reproducible
    plain = make(augment="none")
    assert plain.preprocess_train is plain.preprocess_val
    with pytest.raises(UserError, match="crop-min-scale"):
        make(crop_min_scale=0.0)


def test_vision_prompts_carried_after_the_last_prompted_layer_by_default():
    """VPT semantics for shared vision prompts: the last prompted layer's rows go on through the remaining layers
    (rpp_kernels' default); --no-vision-carry keeps the previous drop behaviour; unshared k/v prompts carry nothing."""
    images, _ = batch(2)
    carried = make(vision_prompts=2, vision_depth=1, vision_unshared_qkv=False)
    dropped = make(vision_prompts=2, vision_depth=1, vision_unshared_qkv=False, vision_carry=False)
    assert carried.vision_prompts.carry and not dropped.vision_prompts.carry
    assert not make(vision_prompts=2, vision_depth=1).vision_prompts.carry
    dropped.load_prompt_state_dict(carried.prompt_state_dict())  # same prompts, different semantics
    assert not torch.allclose(carried.image_features(images), dropped.image_features(images))


def test_missing_weights_is_a_one_line_cli_error(tmp_path, capsys):
    from rpp.train import main

    assert main(["--model", "ViT-B-16", "--output", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rpp.train: error: --pretrained: no weights file for model 'ViT-B-16'")
