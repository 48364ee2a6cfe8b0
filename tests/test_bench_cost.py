"""bench/bench_cost.py times equal work: the factored and loop branch steps give the same gradients;
bench/bench_branch_parts.py times every part of a DIDA stage; bench/bench_step_profile.py times each pair's step."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from bench_branch_parts import channels_first_conv, main as branch_parts_main, matmul_1x1s  # noqa: E402
from bench_cost import (branch_step_fn, compiled, count_top_level_ops, dynamic_conv_step_fn,  # noqa: E402
                        ratio_with_spread)
from bench_cost import main as cost_main  # noqa: E402
from bench_step_profile import main as step_profile_main, step_profile  # noqa: E402

from dida_timm.layers import DidaBranch, DidaModule, dida, dida_triton  # noqa: E402


def _grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_factored_and_loop_branch_steps_compute_the_same_gradients():
    torch.manual_seed(0)
    branch = DidaBranch(32, 64, 64, depth=2, stride=2)
    x = torch.randn(6, 32, 8, 8)
    grads = {}
    for form in ('factored', 'loop'):
        branch_step_fn(branch, x, form, compile_mode=None)()
        grads[form] = _grads(branch)
    assert grads['factored'].keys() == grads['loop'].keys() and len(grads['loop']) == len(list(branch.parameters()))
    for name, grad in grads['factored'].items():
        torch.testing.assert_close(grad, grads['loop'][name], atol=1e-5, rtol=1e-4, msg=name)
    branch_step_fn(branch, x, 'shared only', compile_mode=None)()  # runs, skipping the depthwise conv


def test_factored_and_loop_dynamic_conv_steps_compute_the_same_gradients():
    torch.manual_seed(0)
    module = DidaBranch(32, 64, 64, depth=1, stride=2)[0].dida
    x = torch.randn(5, 32, 8, 8)
    feat = torch.relu(module.conv(x)).detach()
    grads = {}
    for per_sample in (False, True):
        dynamic_conv_step_fn(module, feat, x, per_sample, compile_mode=None)()
        grads[per_sample] = _grads(module)
    assert any(n.startswith('conv_kernel') for n in grads[True])  # the kernel generator is part of the timed work
    for name, grad in grads[False].items():
        torch.testing.assert_close(grad, grads[True][name], atol=1e-5, rtol=1e-4, msg=name)


def test_ratio_is_of_the_medians_with_the_quartiles_of_the_paired_rounds():
    times = {'static': [1.0, 2.0, 1.0, 2.0], 'dida': [1.1, 2.4, 1.0, 2.6]}  # per round 1.1, 1.2, 1.0, 1.3
    assert ratio_with_spread(times) == '1.167 [1.025, 1.275]'


def test_ops_running_a_kernel_leave_out_views_but_not_a_reshape_that_copies():
    x = torch.randn(4, 6)

    def fn():
        x.view(6, 4).unsqueeze(0)  # views only: no kernel
        x.t().reshape(24)  # a reshape of a transposed tensor copies
        x.add(1)
    assert count_top_level_ops(fn) == 5
    assert count_top_level_ops(fn, views=False) == 2


def test_op_counts_on_the_meta_device_are_the_gpu_forms(capsys):
    # no data on meta tensors, so only counting is allowed; the counts are those of the unit's off-CPU forms
    with pytest.raises(SystemExit):
        cost_main(['--models-only', '--device', 'meta'])
    assert '--device: meta tensors have no data' in capsys.readouterr().err
    per_unit = {}
    for device in ('cpu', 'meta'):
        cost_main(['--ops-only', '--depths', '18', '--device', device])
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| dida_resnet18 '))
        per_unit[device] = [float(v) for v in row.split('|')[3].split('(')[0].split('/')]
    # the 1x1s as one conv each, not a batched matmul and its views; no channels-last copy
    assert per_unit['meta'][0] <= per_unit['cpu'][0] - 8 and per_unit['meta'][1] == per_unit['cpu'][1] - 1


def test_inference_forms_run_at_most_15_extra_ops_per_unit_on_the_gpu_forms(capsys):
    # the forward target, met by the eager unit once timm's reparameterize_model has stored its conv weight
    # and folded its norms (22.5-25.3 ops per unit before), ConvNeXt's LayerNorm (three ops) included since the
    # fuse reads the paths without a re-layout (16.0 before)
    cost_main(['--ops-only', '--depths', '18', '50', '--device', 'meta', '--reparameterize',
               '--generic', 'efficientnet_b0', 'convnext_atto'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| dida_')]
    assert len(rows) == 6 and rows[-1].startswith('| dida_convnext_atto vs convnext_atto |')
    for row in rows:
        ops, kernel_ops = (float(v) for v in row.split('|')[3].split('(')[0].split('/'))
        assert ops <= 15 and kernel_ops <= 11, row
    with pytest.raises(SystemExit):
        cost_main(['--ops-only', '--reparameterize', '--triton'])
    assert '--reparameterize: the inference forms run no Triton kernels' in capsys.readouterr().err


def test_step_profile_times_each_chosen_pair_and_has_no_kernel_columns_on_a_cpu(capsys):
    step_profile_main(['--device', 'cpu', '--reps', '2', '--steps', '1', '--models', 'dida_digitnet_compact'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| dida_')]
    assert len(rows) == 1 and rows[0].startswith('| dida_digitnet_compact vs digitnet_compact | ')
    cells = rows[0].strip('| ').split(' | ')
    static_ms, dida_ms = (float(v) for v in cells[1].split(' / '))
    assert static_ms > 0 and dida_ms > 0 and cells[2].startswith(f'{dida_ms / static_ms:.3f} [')
    assert cells[3:] == ['-'] * 5  # no device kernels to count on a CPU


def test_step_profile_counts_kernels_not_the_device_spans_of_annotated_ranges(monkeypatch):
    # one step as the profiler reports it on a GPU: an annotated range's device span covers kernels counted on their
    # own (their time counted twice, the span as a kernel), and copies are not kernels
    import bench_step_profile
    from torch.autograd import DeviceType

    def event(name, device_type, activity_type, device_time=0., is_user_annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, activity_type=activity_type,
                               device_time=device_time, is_user_annotation=is_user_annotation)
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [event('aten::add_', cpu, 'cpu_op'), event('cudaLaunchKernel', cpu, 'cuda_runtime'),
              event('vectorized_elementwise_kernel', gpu, 'kernel', 10.),
              event('cudaMemsetAsync', cpu, 'cuda_runtime'), event('Memset (Device)', gpu, 'gpu_memset', 1.),
              event('Optimizer.step#SGD.step', cpu, 'user_annotation', is_user_annotation=True),
              event('Optimizer.step#SGD.step', gpu, 'gpu_user_annotation', 30., is_user_annotation=True),
              event('dida_timm::dynamic_paths', gpu, 'gpu_user_annotation', 12., is_user_annotation=True)]

    class Profile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def events(self):
            return events
    monkeypatch.setattr(bench_step_profile, 'profile', Profile)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *args: None)
    counts, kernel_us = step_profile(lambda: None, 1)
    assert counts == {'kernels': 1., 'launches': 1., 'copies': 1.}
    assert kernel_us == {'vectorized_elementwise_kernel': 10.}


def test_each_compiled_pair_starts_from_empty_dynamo_caches(monkeypatch):
    # the digit nets share one forward's code object: eval and train of four models filled Dynamo's 8 entries for it,
    # and one pair more would have been timed eager without a word
    calls = []
    monkeypatch.setattr(torch._dynamo, 'reset', lambda: calls.append('reset'))
    monkeypatch.setattr(torch, 'compile', lambda model, mode: calls.append(mode) or model)
    models = {'static': torch.nn.Identity(), 'dida': torch.nn.Identity()}
    assert compiled(models, 'default') == models and calls == ['reset', 'default', 'default']


def test_branch_parts_times_each_part_of_every_dida_stage(capsys):
    branch_parts_main(['--batch-size', '2', '--reps', '3'])
    rows = [line.split(' | ')[0].lstrip('| ') for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    unit = 'block3.branch.0.dida: DIDA module'
    assert rows[1:] == ['static step', 'DIDA step', 'block3: stage', 'block3: static blocks', 'block3: branch',
                        unit, f'{unit}, conv input channels-first', 'DIDA step - static step']


def test_branch_parts_times_the_module_with_a_channels_first_conv_input():
    feat = torch.randn(2, 3, 4, 4)
    layouts = []
    record = lambda: layouts.append(dida._grouped_conv_input(feat).is_contiguous())  # noqa: E731
    channels_first_conv(record)()
    record()
    assert layouts == [True, False]


def test_branch_parts_times_the_triton_unit_with_matmul_1x1s():
    if not dida_triton.triton_runs_on(torch.empty(0)):
        pytest.skip('the kernels run on CPU tensors only under TRITON_INTERPRET=1 (set by conftest when triton exists)')
    dida_triton.set_triton_dida(True)
    try:
        module = DidaModule(32, 16, reduction=4)
    finally:
        dida_triton.set_triton_dida(False)
    x = torch.randn(2, 32, 6, 6)
    outputs, names = [], []

    def run():
        with torch.profiler.profile() as prof:
            outputs.append(module(x))
        names.append({e.name for e in prof.events()})
    matmul_1x1s(run)()
    run()
    assert 'aten::baddbmm' in names[0] and 'aten::baddbmm' not in names[1]
    assert all('dida_timm::dynamic_paths' in n for n in names)  # both on the kernels
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_default_training_depths_are_those_among_the_depths_asked_for(monkeypatch):
    import bench_cost
    timed = {}
    monkeypatch.setattr(bench_cost, 'print_model_table', lambda depths, train_depths, *a, **k: timed.update(
        depths=depths, train_depths=train_depths))
    cost_main(['--depths', '18', '--models-only'])  # refused before: the default also named 50
    assert timed == dict(depths=[18], train_depths=[18])


def test_branch_macs_count_the_units_1x1s_from_their_shapes():
    import timm
    from bench_generic_cost import branch_macs
    model = timm.create_model('dida_regnety_004')
    unit = next(m for m in model.modules() if isinstance(m, DidaModule))
    macs = branch_macs(model, 64)  # regnety_004's last stage: 208 -> 440 channels, 4 x 4 -> 2 x 2 at 64 px
    assert macs['reduce'] == 4 * 4 * 208 * unit.reduced_chs and macs['fuse'] == 2 * 2 * 440 * unit.reduced_chs
    assert macs['depthwise'] > 0
