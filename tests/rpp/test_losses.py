"""Class sampling (POMP) and the locally corrected cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from rpp.losses import (
    corrected_cross_entropy,
    full_class_set,
    local_correction,
    negative_probs,
    pomp_correction,
    pomp_cross_entropy,
    sample_classes,
    sample_pomp_negatives,
)


def draw(seed, labels, teacher, num_classes=500, k=64):
    return sample_classes(labels, num_classes, k, torch.Generator().manual_seed(seed), teacher)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_sample_contains_labels_and_teacher_topk_and_has_size_k(with_teacher):
    labels = torch.tensor([3, 17, 3, 499, 0])
    teacher = torch.tensor([[5, 3, 250], [17, 18, 19], [3, 4, 5], [499, 498, 1], [0, 2, 7]]) if with_teacher else None
    s = draw(0, labels, teacher)
    assert s.classes.shape == (64,) and len(set(s.classes.tolist())) == 64
    assert set(labels.tolist()) <= set(s.classes.tolist())
    assert torch.equal(s.classes[s.targets], labels)
    if with_teacher:
        assert torch.equal(s.classes[s.teacher_positions], teacher)
    else:
        assert s.teacher_positions is None
    assert not s.is_full


def test_negatives_never_duplicate_ground_truth_classes():
    """Ground-truth masking: a sampled negative is never a label (or a teacher class) of the batch."""
    labels = torch.arange(0, 40, 2)
    teacher = torch.arange(1, 41, 2)[:, None].expand(20, 1)
    for seed in range(20):
        s = draw(seed, labels, teacher, num_classes=60, k=50)
        required = torch.unique(torch.cat([labels, teacher.flatten()]))
        assert torch.equal(s.classes[: len(required)], required)
        negatives = s.classes[len(required) :]
        assert len(negatives) == 50 - len(required)
        assert not torch.isin(negatives, required).any()
        assert (s.targets < len(required)).all()


def test_sample_is_deterministic_in_the_generator_and_varies_across_seeds():
    labels = torch.tensor([1, 2, 3])
    a, b, c = draw(7, labels, None), draw(7, labels, None), draw(8, labels, None)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.classes, c.classes)
    # Negatives are uniform over the non-required classes: over many draws every class appears.
    seen = torch.cat([draw(s, labels, None, num_classes=100, k=20).classes for s in range(100)])
    assert torch.unique(seen).numel() == 100


def test_required_classes_beyond_k_are_all_kept():
    labels = torch.arange(10)
    teacher = torch.arange(10, 40).view(10, 3)
    s = draw(0, labels, teacher, num_classes=100, k=16)
    assert torch.equal(s.classes, torch.arange(40))


def test_full_class_set():
    labels, teacher = torch.tensor([4, 1]), torch.tensor([[4, 0], [2, 1]])
    s = full_class_set(labels, 6, teacher)
    assert s.is_full and torch.equal(s.classes, torch.arange(6))
    assert torch.equal(s.targets, labels) and torch.equal(s.teacher_positions, teacher)


def test_sample_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k must be"):
        draw(0, torch.tensor([1]), None, k=0)
    with pytest.raises(ValueError, match="labels must be in"):
        draw(0, torch.tensor([500]), None)


def test_local_correction_formula():
    assert local_correction(21841, 1000) == pytest.approx(math.log(21840 / 999))
    assert local_correction(21841, 1000, log10=True) == pytest.approx(math.log10(21840 / 999))
    assert local_correction(100, 100) == 0.0  # nothing sampled away
    assert local_correction(100, 1) == 0.0  # no negatives
    assert local_correction(100, 2) == pytest.approx(math.log(99))


def test_corrected_cross_entropy_matches_explicit_formula():
    logits, targets = torch.randn(6, 9), torch.tensor([0, 8, 3, 3, 1, 5])
    c = 1.7
    explicit = F.cross_entropy(logits + c * (1 - F.one_hot(targets, 9)), targets)
    torch.testing.assert_close(corrected_cross_entropy(logits, targets, c), explicit)
    torch.testing.assert_close(corrected_cross_entropy(logits, targets, 0.0), F.cross_entropy(logits, targets))


def test_local_correction_estimates_the_full_softmax_cross_entropy():
    """With uniformly sampled negatives the corrected sampled CE is close to the full-class CE; uncorrected is not."""
    torch.manual_seed(0)
    num_classes, k = 2000, 200
    logits = torch.randn(num_classes) * 2
    label = torch.tensor([7])
    full = F.cross_entropy(logits[None], label).item()
    corrected, plain = [], []
    for seed in range(200):
        s = draw(seed, label, None, num_classes=num_classes, k=k)
        sampled = logits[s.classes][None]
        corrected.append(corrected_cross_entropy(sampled, s.targets, local_correction(num_classes, k)).item())
        plain.append(corrected_cross_entropy(sampled, s.targets).item())
    corrected, plain = sum(corrected) / len(corrected), sum(plain) / len(plain)
    assert abs(corrected - full) < 0.05 * full
    assert abs(plain - full) > 5 * abs(corrected - full)


# ------------------------------------------------------------------------------------------------------------ POMP


def test_pomp_negatives_are_shared_uniform_draws_or_multinomial():
    g = torch.Generator().manual_seed(3)
    negatives = sample_pomp_negatives(50, 9, g)
    assert torch.equal(negatives, torch.randperm(50, generator=torch.Generator().manual_seed(3))[:9])
    probs = torch.zeros(50)
    probs[[4, 7]] = torch.tensor([0.25, 0.75])
    drawn = sample_pomp_negatives(50, 400, torch.Generator().manual_seed(0), probs)
    assert set(drawn.tolist()) == {4, 7} and 0.65 < (drawn == 7).float().mean() < 0.85  # with replacement, by p
    with pytest.raises(ValueError, match="negatives"):
        sample_pomp_negatives(5, 6, g)
    with pytest.raises(ValueError, match="probs must have shape"):
        sample_pomp_negatives(5, 2, g, torch.ones(4) / 4)


def test_pomp_correction_per_row_and_for_sampled_probabilities():
    labels, negatives = torch.tensor([3, 8, 1]), torch.tensor([3, 5, 8, 9])
    correction, reject = pomp_correction(labels, negatives, num_classes=101)
    assert reject.tolist() == [[True, False, False, False], [False, False, True, False], [False] * 4]
    expected = torch.tensor([2 - math.log10(3), 2 - math.log10(3), 2 - math.log10(4)])  # log10(100) - log10(4 - r_i)
    torch.testing.assert_close(correction, expected[:, None].expand(3, 4))
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    correction, _ = pomp_correction(labels, negatives, 101, neg_probs=p, log10=False)
    torch.testing.assert_close(correction, -p.log()[None].expand(3, 4))


def test_pomp_cross_entropy_matches_pomps_formula():
    pos, neg = torch.randn(3), torch.randn(3, 4)
    reject = torch.tensor([[True, False, False, False], [False] * 4, [False, False, True, True]])
    correction = torch.rand(3, 4)
    logits = torch.cat([pos[:, None], neg - 1e6 * reject + correction], 1)
    explicit = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(pomp_cross_entropy(pos, neg, reject, correction), explicit)


def test_negative_probs_hard_and_easy():
    feats = F.normalize(torch.randn(5, 8), dim=-1)
    bank = F.normalize(torch.randn(20, 8), dim=-1)
    mean = (10.0 * feats @ bank.T).mean(0)
    torch.testing.assert_close(negative_probs(feats, bank, 10.0, "hard"), torch.softmax(mean, 0))
    torch.testing.assert_close(negative_probs(feats, bank, 10.0, "easy"), torch.softmax(-mean, 0))
    with pytest.raises(ValueError, match="hard' or 'easy'"):
        negative_probs(feats, bank, 10.0, "random")
