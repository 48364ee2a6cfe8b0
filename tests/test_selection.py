"""Label-free scores, the ATC accuracy estimate, the collapse guard and the selection rules, on hand-made tensors."""
import math

import numpy as np
import pytest
import torch

from dida_timm.inference import label_free_check
from dida_timm.training.selection import (
    CollapseGuard, atc_estimate, cot_estimate, fit_atc_threshold, fit_atc_tie_share, fit_temperature,
    label_free_scores, select_checkpoint)

C = 10


def _one_hot_probs(labels: torch.Tensor, confidence: float = 0.9) -> torch.Tensor:
    probs = torch.full((len(labels), C), (1 - confidence) / (C - 1))
    probs[torch.arange(len(labels)), labels] = confidence
    return probs


def test_a_collapsed_prediction_set_has_one_effective_class_and_nine_dead_ones():
    scores = label_free_scores(_one_hot_probs(torch.zeros(500, dtype=torch.long), 0.99))
    assert scores['effective_classes'] == pytest.approx(1.0)
    assert scores['dead_classes'] == C - 1
    # entropy alone would call it the best model there is: confident and low-entropy
    assert scores['mean_entropy'] < 0.1


def test_a_balanced_prediction_set_has_every_class_alive():
    scores = label_free_scores(_one_hot_probs(torch.arange(500) % C))
    assert scores['effective_classes'] == pytest.approx(C)
    assert scores['dead_classes'] == 0


def test_uniform_probabilities_have_maximal_entropy_and_no_information():
    scores = label_free_scores(torch.full((200, C), 1.0 / C))
    assert scores['mean_entropy'] == pytest.approx(math.log(C))
    assert scores['entropy_of_mean'] == pytest.approx(math.log(C))
    assert scores['information_maximization'] == pytest.approx(0.0, abs=1e-9)
    assert scores['pseudo_keep_share'] == 0.0


def test_information_maximization_is_the_entropy_of_the_mean_less_the_mean_entropy():
    probs = _one_hot_probs(torch.arange(500) % C, 0.9)  # balanced (mean uniform) and confident
    mean_entropy = -(probs * probs.log()).sum(1).mean().item()
    scores = label_free_scores(probs)
    assert scores['information_maximization'] == pytest.approx(math.log(C) - mean_entropy)
    assert scores['information_maximization'] > 1.0


def test_bnm_is_highest_for_confident_diverse_predictions():
    diverse = label_free_scores(_one_hot_probs(torch.arange(500) % C, 1.0))['bnm']
    collapsed = label_free_scores(_one_hot_probs(torch.zeros(500, dtype=torch.long), 1.0))['bnm']
    # one-hot rows: sqrt(C) x the nuclear norm of a single repeated row
    assert diverse == pytest.approx(math.sqrt(C) * collapsed)


def test_agreement_counts_predictions_equal_to_the_reference():
    labels = torch.arange(100) % C
    reference = labels.clone()
    reference[:25] = (reference[:25] + 1) % C
    scores = label_free_scores(_one_hot_probs(labels), reference)
    assert scores['agreement'] == pytest.approx(75.0)
    with pytest.raises(ValueError, match='do not match'):
        label_free_scores(_one_hot_probs(labels), reference[:10])


def test_pseudo_label_share_and_balance_follow_the_threshold():
    labels = torch.arange(100) % C
    probs = _one_hot_probs(labels, 0.5)
    probs[:40] = _one_hot_probs(torch.zeros(40, dtype=torch.long), 0.99)
    scores = label_free_scores(probs, pseudo_label_threshold=0.95)
    assert scores['pseudo_keep_share'] == pytest.approx(0.4)
    assert scores['pseudo_effective_classes'] == pytest.approx(1.0)  # only class 0 clears the threshold
    lower = label_free_scores(probs, pseudo_label_threshold=0.4)  # every prediction clears it
    assert lower['pseudo_keep_share'] == pytest.approx(1.0)
    assert lower['pseudo_effective_classes'] > 5


@pytest.mark.parametrize('score', ['max_prob', 'neg_entropy'])
def test_atc_recovers_the_target_accuracy_when_correctness_follows_the_confidence(score):
    # a model that is right exactly on the images whose confidence clears 0.7: ATC's threshold fitted on the
    # source lands there, and the target's share above it is its accuracy, whatever the shift in confidence
    gen = torch.Generator().manual_seed(0)

    def domain(n, low, high):
        q = low + (high - low) * torch.rand(n, generator=gen)
        labels = torch.randint(0, C, (n,), generator=gen)
        right = q >= 0.7
        predicted = torch.where(right, labels, (labels + 1) % C)
        probs = ((1 - q) / (C - 1)).unsqueeze(1).repeat(1, C)
        probs[torch.arange(n), predicted] = q
        return probs, labels, float(right.float().mean() * 100)

    source_probs, source_labels, source_acc = domain(20000, 0.4, 1.0)
    target_probs, _, target_acc = domain(20000, 0.3, 0.8)
    threshold = fit_atc_threshold(source_probs, source_labels, score)
    assert atc_estimate(source_probs, threshold, score) == pytest.approx(source_acc, abs=0.1)
    assert target_acc == pytest.approx(20.0, abs=1.0)
    assert atc_estimate(target_probs, threshold, score) == pytest.approx(target_acc, abs=0.5)


def test_atc_counts_images_tied_at_its_threshold_in_part():
    # a confident model: its maximum probability rounds to 1.0 on 95% of 90%-accurate source images (ties at the
    # threshold), counted whole, ATC estimated those very images at 95%
    n = 1000
    labels = torch.arange(n) % C
    predicted = labels.clone()
    predicted[:100] = (predicted[:100] + 1) % C
    margin = torch.full((n,), 60.0)
    margin[:50] = 3.0
    logits = torch.zeros(n, C, dtype=torch.float64)
    logits[torch.arange(n), predicted] = margin.double()
    probs = logits.softmax(-1)
    assert (probs.max(-1).values == 1).double().mean() == 0.95
    threshold = fit_atc_threshold(probs, labels)
    share = fit_atc_tie_share(probs, labels, threshold)
    assert threshold == 1.0 and share == pytest.approx(900 / 950)
    assert atc_estimate(probs, threshold, tie_share=share) == pytest.approx(90.0)
    assert atc_estimate(probs, threshold) == pytest.approx(95.0)  # every tie counted, as exports before it do
    # without ties the share changes nothing
    smooth = _one_hot_probs(labels, 0.9) + torch.rand(n, 1) * 1e-3
    t = fit_atc_threshold(smooth, labels)
    assert fit_atc_tie_share(smooth, labels, t) == 1.0


def test_label_free_probabilities_keep_a_confident_models_margins_apart():
    from torch.utils.data import TensorDataset

    from dida_timm.training.evaluation import predict_probs
    logits = torch.zeros(3, 4)
    logits[:, 0] = torch.tensor([18.0, 22.0, 30.0])  # each a maximum probability float32 rounds to 1.0
    probs, _ = predict_probs(torch.nn.Identity(), TensorDataset(logits, torch.zeros(3)))
    assert probs.dtype == torch.float64 and (logits.softmax(-1).max(-1).values == 1).all()
    top = probs.max(-1).values
    assert (top < 1).all() and top[0] < top[1] < top[2]


def test_atc_of_a_perfect_source_model_keeps_every_source_image():
    probs = _one_hot_probs(torch.arange(50) % C, 0.9)
    threshold = fit_atc_threshold(probs, torch.arange(50) % C)
    assert atc_estimate(probs, threshold) == 100.0


def _row(epoch, labels, reference=None, confidence=0.9, **extra):
    row = dict(epoch=epoch, **label_free_scores(_one_hot_probs(labels, confidence), reference), **extra)
    return row


def test_the_guard_flags_a_collapse_and_the_rule_falls_back_to_the_source_only_model():
    balanced = torch.arange(500) % C
    start = _row(5, balanced, balanced, confidence=0.6)
    collapsed = balanced.clone()
    collapsed[balanced >= 5] = 0  # five classes die
    epochs = [start] + [_row(e, collapsed, balanced, confidence=0.97) for e in range(6, 10)]
    selection = select_checkpoint(epochs, 'guarded_last')
    assert selection.epoch == 5 and selection.guard_fired
    assert set(selection.flagged) == {6, 7, 8, 9}
    assert 'falling back to the source-only model' in selection.reason
    assert any('dead classes' in r for r in selection.flagged[6])
    # 'last' keeps today's behaviour and ships the collapsed model
    assert select_checkpoint(epochs, 'last').epoch == 9


def test_the_guard_passes_a_healthy_adaptation_and_the_rule_keeps_the_latest_epoch():
    balanced = torch.arange(500) % C
    improved = balanced.clone()
    improved[:50] = (improved[:50] + 3) % C  # 90% agreement, every class alive
    epochs = [_row(5, balanced, balanced, 0.6)] + [_row(e, improved, balanced, 0.9) for e in range(6, 9)]
    selection = select_checkpoint(epochs, 'guarded_last')
    assert selection.epoch == 8 and not selection.guard_fired


def test_a_flag_on_an_early_epoch_only_is_not_a_fired_guard():
    balanced = torch.arange(500) % C
    collapsed = balanced.clone()
    collapsed[balanced >= 5] = 0
    epochs = [_row(5, balanced, balanced, 0.6), _row(6, collapsed, balanced, 0.97), _row(7, balanced, balanced, 0.9)]
    selection = select_checkpoint(epochs, 'guarded_last')
    assert selection.epoch == 7 and set(selection.flagged) == {6} and not selection.guard_fired


def test_a_confident_relabelling_trips_the_agreement_check():
    balanced = torch.arange(500) % C
    swapped = (balanced + 1) % C  # every class alive, none where it was
    reasons = CollapseGuard().check(_row(6, swapped, balanced, 0.97), _row(5, balanced, balanced, 0.6))
    assert any('agreement' in r for r in reasons)
    # the same relabelling with falling confidence is not the self-training signature
    assert not CollapseGuard().check(_row(6, swapped, balanced, 0.5), _row(5, balanced, balanced, 0.6))


def test_guarded_estimate_picks_the_highest_estimate_among_unflagged_epochs():
    balanced = torch.arange(500) % C
    collapsed = balanced.clone()
    collapsed[balanced >= 5] = 0  # five classes die
    rows = [_row(0, balanced, balanced, confidence=0.6, estimated_accuracy=60.0),
            _row(1, balanced, balanced, estimated_accuracy=75.0),
            _row(2, collapsed, balanced, confidence=0.97, estimated_accuracy=90.0),
            _row(3, balanced, balanced, estimated_accuracy=70.0)]
    selection = select_checkpoint(rows, 'guarded_estimate')
    assert selection.epoch == 1 and set(selection.flagged) == {2}  # not the collapsed epoch's higher estimate


def test_an_unknown_rule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match='guarded_last'):
        select_checkpoint([dict(epoch=0, effective_classes=10, dead_classes=0, mean_confidence=0.5)], 'best')


def test_the_monitor_takes_the_reference_from_the_epoch_it_just_scored(monkeypatch):
    from torch.utils.data import TensorDataset

    import dida_timm.training.label_free as label_free
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    target = TensorDataset(torch.randn(20, 3, 2, 2), torch.full((20,), -1))
    source = TensorDataset(torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,)))
    passes = []
    predict = label_free.predict_probs
    monkeypatch.setattr(label_free, 'predict_probs', lambda m, ds, *a: passes.append(ds) or predict(m, ds, *a))
    scored = label_free.LabelFreeMonitor(None, False, target, source, torch.full((4,), 0.25))
    scored.set_reference(model, 3, scored.score(model, 3))
    assert [p is target for p in passes] == [True, False]  # one pass over the target slice, one over the source
    fresh = label_free.LabelFreeMonitor(None, False, target, source, torch.full((4,), 0.25))  # resumed: epoch 3 not scored here
    fresh.set_reference(model, 3, {})
    assert torch.equal(fresh.reference_predictions, scored.reference_predictions)
    assert len(passes) == 3


def test_cot_estimate_charges_predictions_the_label_marginal_cannot_absorb():
    share = torch.full((4,), 0.25)  # the source labels: uniform over 4 classes
    confident_right = torch.eye(4)[torch.arange(8) % 4]  # 8 images, 2 per class, all with probability 1
    assert cot_estimate(confident_right, share) == pytest.approx(100.0)
    # every image confidently the same class: only a quarter can be transported at no cost
    collapsed = torch.eye(4)[torch.zeros(8, dtype=torch.long)]
    assert cot_estimate(collapsed, share) == pytest.approx(25.0)
    # confidence 0.7 on balanced predictions: each image pays 1 - 0.7
    soft = torch.full((8, 4), 0.1)
    soft[torch.arange(8), torch.arange(8) % 4] = 0.7
    assert cot_estimate(soft, share) == pytest.approx(70.0, abs=1e-4)
    # the label shares decide which classes may absorb the images: all of them one class
    assert cot_estimate(collapsed, torch.tensor([1.0, 0, 0, 0])) == pytest.approx(100.0)


def test_cot_estimate_reads_the_predictions_at_the_given_temperature():
    soft = torch.full((8, 4), 0.1)
    soft[torch.arange(8), torch.arange(8) % 4] = 0.7
    share = torch.full((4,), 0.25)
    sharpened = cot_estimate(soft, share, temperature=0.5)  # p ∝ p^2: 0.49 / (0.49 + 3 x 0.01)
    assert sharpened == pytest.approx(100 * 0.49 / 0.52, abs=1e-3)
    assert cot_estimate(soft, share, temperature=2.0) < cot_estimate(soft, share) < sharpened


def test_cot_estimate_samples_a_large_set_and_refuses_mismatched_shares():
    torch.manual_seed(0)
    probs = torch.randn(50, 3).softmax(-1)
    share = torch.full((3,), 1 / 3)
    full = cot_estimate(probs, share)
    sampled = cot_estimate(probs, share, max_images=20)
    assert sampled != full and cot_estimate(probs, share, max_images=20) == sampled  # fixed sample
    with pytest.raises(ValueError, match='3 non-negative class shares'):
        cot_estimate(probs, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match='non-negative'):
        cot_estimate(probs, torch.tensor([0.5, 0.7, -0.2]))


def test_temperature_scaling_recovers_the_temperature_that_calibrates_the_probabilities():
    # labels drawn from softmax(z); the model reports softmax(z / 0.5), overconfident by a factor 2 in the logits
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=gen) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
    overconfident = (logits / 0.5).softmax(-1)
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(logits.softmax(-1), labels) == pytest.approx(1.0, rel=0.1)
    # a perfectly separated set drives T towards 0 (sharper is always better): it stops small and finite
    assert 0.05 <= fit_temperature(torch.eye(5)[labels] * 0.9 + 0.02, labels) < 0.5


def test_the_folder_check_reports_cot_first_and_atc_without_an_exported_temperature():
    collapsed = torch.eye(4)[torch.zeros(8, dtype=torch.long)] * 0.97 + 0.01  # every image confidently class 0
    cfg = dict(atc_threshold=0.5, atc_score='max_prob')
    lines = label_free_check(collapsed, cfg)
    assert lines[0].startswith('estimated accuracy by ATC on these 8 images: 100.0%')  # ATC misses the collapse
    assert not any('COT' in line for line in lines)
    lines = label_free_check(collapsed, dict(cfg, temperature=1.0, label_share=[0.25] * 4))
    assert lines[0].startswith('estimated accuracy by COT on these 8 images: 25.')  # COT charges it
    assert lines[1].startswith('estimated accuracy by ATC')
    # every image at the threshold: the export's tie share counts them in part (exports without it count them all)
    at = float(collapsed.double().max())
    lines = label_free_check(collapsed, dict(atc_threshold=at, atc_score='max_prob', atc_tie_share=0.25))
    assert lines[0].startswith('estimated accuracy by ATC on these 8 images: 25.0%')
    # an export from before the tie share fitted its threshold on float32 probabilities, confident ones rounded to
    # 1.0: scored so again, not in the float64 the prediction now gives
    logits = torch.zeros(8, 4, dtype=torch.float64)
    logits[:, 0] = 20.0
    confident = logits.softmax(-1)
    assert label_free_check(confident, dict(atc_threshold=1.0, atc_score='max_prob'))[0].startswith(
        'estimated accuracy by ATC on these 8 images: 100.0%')
    assert label_free_check(confident, dict(atc_threshold=1.0, atc_score='max_prob', atc_tie_share=1.0))[0].startswith(
        'estimated accuracy by ATC on these 8 images: 0.0%')


def test_the_folder_check_makes_no_collapse_comparison_on_too_few_images():
    # 30 images of a healthy 10-class model: classes go missing by chance, which the guard took for a collapse
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (30,), generator=gen)
    healthy = torch.full((30, 10), 0.2 / 9).scatter_(1, labels[:, None], 0.8)
    cfg = dict(atc_threshold=0.5, atc_score='max_prob', guard=dict(min_effective_ratio=0.95),
               target_scores=dict(effective_classes=9.9, dead_classes=0, mean_confidence=0.8))
    lines = label_free_check(healthy, cfg)
    assert not any(line.startswith('WARNING') for line in lines)
    assert any(line.startswith('note: 30 images are fewer than 100 (10 per class)') for line in lines)
    collapsed = torch.eye(10)[torch.zeros(100, dtype=torch.long)] * 0.9 + 0.01
    assert any(line.startswith('WARNING: possible collapse') for line in label_free_check(collapsed, cfg))


def test_a_resumed_monitor_restores_the_reference_predictions_exactly(monkeypatch, tmp_path):
    from torch.utils.data import TensorDataset

    import dida_timm.training.label_free as label_free
    # class 1 is ahead by 5e-5, under float16's spacing here (2.4e-4): as float16 the three classes tie
    target_probs = torch.tensor([[0.3333, 0.33335, 0.3333], [0.1, 0.2, 0.7]])
    source_probs, source_labels = torch.eye(3) * 0.8 + 0.2 / 3, torch.arange(3)
    target = TensorDataset(torch.zeros(2, 1), torch.full((2,), -1))
    source = TensorDataset(torch.zeros(3, 1), source_labels)
    monkeypatch.setattr(label_free, 'predict_probs', lambda m, ds, *a: (
        (target_probs, ds.tensors[1]) if ds is target else (source_probs, source_labels)))
    args = (target, source, torch.full((3,), 1 / 3))
    run = label_free.LabelFreeMonitor(tmp_path, True, *args)
    model = torch.nn.Linear(1, 3)  # predict_probs is replaced: only its weights are kept
    run.set_reference(model, 3, run.score(model, 3))
    resumed = label_free.LabelFreeMonitor(tmp_path, False, *args)
    resumed.restore_reference(3)
    assert run.reference_predictions.tolist() == [1, 2]
    assert torch.equal(resumed.reference_predictions, run.reference_predictions)
    # a run written before the predicted classes were saved resumes with the argmax it used itself
    dump = run._dump(3)
    saved = dict(np.load(dump))
    np.savez_compressed(dump, **{k: v for k, v in saved.items() if k != 'target_predictions'})
    resumed.restore_reference(3)
    assert resumed.reference_predictions.tolist() == saved['target_probs'].astype(np.float32).argmax(-1).tolist()


def test_the_saved_probabilities_recompute_the_logged_scores_exactly(monkeypatch, tmp_path):
    from torch.utils.data import TensorDataset

    import dida_timm.training.label_free as label_free
    from dida_timm.training.selection import (
        atc_estimate, cot_estimate, fit_atc_threshold, fit_atc_tie_share, fit_temperature)
    # confident predictions, as a trained model gives: float16 rounded many to exactly 1.0, which moved the threshold
    gen = torch.Generator().manual_seed(0)
    source_probs = torch.softmax(torch.randn(200, 4, generator=gen) * 12, -1)
    source_labels = torch.where(torch.rand(200, generator=gen) < 0.9, source_probs.argmax(-1), 0)
    target_probs = torch.softmax(torch.randn(100, 4, generator=gen) * 10, -1)
    target = TensorDataset(torch.zeros(100, 1), torch.full((100,), -1))
    source = TensorDataset(torch.zeros(200, 1), source_labels)
    monkeypatch.setattr(label_free, 'predict_probs', lambda m, ds, *a: (
        (target_probs, ds.tensors[1]) if ds is target else (source_probs, source_labels)))
    share = torch.full((4,), 0.25)
    monitor = label_free.LabelFreeMonitor(tmp_path, True, target, source, share)
    row = monitor.score(torch.nn.Linear(1, 4), 1)
    saved = {k: torch.from_numpy(v) for k, v in np.load(monitor._dump(1)).items()}
    threshold = fit_atc_threshold(saved['source_probs'], saved['source_labels'], monitor.atc_score)
    temperature = fit_temperature(saved['source_probs'], saved['source_labels'])
    tie_share = fit_atc_tie_share(saved['source_probs'], saved['source_labels'], threshold, monitor.atc_score)
    assert (threshold, tie_share, temperature) == (row['atc_threshold'], row['atc_tie_share'], row['temperature'])
    assert atc_estimate(saved['target_probs'], threshold, monitor.atc_score, tie_share) == row['estimated_accuracy']
    assert cot_estimate(saved['target_probs'], share, temperature) == row['cot_estimated_accuracy']
