"""The FixMatch loss and the UDA training step on hand-made logits."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dida_timm.training import MultiViewModel, UdaConfig, fixmatch_loss, pseudo_label, uda_step, uda_param_groups
from dida_timm.training.step import stochastic_layers_off


def _logits(probs):
    return torch.tensor(probs).log()


def test_hard_mask_keeps_only_confident_pseudo_labels():
    weak = _logits([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]])
    strong = _logits([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    pseudo = pseudo_label(weak, threshold=0.95)
    assert pseudo.labels.tolist() == [0, 0, 2] and pseudo.weight.tolist() == [1.0, 0.0, 1.0]
    expected = (-math.log(0.5) - math.log(0.8)) / 3  # averaged over all 3 unlabelled images
    assert fixmatch_loss(strong, weak, threshold=0.95).item() == pytest.approx(expected, rel=1e-6)


def test_threshold_is_inclusive_and_zero_keeps_everything():
    weak = _logits([[0.95, 0.05], [0.6, 0.4]])
    assert pseudo_label(weak, threshold=0.95).weight.tolist() == [1.0, 0.0]
    assert pseudo_label(weak, threshold=0.0).weight.tolist() == [1.0, 1.0]


def test_soft_weighting_uses_the_confidence():
    weak = _logits([[0.9, 0.1], [0.3, 0.7]])
    strong = _logits([[0.5, 0.5], [0.25, 0.75]])
    expected = (0.9 * -math.log(0.5) + 0.7 * -math.log(0.75)) / 2
    assert fixmatch_loss(strong, weak, soft=True).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('soft', [False, True])
def test_no_gradient_flows_into_the_weak_view(soft):
    # soft: the weights are the weak view's confidences, a path a gradient could take
    weak = torch.randn(4, 5, requires_grad=True)
    strong = torch.randn(4, 5, requires_grad=True)
    fixmatch_loss(strong, weak * 10, threshold=0.0, soft=soft).backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


class _FixedLogits(nn.Module):
    """Returns prescribed logits for each input batch, looked up by the batch's first pixel."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.stack([self.table[int(v)] for v in x[:, 0]]) * self.scale


def _batch(ids):
    return torch.tensor(ids, dtype=torch.float32).view(-1, 1)


def test_step_normalises_by_target_batch_or_by_the_whole_unlabelled_stream():
    confident, unsure = torch.tensor([8.0, 0.0]), torch.tensor([0.1, 0.0])
    table = {0: confident, 1: unsure, 2: confident, 3: unsure, 4: torch.tensor([0.0, 1.0]), 5: torch.tensor([0.0, 1.0])}
    model = MultiViewModel(_FixedLogits(table), joint=True)
    source, source_y = _batch([0, 1]), torch.tensor([0, 0])
    t_weak, t_strong = _batch([2, 3]), _batch([4, 5])
    target_only = uda_step(model, UdaConfig(threshold=0.95), source, source_y, t_weak, t_strong)
    strong_ce = F.cross_entropy(torch.tensor([[0.0, 1.0]]), torch.tensor([0])).item()
    assert target_only['unlabelled_loss'].item() == pytest.approx(strong_ce / 2, rel=1e-5)
    assert target_only['keep_rate'].item() == 0.5
    both = uda_step(model, UdaConfig(threshold=0.95, unlabelled_stream='source+target'), source, source_y,
                    t_weak, t_strong, source_strong=_batch([4, 5]))
    # source image 0 is confident too: two kept images, averaged over K*B + B = 4
    assert both['unlabelled_loss'].item() == pytest.approx(2 * strong_ce / 4, rel=1e-5)


def test_target_labels_only_feed_the_diagnostic():
    table = {0: torch.tensor([9.0, 0.0]), 1: torch.tensor([9.0, 0.0]), 2: torch.tensor([0.0, 9.0])}
    model = MultiViewModel(_FixedLogits(table), joint=False)
    cfg = UdaConfig(forward_mode='separate')
    args = (model, cfg, _batch([0]), torch.tensor([0]), _batch([1, 2]), _batch([1, 2]))
    right = uda_step(*args, target_labels=torch.tensor([0, 1]))
    wrong = uda_step(*args, target_labels=torch.tensor([1, 0]))
    assert right['loss'].item() == wrong['loss'].item()
    assert (right['pseudo_correct'].item(), wrong['pseudo_correct'].item()) == (2, 0)


def test_source_only_step_is_plain_cross_entropy():
    model = MultiViewModel(nn.Linear(3, 4))
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    out = uda_step(model, UdaConfig(method='source_only'), x, y)
    torch.testing.assert_close(out['loss'], F.cross_entropy(model.model(x), y))


def test_joint_and_separate_passes_differ_only_through_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    inputs = [torch.randn(4, 3), torch.randn(4, 3) + 3]
    joint, separate = MultiViewModel(net, True)(inputs), MultiViewModel(net, False)(inputs)
    assert not torch.allclose(joint[0], separate[0])
    net.eval()
    for a, b in zip(MultiViewModel(net, True)(inputs), MultiViewModel(net, False)(inputs)):
        torch.testing.assert_close(a, b)


def test_bad_step_options_are_refused():
    with pytest.raises(ValueError, match='unlabelled_stream'):
        UdaConfig(unlabelled_stream='both')
    with pytest.raises(ValueError, match='threshold'):
        UdaConfig(threshold=1.5)


def test_branch_and_classifier_get_the_larger_learning_rate():
    import timm
    model = timm.create_model('dida_resnet18', num_classes=3)
    groups = uda_param_groups(model, new_lr_scale=10, weight_decay=5e-4)
    scale_of = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    decay_of = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    new = {n for n in named if '.branch.' in n or n.startswith('fc.')}
    assert {'layer4.branch.0.dida.conv_kernel.weight', 'layer4.branch.0.bn.bias', 'fc.weight'} <= new
    assert all(scale_of[id(p)] == (10 if n in new else 1) for n, p in named.items())
    assert decay_of[id(named['fc.bias'])] == 0 and decay_of[id(named['fc.weight'])] == 5e-4
    assert len(scale_of) == len(named)


def test_mixstyle_mixes_only_in_training_and_copies_follow_their_own_mode():
    import copy
    from dida_timm.training import MixStyle, attach_mixstyle
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    attach_mixstyle(model, '0', MixStyle(p=1.0))
    x = torch.randn(4, 3, 5, 5)
    model.eval()
    reference = model(x)
    twin = copy.deepcopy(model)
    model.train()
    assert not torch.allclose(model(x), reference)  # mixing happens in training mode
    torch.testing.assert_close(twin(x), reference)  # the eval-mode copy does not mix
    with pytest.raises(ValueError, match='no such module'):
        attach_mixstyle(model, 'layer9', MixStyle())


def test_ema_after_two_epochs_equals_a_hand_rolled_ema_of_every_update():
    from timm.utils import ModelEmaV3
    from dida_timm.training import train_one_epoch
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema, decay = ModelEmaV3(net, decay=0.9), 0.9
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    expected, updates = None, 0

    def hand_rolled(_metrics):
        nonlocal expected, updates
        weights = [p.detach().clone() for p in net.parameters()]
        # timm's warmup: the first two updates copy the weights, then the EMA decays
        expected = weights if updates < 2 else [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        updates += 1

    for epoch in range(2):
        train_one_epoch(MultiViewModel(net), UdaConfig(method='source_only'), batches, None, optimizer,
                        epoch=epoch, update_offset=epoch * len(batches), ema=ema, progress=hand_rolled)
    assert updates == 6
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_an_epoch_reports_the_scheduled_learning_rate_of_its_last_update():
    from timm.scheduler import StepLRScheduler
    from dida_timm.training import train_one_epoch
    net = nn.Linear(3, 2)
    # the first group scaled, as layer decay and --lr-mult groups are: the schedule's value is reported, once
    optimizer = torch.optim.SGD([dict(params=[net.weight], lr_scale=0.1), dict(params=[net.bias])], lr=1.0)
    scheduler = StepLRScheduler(optimizer, decay_t=2, decay_rate=0.5, t_in_epochs=False)
    scheduler.step_update(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    # updates 0, 1 at lr 1.0, update 2 at 0.5; after it the scheduler has moved on to update 3's 0.5
    metrics = train_one_epoch(MultiViewModel(net), UdaConfig(method='source_only'), batches, None, optimizer, scheduler)
    assert metrics['lr'] == 0.5
    metrics = train_one_epoch(MultiViewModel(net), UdaConfig(method='source_only'), batches[:1], None, optimizer,
                              scheduler, update_offset=3)
    assert metrics['lr'] == 0.5 and optimizer.param_groups[1]['lr'] == 0.25  # update 3 used 0.5; 4 will use 0.25


def test_an_epoch_that_keeps_no_pseudo_label_reports_no_pseudo_label_accuracy_in_strict_json():
    from dida_timm.training import train_one_epoch
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    source = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    target = [(torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    # no softmax of a linear layer on random inputs reaches 1.0: every pseudo-label is dropped
    metrics = train_one_epoch(MultiViewModel(net), UdaConfig(threshold=1.0), source, target, optimizer)
    assert metrics['keep_rate'] == 0.0 and metrics['pseudo_accuracy'] is None
    json.dumps(metrics, allow_nan=False)  # results.json and summary.csv carry it as null / empty


@pytest.mark.parametrize('stream', ['target', 'source+target'])
def test_separate_mode_makes_the_released_codes_three_passes(stream):
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    seen = []  # (batch size, gradients enabled, training mode) of every batch the BN normalises
    net[1].register_forward_pre_hook(lambda m, x: seen.append((len(x[0]), torch.is_grad_enabled(), m.training)))
    source, labels = torch.randn(6, 3), torch.randint(0, 2, (6,))
    weak, strong, source_strong = torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3)
    for mode, joint in (('joint', True), ('separate', False)):
        seen.clear()
        out = uda_step(MultiViewModel(net, joint), UdaConfig(forward_mode=mode, unlabelled_stream=stream, threshold=0),
                       source, labels, weak, strong, source_strong=source_strong)
        out['loss'].backward()
        unlabelled = 10 if stream == 'source+target' else 4
        if mode == 'joint':
            assert seen == [(6 + 4 + 4 + (6 if stream == 'source+target' else 0), True, True)]
        else:
            # pseudo-labels: weak views without gradients; then the supervised pass; then the strong views
            assert seen == [(unlabelled, False, True), (6, True, True), (unlabelled, True, True)]


def test_pseudo_labels_without_dropout_keep_batch_statistics_and_restore_every_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.9), nn.Linear(8, 2))
    seen = []  # (gradients enabled, BN training, dropout training) of every pass
    net[1].register_forward_pre_hook(lambda m, x: seen.append((torch.is_grad_enabled(), m.training, net[2].training)))
    source, labels = torch.randn(6, 3), torch.randint(0, 2, (6,))
    weak, strong = torch.randn(4, 3), torch.randn(4, 3)
    model = MultiViewModel(net, joint=False)
    for dropout in (True, False):
        seen.clear()
        uda_step(model, UdaConfig(forward_mode='separate', pseudo_label_dropout=dropout), source, labels, weak, strong)
        assert seen == [(False, True, dropout), (True, True, True), (True, True, True)]
        assert all(m.training for m in net.modules())
    # with dropout off the pseudo-labels are a function of the batch: two steps agree exactly
    with torch.no_grad(), stochastic_layers_off(model):
        first, second = model([weak])[0], model([weak])[0]
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError, match='separate'):
        UdaConfig(forward_mode='joint', pseudo_label_dropout=False)
