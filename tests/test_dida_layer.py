"""The DIDA module (docs/METHOD.md section 1): equations, parameter counts, gradients and per-sample kernels."""
import copy
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import dida_timm  # noqa: F401  registers the models
from dida_timm.layers import DidaBranch, DidaModule, dida
from dida_timm.layers.dida_reference import dida_forward_per_sample, literal_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from bench_cost import count_top_level_ops  # noqa: E402


def _randomise(module: DidaModule, seed: int = 0) -> DidaModule:
    """Random weights everywhere (biases included), at a scale where float32 keeps 1e-5 absolute precision."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.6 - 0.3)
    return module


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilations', [(1,), (2,), (1, 2), (2, 1), (2, 4)])
@pytest.mark.parametrize('shared_reduction', [True, False])
@pytest.mark.parametrize('dynamic', [True, False])
def test_factored_forward_equals_per_sample_loop(stride, dilations, shared_reduction, dynamic):
    module = _randomise(DidaModule(32, 16, stride=stride, reduction=4, dilations=dilations,
                                   shared_reduction=shared_reduction, dynamic=dynamic))
    x = torch.randn(6, 32, 11, 11)
    factored, loop = module(x), dida_forward_per_sample(module, x)
    assert factored.shape == loop.shape == (6, 16, (11 - 1) // stride + 1, (11 - 1) // stride + 1)
    assert (factored - loop).abs().max().item() <= 1e-5


@pytest.mark.parametrize('kernel_size', [(1, 3), (3, 1), (3, 5), (5, 3), 1])
@pytest.mark.parametrize('stride', [1, 2])
def test_factored_forward_equals_loop_with_a_kernel_size_per_dilation(kernel_size, stride):
    module = _randomise(DidaModule(32, 16, stride=stride, reduction=4, kernel_size=kernel_size))
    x = torch.randn(3, 32, 9, 9)
    assert (module(x) - dida_forward_per_sample(module, x)).abs().max().item() <= 1e-5


def test_reference_kernels_from_the_generator_convs_equal_the_factored_kernels():
    module = _randomise(DidaModule(32, 16, reduction=4, kernel_size=(1, 3)))
    x = torch.randn(5, 32, 6, 6)
    for literal, factored in zip(literal_kernels(module, x), module.generate_kernels(x)):
        torch.testing.assert_close(literal, factored)


@pytest.mark.parametrize('shared_reduction', [True, False])
def test_bfloat16_autocast_stays_within_bfloat16_precision(shared_reduction):
    module = _randomise(DidaModule(32, 16, reduction=4, shared_reduction=shared_reduction))
    x = torch.randn(4, 32, 9, 9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = module(x)
    reference = dida_forward_per_sample(module, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def _output_and_gradients(module: DidaModule, x: torch.Tensor) -> list:
    """The module's output at `x`, then the gradients of `x` and of every parameter for a fixed weighting of it."""
    module.zero_grad()
    inp = x.clone(memory_format=torch.preserve_format).requires_grad_()
    out = module(inp)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return [out.detach(), inp.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize('dynamic', [True, False])
def test_channels_last_input_gives_the_same_outputs_and_gradients(dynamic):
    # train.py --channels-last converts the model; the 1x1 matmuls read the input as [N, C, H * W]
    module = _randomise(DidaModule(32, 16, reduction=4, stride=2, dynamic=dynamic))
    x = torch.randn(3, 32, 9, 9)
    channels_first = _output_and_gradients(module, x)
    channels_last = _output_and_gradients(module, x.to(memory_format=torch.channels_last))
    for a, b in zip(channels_first, channels_last):
        torch.testing.assert_close(b, a)


class OffCpu(torch.Tensor):
    """A CPU tensor that says it is elsewhere (ops keep the class): the unit takes the forms it takes on a GPU."""

    @property
    def is_cpu(self) -> bool:
        return False


def test_cpu_and_gpu_forms_of_the_unit_give_the_same_function(monkeypatch):
    # CPU tests would otherwise never run the forms GPUs run: the grouped conv on channels-first features (viewed
    # without a copy) and the 1x1s as convs, not batched matmuls
    module = _randomise(DidaModule(32, 16, reduction=4, stride=2))
    x = torch.randn(3, 32, 9, 9)
    layouts, cpu_layout = [], dida._grouped_conv_input

    def spy(feat):
        out = cpu_layout(feat)
        layouts.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
        return out

    monkeypatch.setattr(dida, '_grouped_conv_input', spy)
    results, ops = [], []
    for inp in (x, x.as_subclass(OffCpu)):
        with torch.profiler.profile() as prof:
            results.append(_output_and_gradients(module, inp))
        ops.append([e.name for e in prof.events() if e.name in ('aten::conv2d', 'aten::baddbmm')])
    assert layouts == [True, False]
    assert ops[0].count('aten::baddbmm') == 2 and ops[1] == ['aten::conv2d'] * 3  # forward only (backward: no conv2d)
    for cpu_form, gpu_form in zip(*results):
        torch.testing.assert_close(gpu_form, cpu_form)


@pytest.mark.parametrize('dynamic', [True, False])
def test_a_channels_last_model_runs_the_gpu_form_and_stays_channels_last(dynamic):
    # train.py --channels-last converts the model: the fuse conv's weight becomes channels-last, so off CPU the conv
    # writes channels-last and a sample's paths are not adjacent (a view of them failed); CPU reads it as a matmul
    module = _randomise(DidaModule(32, 16, reduction=4, stride=2, dynamic=dynamic))
    x = torch.randn(3, 32, 9, 9)
    reference = dida_forward_per_sample(module, x)
    module.to(memory_format=torch.channels_last)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = module(inp.as_subclass(OffCpu))
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('kwargs', [dict(), dict(dynamic=False), dict(dilations=(1,)), dict(shared_reduction=False)])
def test_an_empty_batch_gives_an_empty_output(kwargs):
    # timm's CNNs map a batch of 0 images to 0 outputs; a reshape with -1 cannot infer a size from 0 elements
    module = DidaModule(32, 16, reduction=4, stride=2, **kwargs).eval()
    x = torch.randn(0, 32, 9, 9)
    for inp in (x, x.as_subclass(OffCpu)):
        assert module(inp).shape == (0, 16, 5, 5)
    model = timm.create_model('dida_resnet18', num_classes=3).eval()
    assert model(torch.randn(0, 3, 64, 64)).shape == (0, 3)


def test_reparameterizing_a_frozen_unit_keeps_it_frozen():
    branch = DidaBranch(32, 16, 16, reduction=4).eval().requires_grad_(False)
    module = DidaModule(32, 16, reduction=4).eval()
    module.fuse.weight.requires_grad_(False)
    branch.reparameterize()
    module.reparameterize()
    assert not any(p.requires_grad for p in branch.parameters())
    assert not module.proj.weight.requires_grad and module.proj.bias.requires_grad


@pytest.mark.parametrize('device, ops, kernel_ops', [('cpu', 33, 12), ('meta', 20, 11)])
def test_forward_runs_few_aten_ops(device, ops, kernel_ops):
    # each op is a dispatch, and each that is not a view a kernel launch on a GPU (the unit used to run 47). Off CPU
    # (meta tensors: no data, the same dispatches) the 1x1s are one conv each; on CPU each is a batched matmul and
    # its views, and the features get a channels-last copy for the grouped conv (between two permutes: vmap)
    module = DidaModule(64, 128, reduction=16).eval().to(device)
    x = torch.randn(8, 64, 16, 16, device=device)
    with torch.no_grad():
        module(x)
        assert count_top_level_ops(lambda: module(x)) <= ops
        assert count_top_level_ops(lambda: module(x), views=False) <= kernel_ops


@pytest.mark.parametrize('in_chs, out_chs, reduction, expected', [
    (512, 512, 16, 24_904),  # docs/METHOD.md section 1: C = P = 512, with biases (paper footnote ~24.6K weights)
    (256, 512, 16, 8_504),
    (64, 128, 16, 620),  # Digit-Five CNN
])
def test_parameter_count_matches_spec(in_chs, out_chs, reduction, expected):
    module = DidaModule(in_chs, out_chs, reduction=reduction)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_weight_only_count_matches_paper_footnote():
    module = DidaModule(512, 512)
    assert sum(p.numel() for n, p in module.named_parameters() if n.endswith('weight')) == 24_596


def test_released_code_parameter_names():
    names = {n.split('.')[0] for n, _ in DidaModule(64, 64).named_parameters()}
    assert names == {'conv', 'conv_kernel', 'conv_kernel2', 'conv_k', 'conv_k2', 'fuse'}


@pytest.mark.parametrize('shared_reduction', [True, False])
def test_gradients_reach_every_generator_parameter(shared_reduction):
    module = _randomise(DidaModule(32, 32, reduction=4, shared_reduction=shared_reduction))
    module(torch.randn(4, 32, 6, 6)).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient reaches {name}'


def test_generated_kernels_depend_on_the_input():
    module = _randomise(DidaModule(32, 32, reduction=4))
    k1, = module.generate_kernels(torch.randn(1, 32, 6, 6))[:1]
    k2, = module.generate_kernels(torch.randn(1, 32, 6, 6))[:1]
    assert k1.shape == (1, 8, 3, 3)
    assert not torch.allclose(k1, k2)


def test_kernels_follow_their_sample_when_batch_is_permuted():
    module = _randomise(DidaModule(32, 32, reduction=4))
    x = torch.randn(5, 32, 6, 6)
    swapped = x[[3, 1, 2, 0, 4]]
    for kernels, kernels_swapped in zip(module.generate_kernels(x), module.generate_kernels(swapped)):
        torch.testing.assert_close(kernels_swapped, kernels[[3, 1, 2, 0, 4]])
    torch.testing.assert_close(module(swapped), module(x)[[3, 1, 2, 0, 4]])


@pytest.mark.parametrize('dynamic', [True, False])
def test_per_sample_gradients_through_torch_func_equal_one_backward_per_sample(dynamic):
    # torch.func.vmap (per-sample gradients, DP-SGD) takes no channels-last clone: the CPU form must avoid one
    module = _randomise(DidaModule(32, 32, reduction=4, dynamic=dynamic))
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    x = torch.randn(3, 32, 6, 6)

    def loss(p, sample):
        return torch.func.functional_call(module, (p, buffers), (sample[None],)).square().mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        module.zero_grad()
        module(x[i:i + 1]).square().mean().backward()
        for name, p in module.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, msg=name)


def test_single_sample_output_does_not_depend_on_the_rest_of_the_batch():
    module = _randomise(DidaModule(32, 32, reduction=4))
    x = torch.randn(4, 32, 6, 6)
    torch.testing.assert_close(module(x[:1]), module(x)[:1], rtol=1e-5, atol=1e-6)


def test_static_ablation_has_no_generator_and_learns_depthwise_kernels():
    module = DidaModule(64, 64, reduction=8, dynamic=False)
    names = {n.split('.')[0] for n, _ in module.named_parameters()}
    assert names == {'conv', 'conv_kernel', 'conv_kernel2', 'fuse'}
    assert module.conv_kernel.weight.shape == (8, 1, 3, 3) and module.conv_kernel.groups == 8
    x = torch.randn(2, 64, 8, 8)
    # a static branch gives every sample the same kernels: a sample's output ignores the other samples
    torch.testing.assert_close(module(x)[1:], module(x[1:]))
    with pytest.raises(RuntimeError, match='static'):
        module.generate_kernels(x)


@pytest.mark.parametrize('kwargs, message', [
    (dict(dilations=(1, 2, 3)), r"one or two dilations \(a model's dida_dilations\)"),
    (dict(out_chs=63), r"\(63\) must divide by the number of dilations \(a model's dida_dilations\), got \(1, 2\) "
                       r"\(one dilation, e.g. dida_dilations=\(1,\), takes any out_chs\)"),
    (dict(kernel_size=2), r"kernel_size \(a model's dida_kernel_size\) must be odd"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size \(a model's dida_kernel_size\) must be an int or have one entry per"),
    (dict(reduction=128), r"reduction \(a model's dida_reduction\) 128 leaves no channels of in_chs=64 \(at most 64\)"),
    (dict(reduction=0), r"reduction \(a model's dida_reduction\) must be a positive integer, got 0"),
    (dict(dilations=(0,)), r"dilations \(a model's dida_dilations\) must be positive integers, got \(0,\)"),
    (dict(dilations=(2, -1)), r"dilations \(a model's dida_dilations\) must be positive integers, got \(2, -1\)"),
    (dict(dilations=(1, 1.5)), r"must be positive integers, got \(1, 1.5\)"),
    (dict(stride=0), r"DidaModule stride must be a positive integer, got 0"),
    (dict(stride=True), r"DidaModule stride must be a positive integer, got True"),
    (dict(out_chs=0), r"DidaModule out_chs must be a positive integer, got 0"),
    (dict(out_chs=-2), r"DidaModule out_chs must be a positive integer, got -2"),
    (dict(in_chs=0), r"DidaModule in_chs must be a positive integer, got 0"),
    (dict(in_chs=64.0), r"DidaModule in_chs must be a positive integer, got 64.0"),
    (dict(kernel_size=3.0), r"kernel_size \(a model's dida_kernel_size\) must be odd positive integers, got 3.0"),
    (dict(kernel_size=(3, 5.0)), r"must be odd positive integers, got \(3, 5.0\)"),
    (dict(kernel_size='3'), r"kernel_size \(a model's dida_kernel_size\) must be an int or have one entry per"),
])
def test_bad_options_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DidaModule(**{'in_chs': 64, 'out_chs': 64, **kwargs})


def test_one_dilation_may_be_given_as_an_int_like_the_kernel_size():
    module = _randomise(DidaModule(32, 16, reduction=4, dilations=2, kernel_size=5))
    assert module.dilations == (2,) and module.kernel_sizes == (5,)
    x = torch.randn(2, 32, 9, 9)
    torch.testing.assert_close(module(x), dida_forward_per_sample(module, x), rtol=0, atol=1e-5)


def test_module_scripts_and_traces():
    module = _randomise(DidaModule(32, 32, reduction=4)).eval()
    x = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))
    torch.testing.assert_close(torch.fx.symbolic_trace(module)(x), module(x))


def _reparameterized(module: DidaModule) -> DidaModule:
    deployed = copy.deepcopy(module)
    deployed.reparameterize()
    return deployed


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilations, kernel_size', [((1,), 3), ((1, 2), 3), ((2, 4), (5, 3))])
@pytest.mark.parametrize('shared_reduction', [True, False])
@pytest.mark.parametrize('dynamic', [True, False])
def test_reparameterized_module_computes_the_same_function(stride, dilations, kernel_size, shared_reduction, dynamic):
    module = _randomise(DidaModule(32, 16 * len(dilations), stride=stride, reduction=4, dilations=dilations,
                                   kernel_size=kernel_size, shared_reduction=shared_reduction, dynamic=dynamic))
    deployed = _reparameterized(module)
    keys = set(deployed.state_dict())
    assert 'proj.weight' in keys and not any(k.startswith('fuse.') for k in keys) and not hasattr(deployed, 'fuse')
    assert ('paths_weight' in keys) == dynamic and not any(k.startswith('conv_k') for k in keys if dynamic)
    x = torch.randn(5, 32, 9, 9)
    with torch.no_grad():
        assert (deployed(x) - module(x)).abs().max().item() <= 1e-5
        assert (deployed(x.as_subclass(OffCpu)) - module(x)).abs().max().item() <= 1e-5  # the grouped 1x1 as a conv
        again = copy.deepcopy(deployed)
        again.reparameterize()  # a second call (timm's walk makes one) changes nothing
        assert again.state_dict().keys() == keys and torch.equal(again(x), deployed(x))


def test_reparameterized_module_scripts_traces_and_moves_its_weight():
    deployed = _reparameterized(_randomise(DidaModule(32, 32, reduction=4))).eval()
    x = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(torch.jit.script(deployed)(x), deployed(x))
    torch.testing.assert_close(torch.fx.symbolic_trace(deployed)(x), deployed(x))
    assert deployed.double().paths_weight.dtype == torch.float64
    with pytest.raises(RuntimeError, match='reparameterized'):
        deployed.generate_kernels(x.double())


@pytest.mark.parametrize('device, ops, kernel_ops', [('cpu', 23, 8), ('meta', 10, 7)])
def test_reparameterized_forward_skips_the_weight_build(device, ops, kernel_ops):
    # the grouped conv's weight (a gather and a multiply-add of the generator parameters, 8 ops with their views)
    # and the output's view are gone; compare test_forward_runs_few_aten_ops
    module = _reparameterized(DidaModule(64, 128, reduction=16)).eval().to(device)
    x = torch.randn(8, 64, 16, 16, device=device)
    with torch.no_grad():
        module(x)
        assert count_top_level_ops(lambda: module(x)) <= ops
        assert count_top_level_ops(lambda: module(x), views=False) <= kernel_ops


def test_numpy_integers_are_taken_and_an_input_of_the_wrong_shape_is_refused_naming_the_expected_one():
    module = DidaModule(np.int64(16), 8, kernel_size=np.int64(3), reduction=np.int64(4))
    assert module(torch.randn(2, 16, 6, 6)).shape == (2, 8, 6, 6)
    for kwargs in (dict(kernel_size=np.array([3, 5])), dict(dilations=np.int64(2)), dict(dilations=np.array([1, 2]))):
        unit = DidaModule(16, 8, reduction=4, **kwargs)
        assert all(type(v) is int for v in unit.dilations + unit.kernel_sizes)  # numpy's as Python's, in its state
        assert unit(torch.randn(2, 16, 6, 6)).shape == (2, 8, 6, 6)
    for x in (torch.randn(16, 6, 6), torch.randn(2, 15, 6, 6)):  # unbatched; one channel short
        with pytest.raises(ValueError, match=re.escape(f'DidaModule expects input [N, 16, H, W], got {list(x.shape)}')):
            module(x)


@pytest.mark.parametrize('outside', ['sequential', 'branch_as_model'])
def test_timm_reparameterize_model_on_a_unit_it_cannot_reach_says_what_to_call(outside):
    if outside == 'sequential':
        model = nn.Sequential(nn.Conv2d(3, 16, 1), DidaModule(16, 8))
    else:
        model = DidaBranch(16, 8, 8)
    with pytest.raises(RuntimeError, match=r"reparameterize_model reached a DidaModule outside a DidaBranch .* call "
                                           r"the module's or branch's reparameterize\(\) instead"):
        timm.utils.reparameterize_model(model)
